//! Who a certificate names: the principal every request of a connection acts as.
//!
//! A Herald certificate carries one subject-alternative-name URI: `herald:client:NAME` (an
//! application or person), `herald:node:ID` (the topic server with that id) or
//! `herald:naming` (a member of the naming group). The transport reads it once per
//! connection; a certificate from the cluster CA without one is refused.

use std::fmt;

use rustls::pki_types::CertificateDer;

use crate::error::Error;
use crate::types::ServerId;

/// Longest client name, in bytes.
pub const MAX_CLIENT_NAME_BYTES: usize = 64;

/// Who a peer is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// An application or person, by name.
    Client(String),
    /// The topic server with this id.
    Node(ServerId),
    /// A member of the naming group.
    Naming,
}

const URI_PREFIX: &str = "herald:";

impl Principal {
    /// The URI a certificate carries for this principal.
    pub fn uri(&self) -> String {
        match self {
            Principal::Client(name) => format!("{URI_PREFIX}client:{name}"),
            Principal::Node(id) => format!("{URI_PREFIX}node:{id}"),
            Principal::Naming => format!("{URI_PREFIX}naming"),
        }
    }

    /// The principal a URI names, if it is a well-formed Herald one.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        if rest == "naming" {
            return Some(Principal::Naming);
        }
        if let Some(name) = rest.strip_prefix("client:") {
            return check_client_name(name).ok().map(|()| Principal::Client(name.to_string()));
        }
        let id = rest.strip_prefix("node:")?;
        // Canonical digits only, so one id has one URI.
        if id.is_empty() || id.starts_with('0') || !id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        id.parse().ok().map(Principal::Node)
    }

    /// The principal a peer's leaf certificate names, if any.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Option<Self> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let san = parsed.subject_alternative_name().ok()??;
        let mut named = san.value.general_names.iter().filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Principal::from_uri(uri),
            _ => None,
        });
        let first = named.next()?;
        // A certificate that names two principals names none.
        named.next().is_none().then_some(first)
    }

    /// A Herald server (a topic server or a naming member), trusted with cluster traffic.
    pub fn is_server(&self) -> bool {
        matches!(self, Principal::Node(_) | Principal::Naming)
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Client(name) => write!(f, "{name}"),
            Principal::Node(id) => write!(f, "server {id}"),
            Principal::Naming => write!(f, "the naming group"),
        }
    }
}

/// A client name: 1 to 64 letters, digits, `.`, `_`, `-` or `@`, so it reads plainly in logs,
/// errors and ACLs (`*` is kept for "everyone").
pub fn check_client_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CLIENT_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            what: "client".into(),
            name: name.escape_default().to_string(),
            rule: format!("1 to {MAX_CLIENT_NAME_BYTES} ASCII letters, digits, '.', '_', '-' or '@'"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_odd_ones_name_nobody() {
        for p in [Principal::Client("bob".into()), Principal::Node(7), Principal::Naming] {
            assert_eq!(Principal::from_uri(&p.uri()), Some(p));
        }
        for bad in [
            "herald:node:07",
            "herald:node:",
            "herald:node:-1",
            "herald:node:99999999999999999999999",
            "herald:client:",
            "herald:client:a b",
            "herald:client:*",
            "herald:naming:1",
            "spiffe://herald/client/bob",
        ] {
            assert_eq!(Principal::from_uri(bad), None, "{bad}");
        }
        assert!(check_client_name(&"a".repeat(MAX_CLIENT_NAME_BYTES)).is_ok());
        assert!(check_client_name(&"a".repeat(MAX_CLIENT_NAME_BYTES + 1)).is_err());
        assert!(check_client_name("ops@eu-1.example_team").is_ok());
        assert!(check_client_name("bob\n").is_err());
    }
}
