//! The book: every topic server and topic, as the naming server keeps them durably, and the
//! changes that move it from one version to the next.
//!
//! The naming leader's core decides a [`BookChange`]; the naming group commits it through
//! Raft (`naming::raft`), and only then does any member apply it or tell anyone, so what
//! servers and clients are told never runs ahead of what survives a crash. The book itself
//! is what a member's Raft log (snapshot + entries) adds up to.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::acl::{Acl, Grant};
use crate::types::{Epoch, ServerId, TopicId, TopicName};
use crate::wire::TopicConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub id: ServerId,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    pub id: TopicId,
    pub name: TopicName,
    pub config: TopicConfig,
    /// Replicas the topic was created with: the voters a replacement restores.
    pub factor: u32,
    /// Replicas that count toward commits and elections; the leader is one of them.
    pub voters: Vec<ServerId>,
    /// Replicas copying the log before they count (a replacement catching up).
    pub learners: Vec<ServerId>,
    pub leader: ServerId,
    /// The epoch the current leader leads.
    pub epoch: Epoch,
    /// The newest epoch any election or membership change used (at least `epoch`). Kept
    /// apart from `epoch` so an election under way never shows servers a leader it has not
    /// chosen; after a restart, a larger value means an election to finish.
    pub election_epoch: Epoch,
    pub created_ms: u64,
    /// The voter being replaced, while a replacement is under way.
    pub replacing: Option<ServerId>,
}

impl TopicRecord {
    /// Voters and learners.
    pub fn members(&self) -> impl Iterator<Item = ServerId> + '_ {
        self.voters.iter().chain(&self.learners).copied()
    }

    /// The server that should lead this topic when it is alive and caught up: its first
    /// voter (as in Kafka). Placement puts the least-leading server first, and the order of
    /// voters only changes when one is replaced, so preferred leaders stay spread.
    pub fn preferred(&self) -> ServerId {
        self.voters.first().copied().unwrap_or(self.leader)
    }

    /// An epoch newer than any used so far.
    pub fn next_epoch(&self) -> Epoch {
        self.election_epoch.max(self.epoch) + 1
    }
}

/// The durable book.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    pub servers: BTreeMap<ServerId, ServerRecord>,
    pub topics: BTreeMap<String, TopicRecord>,
    /// Bumped by every change: servers follow it in their heartbeats.
    pub version: u64,
    pub next_topic_id: TopicId,
    /// Identifies this book, so a server never deletes data on the word of another.
    pub cluster_id: u64,
    /// Who may do what (fields are only ever appended: see [`Book::decode`]).
    pub acl: Acl,
}

/// One step from a book version to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookChange {
    pub servers: Vec<ServerRecord>,
    pub topics: Vec<TopicRecord>,
    pub removed: Vec<String>,
    pub next_topic_id: Option<TopicId>,
    /// Set once, by the group's first leader.
    pub cluster_id: Option<u64>,
    /// Grants given and taken back.
    pub acl: Option<AclChange>,
    /// Servers retired for good (no topic holds them).
    pub retired: Vec<ServerId>,
}

/// A change to the grants: `revoke` is applied first, then `grant`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclChange {
    pub grant: Vec<Grant>,
    pub revoke: Vec<Grant>,
}

impl BookChange {
    pub fn topic(t: TopicRecord) -> Self {
        Self { topics: vec![t], ..Self::default() }
    }
}

impl Book {
    /// Applies a change that is durable now.
    pub fn apply(&mut self, change: &BookChange) {
        for s in &change.servers {
            self.servers.insert(s.id, s.clone());
        }
        for t in &change.topics {
            self.topics.insert(t.name.to_string(), t.clone());
        }
        for name in &change.removed {
            self.topics.remove(name);
        }
        if let Some(id) = change.next_topic_id {
            self.next_topic_id = id;
        }
        if let Some(id) = change.cluster_id {
            self.cluster_id = id;
        }
        for id in &change.retired {
            self.servers.remove(id);
        }
        if let Some(acl) = &change.acl {
            for g in &acl.revoke {
                self.acl.revoke(g);
            }
            for g in &acl.grant {
                // The leader's core checked the bound before it proposed the change.
                let _ = self.acl.grant(g.clone());
            }
        }
        self.version += 1;
    }

    /// Reads a book from a snapshot, also one written before grants existed (postcard
    /// reads fields in order and has no optional trailing ones, so older layouts are tried
    /// after the current one).
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes).or_else(|e| {
            let old: legacy::BookV1 = postcard::from_bytes(bytes).map_err(|_| e)?;
            Ok(old.into())
        })
    }
}

impl BookChange {
    /// Reads a change from the log, also one written before grants and retired servers
    /// existed.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes).or_else(|e| {
            let old: legacy::BookChangeV1 = postcard::from_bytes(bytes).map_err(|_| e)?;
            Ok(old.into())
        })
    }
}

/// The layouts of naming data written before grants were added.
mod legacy {
    use super::*;

    #[derive(Deserialize)]
    pub struct BookV1 {
        servers: BTreeMap<ServerId, ServerRecord>,
        topics: BTreeMap<String, TopicRecord>,
        version: u64,
        next_topic_id: TopicId,
        cluster_id: u64,
    }

    impl From<BookV1> for Book {
        fn from(b: BookV1) -> Self {
            let BookV1 { servers, topics, version, next_topic_id, cluster_id } = b;
            Book { servers, topics, version, next_topic_id, cluster_id, acl: Acl::default() }
        }
    }

    #[derive(Deserialize)]
    pub struct BookChangeV1 {
        servers: Vec<ServerRecord>,
        topics: Vec<TopicRecord>,
        removed: Vec<String>,
        next_topic_id: Option<TopicId>,
        cluster_id: Option<u64>,
    }

    impl From<BookChangeV1> for BookChange {
        fn from(c: BookChangeV1) -> Self {
            let BookChangeV1 { servers, topics, removed, next_topic_id, cluster_id } = c;
            BookChange { servers, topics, removed, next_topic_id, cluster_id, acl: None, retired: Vec::new() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{Grantee, Operation};

    /// Books and changes written before grants existed still read, as they were.
    #[test]
    fn data_written_before_grants_still_reads() {
        #[derive(Serialize)]
        struct OldChange<'a> {
            servers: &'a [ServerRecord],
            topics: &'a [TopicRecord],
            removed: &'a [String],
            next_topic_id: Option<TopicId>,
            cluster_id: Option<u64>,
        }
        let server = ServerRecord { id: 3, addr: "127.0.0.1:7401".parse().unwrap() };
        let old = OldChange {
            servers: std::slice::from_ref(&server),
            topics: &[],
            removed: &["gone".to_string()],
            next_topic_id: Some(9),
            cluster_id: Some(77),
        };
        let change = BookChange::decode(&postcard::to_stdvec(&old).unwrap()).unwrap();
        assert_eq!(change.servers, vec![server]);
        assert_eq!((change.next_topic_id, change.cluster_id, change.acl.clone()), (Some(9), Some(77), None));

        let mut book = Book::default();
        book.apply(&change);
        #[derive(Serialize)]
        struct OldBook<'a> {
            servers: &'a BTreeMap<ServerId, ServerRecord>,
            topics: &'a BTreeMap<String, TopicRecord>,
            version: u64,
            next_topic_id: TopicId,
            cluster_id: u64,
        }
        let old = OldBook {
            servers: &book.servers,
            topics: &book.topics,
            version: book.version,
            next_topic_id: book.next_topic_id,
            cluster_id: book.cluster_id,
        };
        assert_eq!(Book::decode(&postcard::to_stdvec(&old).unwrap()).unwrap(), book);

        // And the current layout round-trips with its grants.
        let grant = Grant { grantee: Grantee::Everyone, operation: Operation::Consume, prefix: "a.".into() };
        let change = BookChange {
            acl: Some(AclChange { grant: vec![grant.clone()], revoke: vec![] }),
            ..BookChange::default()
        };
        assert_eq!(BookChange::decode(&postcard::to_stdvec(&change).unwrap()).unwrap(), change);
        book.apply(&change);
        let again = Book::decode(&postcard::to_stdvec(&book).unwrap()).unwrap();
        assert_eq!(again, book);
        assert!(again.acl.grants().any(|g| *g == grant));
    }
}
