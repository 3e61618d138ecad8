//! The book: every topic server and topic, as the naming server keeps them durably, and the
//! changes that move it from one version to the next.
//!
//! The naming core decides a [`BookChange`]; the driver makes it durable (one redb
//! transaction) and only then applies it and tells anyone, so what servers and clients are
//! told never runs ahead of what survives a crash.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::types::{Epoch, ServerId, TopicId, TopicName};
use crate::wire::TopicConfig;

const SERVERS: TableDefinition<u64, &[u8]> = TableDefinition::new("servers");
const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Version of the book's on-disk layout. 3: voters and learners, replication factor, the
/// replica being replaced.
const BOOK_FORMAT: u64 = 3;

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

/// The book in `DIR/naming.redb`.
pub struct BookStore {
    db: Database,
}

impl BookStore {
    /// Opens the book in `dir` (creating it on first start); returns it with its contents.
    pub fn open(dir: &Path) -> anyhow::Result<(Self, Book)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("naming.redb");
        let db = Database::create(&path).map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let id = meta.get("cluster_id")?.map(|v| v.value());
            // A book from before the format was recorded is format 1.
            let format = meta.get("format")?.map(|v| v.value()).or(id.map(|_| 1));
            if let Some(f) = format.filter(|f| *f != BOOK_FORMAT) {
                anyhow::bail!(
                    "{} holds a naming book in format {f}; this Herald reads format {BOOK_FORMAT} (no migration between them yet: use a new --data directory)",
                    dir.display()
                );
            }
            meta.insert("format", BOOK_FORMAT)?;
            meta.insert("cluster_id", id.unwrap_or_else(|| fastrand::u64(1..u64::MAX)))?;
            txn.open_table(SERVERS)?;
            txn.open_table(TOPICS)?;
        }
        txn.commit()?;
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let get = |k: &str| -> anyhow::Result<Option<u64>> { Ok(meta.get(k)?.map(|v| v.value())) };
        let mut book = Book {
            version: get("version")?.unwrap_or(0),
            next_topic_id: get("next_topic_id")?.unwrap_or(1),
            cluster_id: get("cluster_id")?.unwrap_or(0),
            ..Book::default()
        };
        for row in txn.open_table(SERVERS)?.iter()? {
            let (_, v) = row?;
            let s: ServerRecord = postcard::from_bytes(v.value())?;
            book.servers.insert(s.id, s);
        }
        for row in txn.open_table(TOPICS)?.iter()? {
            let (_, v) = row?;
            let t: TopicRecord = postcard::from_bytes(v.value())?;
            book.topics.insert(t.name.to_string(), t);
        }
        drop(meta);
        drop(txn);
        Ok((Self { db }, book))
    }

    /// Makes `change` durable as book version `version` (one transaction, one fsync).
    pub fn save(&self, change: &BookChange, version: u64) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert("version", version)?;
            if let Some(id) = change.next_topic_id {
                meta.insert("next_topic_id", id)?;
            }
            let mut servers = txn.open_table(SERVERS)?;
            for s in &change.servers {
                servers.insert(s.id, postcard::to_stdvec(s).expect("encodes").as_slice())?;
            }
            let mut topics = txn.open_table(TOPICS)?;
            for t in &change.topics {
                topics.insert(t.name.as_str(), postcard::to_stdvec(t).expect("encodes").as_slice())?;
            }
            for name in &change.removed {
                topics.remove(name.as_str())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}
