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
        self.version += 1;
    }
}
