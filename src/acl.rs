//! Who may do what: grants of an operation on a family of topics (a name prefix) to a client
//! or to everyone, and the check every request goes through. Rules only, no I/O: the naming
//! book keeps the grants, the naming server and the topic servers ask [`Acl::check`].
//!
//! Deny by default: a principal may do something only when it is a superuser or a grant
//! covers it. Any grant on a topic also lets its holder describe (look up) that topic, as a
//! producer or consumer must to find the leader.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::certs::{check_client_name, Principal};
use crate::error::Error;

/// What a grant allows on its topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Operation {
    /// Publish records.
    Produce,
    /// Read through subscriptions, acknowledge, create subscriptions.
    Consume,
    /// Look up, describe and list.
    Describe,
    /// Create, alter and delete topics and subscriptions, reset subscriptions.
    Admin,
}

impl Operation {
    pub const ALL: [Operation; 4] =
        [Operation::Produce, Operation::Consume, Operation::Describe, Operation::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Produce => "produce",
            Operation::Consume => "consume",
            Operation::Describe => "describe",
            Operation::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Result<Self, Error> {
        Operation::ALL.into_iter().find(|o| o.as_str() == s).ok_or_else(|| {
            Error::invalid(format!("unknown operation {s:?}: one of produce, consume, describe, admin"))
        })
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whom a grant is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Grantee {
    /// Every client (`*`).
    Everyone,
    /// The client with this name.
    Client(String),
}

impl Grantee {
    /// `*` or a client name.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s == "*" {
            return Ok(Grantee::Everyone);
        }
        check_client_name(s)?;
        Ok(Grantee::Client(s.to_string()))
    }

    fn covers(&self, who: &Principal) -> bool {
        match (self, who) {
            (Grantee::Everyone, Principal::Client(_)) => true,
            (Grantee::Client(name), Principal::Client(n)) => name == n,
            _ => false,
        }
    }
}

impl fmt::Display for Grantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grantee::Everyone => f.write_str("*"),
            Grantee::Client(name) => f.write_str(name),
        }
    }
}

/// One grant: `grantee` may do `operation` on every topic whose name starts with `prefix`
/// (the empty prefix: every topic).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Grant {
    pub grantee: Grantee,
    pub operation: Operation,
    pub prefix: String,
}

impl Grant {
    fn covers(&self, who: &Principal, operation: Operation, topic: &str) -> bool {
        let op = self.operation == operation || operation == Operation::Describe;
        op && self.grantee.covers(who) && topic.starts_with(&self.prefix)
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topics = if self.prefix.is_empty() {
            "every topic".to_string()
        } else {
            format!("topics {}*", self.prefix)
        };
        write!(f, "{} may {} on {topics}", self.grantee, self.operation)
    }
}

/// Most grants a cluster keeps. They travel with the book in heartbeat answers, which must
/// fit in a frame beside the largest book (`naming::core::MAX_TOPICS`): 4,096 grants of at
/// most ~200 bytes each add under 1 MB.
pub const MAX_GRANTS: usize = 4_096;

/// The grants of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acl {
    grants: BTreeSet<Grant>,
}

impl Acl {
    pub fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.grants.iter()
    }

    /// Adds a grant; `false` if it was there.
    pub fn grant(&mut self, grant: Grant) -> Result<bool, Error> {
        if !self.grants.contains(&grant) && self.grants.len() >= MAX_GRANTS {
            return Err(Error::LimitReached {
                what: "grants in the cluster".into(),
                limit: MAX_GRANTS as u64,
                hint: "grant on topic prefixes, or to *, rather than topic by topic".into(),
            });
        }
        Ok(self.grants.insert(grant))
    }

    /// Removes a grant; `false` if it was not there.
    pub fn revoke(&mut self, grant: &Grant) -> bool {
        self.grants.remove(grant)
    }

    /// Whether `who` may do `operation` on `topic`, superusers aside.
    pub fn allows(&self, who: &Principal, operation: Operation, topic: &str) -> bool {
        self.grants.iter().any(|g| g.covers(who, operation, topic))
    }

    /// Allows `who` `operation` on `topic` if it is a superuser or granted, else the typed
    /// refusal naming what is missing and the command that grants it.
    pub fn check(
        &self,
        superusers: &BTreeSet<String>,
        who: &Principal,
        operation: Operation,
        topic: &str,
    ) -> Result<(), Error> {
        if is_superuser(superusers, who) || self.allows(who, operation, topic) {
            return Ok(());
        }
        let hint = match who {
            Principal::Client(name) => format!(
                "no grant for {operation} on a prefix of it; herald acl grant {name} {operation} --topic {}",
                suggested_prefix(topic)
            ),
            other => format!("{other} acts only as a server, not as a client"),
        };
        Err(Error::NotAuthorized {
            principal: who.to_string(),
            operation: operation.as_str().to_string(),
            topic: topic.to_string(),
            hint,
        })
    }
}

/// Whether `who` is one of the `superusers` (clients only: a server never is).
pub fn is_superuser(superusers: &BTreeSet<String>, who: &Principal) -> bool {
    matches!(who, Principal::Client(name) if superusers.contains(name))
}

/// The grants with the superusers: what a server checks requests against.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclView {
    pub acl: Acl,
    /// Clients that may do everything (`herald naming --superusers`).
    pub superusers: BTreeSet<String>,
}

impl AclView {
    pub fn check(&self, who: &Principal, operation: Operation, topic: &str) -> Result<(), Error> {
        self.acl.check(&self.superusers, who, operation, topic)
    }
}

/// The family a topic belongs to, for a hint: its name up to and including the last `.`,
/// `-` or `_` (`orders.eu` -> `orders.`), or the whole name.
fn suggested_prefix(topic: &str) -> &str {
    match topic.rfind(['.', '-', '_']) {
        Some(i) if i > 0 => &topic[..=i],
        _ => topic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(who: &str, op: Operation, prefix: &str) -> Grant {
        Grant { grantee: Grantee::parse(who).unwrap(), operation: op, prefix: prefix.into() }
    }

    fn bob() -> Principal {
        Principal::Client("bob".into())
    }

    #[test]
    fn prefixes_match_from_the_start_and_only_the_granted_operation() {
        let mut acl = Acl::default();
        acl.grant(grant("bob", Operation::Produce, "orders.")).unwrap();
        assert!(acl.allows(&bob(), Operation::Produce, "orders.eu"));
        assert!(
            acl.allows(&bob(), Operation::Produce, "orders."),
            "the prefix itself is a topic of the family"
        );
        assert!(!acl.allows(&bob(), Operation::Produce, "orders"), "shorter than the prefix");
        assert!(!acl.allows(&bob(), Operation::Produce, "xorders.eu"), "prefix, not substring");
        assert!(!acl.allows(&bob(), Operation::Produce, "Orders.eu"), "case matters");
        assert!(!acl.allows(&bob(), Operation::Consume, "orders.eu"), "another operation");
        assert!(!acl.allows(&bob(), Operation::Admin, "orders.eu"));
        assert!(acl.allows(&bob(), Operation::Describe, "orders.eu"), "any grant lets one look the topic up");
        assert!(!acl.allows(&Principal::Client("alice".into()), Operation::Produce, "orders.eu"));
        assert!(!acl.allows(&Principal::Node(1), Operation::Produce, "orders.eu"));
    }

    #[test]
    fn everyone_and_the_empty_prefix_cover_all_clients_and_topics_but_not_servers() {
        let mut acl = Acl::default();
        acl.grant(grant("*", Operation::Consume, "")).unwrap();
        assert!(acl.allows(&bob(), Operation::Consume, "anything"));
        assert!(acl.allows(&Principal::Client("x".into()), Operation::Consume, "a"));
        assert!(!acl.allows(&Principal::Naming, Operation::Consume, "a"));
        assert!(!acl.allows(&bob(), Operation::Produce, "a"));
    }

    #[test]
    fn revoke_takes_away_exactly_that_grant() {
        let mut acl = Acl::default();
        let narrow = grant("bob", Operation::Produce, "orders.eu");
        let wide = grant("bob", Operation::Produce, "orders.");
        assert!(acl.grant(narrow.clone()).unwrap());
        assert!(acl.grant(wide.clone()).unwrap());
        assert!(!acl.grant(wide.clone()).unwrap(), "granting twice changes nothing");
        assert!(acl.revoke(&wide));
        assert!(!acl.revoke(&wide), "revoking what is not there changes nothing");
        assert!(acl.allows(&bob(), Operation::Produce, "orders.eu"), "the narrow grant stays");
        assert!(!acl.allows(&bob(), Operation::Produce, "orders.us"));
        assert!(acl.revoke(&narrow));
        assert!(!acl.allows(&bob(), Operation::Describe, "orders.eu"));
    }

    #[test]
    fn refusals_name_who_what_where_and_the_fix() {
        let acl = Acl::default();
        let supers: BTreeSet<String> = ["admin".to_string()].into();
        acl.check(&supers, &Principal::Client("admin".into()), Operation::Admin, "x").unwrap();
        let err = acl.check(&supers, &bob(), Operation::Produce, "orders.eu").unwrap_err();
        assert_eq!(
            err.to_string(),
            "bob may not produce to orders.eu (no grant for produce on a prefix of it; herald acl grant bob produce --topic orders.)"
        );
        assert_eq!(suggested_prefix("plain"), "plain");
        assert_eq!(suggested_prefix("a-b_c"), "a-b_");
        assert_eq!(suggested_prefix(".hidden"), ".hidden");
    }

    #[test]
    fn grants_are_bounded() {
        let mut acl = Acl::default();
        for i in 0..MAX_GRANTS {
            acl.grant(grant("bob", Operation::Produce, &format!("t{i}"))).unwrap();
        }
        assert!(matches!(
            acl.grant(grant("bob", Operation::Produce, "more")),
            Err(Error::LimitReached { .. })
        ));
        assert!(!acl.grant(grant("bob", Operation::Produce, "t0")).unwrap(), "one already there is fine");
        assert!(Grantee::parse("bad name").is_err());
        assert!(Operation::parse("write").is_err());
    }
}
