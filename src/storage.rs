//! A topic server's storage: records, cursors, producer state and epoch history in redb.
//!
//! # Layout
//! One redb file per server (`DATA/herald.redb`), tables keyed by topic id:
//! - `topics`: id -> [`TopicMeta`] (name, config, epoch, log start);
//! - `records`: (id, offset) -> (timestamp, [`Record`]);
//! - `cursors`: (id, subscription) -> next offset to acknowledge;
//! - `producers`: (id, producer) -> [`ProducerState`] (dedup window);
//! - `epochs`: (id, epoch) -> first offset written in that epoch (for truncation by epoch
//!   when replication rejoins a replica);
//! - `meta`: the server id this data directory belongs to.
//!
//! # Group commit
//! One writer thread owns every write (redb allows one write transaction at a time anyway).
//! It takes all queued commands, applies them in one write transaction and commits once with
//! `Durability::Immediate` (one fsync), then answers each command. Readers use their own read
//! transactions and never wait for the writer.
//!
//! # Invariants
//! - Offsets of a topic are dense: records exist exactly for `log_start..log_end`.
//! - `log_start` only grows, and equals the lowest subscription cursor once any subscription
//!   exists (a topic without subscriptions keeps its records).
//! - A cursor only moves forward and never past `log_end`.
//! - The published [`LogState`] only ever describes committed (fsynced) data.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info};

use crate::error::Error;
use crate::types::{
    now_ms, Epoch, Offset, ProducerId, Sequence, ServerId, StartFrom, SubscriptionName, TopicId, TopicName,
};
use crate::wire::{Record, Role, StoredRecord, SubscriptionInfo, TopicConfig};

const TOPICS: TableDefinition<u64, &[u8]> = TableDefinition::new("topics");
const RECORDS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("records");
const CURSORS: TableDefinition<(u64, &str), u64> = TableDefinition::new("cursors");
const PRODUCERS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("producers");
const EPOCHS: TableDefinition<(u64, u64), u64> = TableDefinition::new("epochs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Batches a producer may have unacknowledged and still be deduplicated on retry. The client
/// keeps its in-flight window below this (`client::MAX_INFLIGHT`).
pub const PRODUCER_DEDUP_WINDOW: usize = 128;

/// Commands folded into one write transaction at most; bounds the latency of the first one.
const MAX_COMMANDS_PER_COMMIT: usize = 4096;

/// redb page cache. Records live on disk, not in RAM: memory stays flat as backlogs grow.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// What a server stores about a topic it hosts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicMeta {
    pub id: TopicId,
    pub name: TopicName,
    pub config: TopicConfig,
    pub epoch: Epoch,
    pub role: Role,
    pub log_start: Offset,
}

/// The committed shape of a topic's log, published after every commit that changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogState {
    pub log_start: Offset,
    pub log_end: Offset,
    /// One past the newest committed record. With a single replica this is `log_end`;
    /// replication will hold it back until a majority has the records.
    pub commit: Offset,
    pub epoch: Epoch,
}

/// A read handle on one topic: its identity and a watch on its committed state.
#[derive(Debug)]
pub struct TopicLog {
    pub id: TopicId,
    pub name: TopicName,
    pub config: TopicConfig,
    pub role: Role,
    state: watch::Receiver<LogState>,
}

impl TopicLog {
    pub fn state(&self) -> LogState {
        *self.state.borrow()
    }

    /// A receiver that wakes when the committed state changes.
    pub fn watch(&self) -> watch::Receiver<LogState> {
        self.state.clone()
    }
}

/// Outcome of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base: Offset,
    pub count: u32,
    pub epoch: Epoch,
    /// A retry answered from the dedup window; nothing was stored.
    pub duplicate: bool,
}

/// Recent batches of one producer, for deduplicating retries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProducerState {
    pub last_sequence: Sequence,
    /// Oldest first, at most [`PRODUCER_DEDUP_WINDOW`] entries.
    pub recent: VecDeque<BatchOutcome>,
}

/// How one batch of a producer ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BatchOutcome {
    pub sequence: Sequence,
    pub base: Offset,
    pub count: u32,
    /// The batch was refused (e.g. a record over the size limit); it still used its sequence
    /// number so the batches after it are not out of order.
    pub rejected: bool,
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

enum Command {
    CreateTopic {
        meta: TopicMeta,
        reply: Reply<Arc<TopicLog>>,
    },
    DeleteTopic {
        id: TopicId,
        reply: Reply<()>,
    },
    Append {
        topic: TopicId,
        producer: ProducerId,
        sequence: Sequence,
        records: Vec<Record>,
        reply: Reply<Appended>,
    },
    Ack {
        topic: TopicId,
        subscription: SubscriptionName,
        next: Offset,
        reply: Reply<Offset>,
    },
    CreateSubscription {
        topic: TopicId,
        subscription: SubscriptionName,
        from: StartFrom,
        if_missing: bool,
        reply: Reply<Offset>,
    },
    DeleteSubscription {
        topic: TopicId,
        subscription: SubscriptionName,
        reply: Reply<u64>,
    },
    SetMeta {
        key: &'static str,
        value: u64,
        reply: Reply<()>,
    },
}

/// A server's storage: the redb database and the writer thread in front of it.
pub struct Store {
    db: Arc<Database>,
    /// `None` only while dropping.
    tx: Option<mpsc::UnboundedSender<Command>>,
    writer: Option<std::thread::JoinHandle<()>>,
    server: ServerId,
    commits: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Store {
    /// Stops the writer and waits for it, so the database file is closed when this returns
    /// (a reopen right after, as in a restart, must not find it still open).
    fn drop(&mut self) {
        self.tx.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`. The data directory is bound to one server id:
    /// `requested` must match the stored id if there is one; without either, a random id is
    /// chosen and kept. Returns the store and a handle per hosted topic.
    pub fn open(dir: &Path, requested: Option<ServerId>) -> anyhow::Result<(Store, Vec<Arc<TopicLog>>)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("herald.redb");
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        let server = {
            let txn = db.begin_write()?;
            let id = {
                let mut meta = txn.open_table(META)?;
                let stored = meta.get("server_id")?.map(|v| v.value());
                let id = match (stored, requested) {
                    (Some(s), Some(r)) if s != r => anyhow::bail!(
                        "{} belongs to server {s}, not {r}: use --id {s} or another --data directory",
                        dir.display()
                    ),
                    (Some(s), _) => s,
                    (None, Some(r)) => r,
                    (None, None) => fastrand::u64(1..u64::MAX >> 12),
                };
                meta.insert("server_id", id)?;
                // Create every table so readers never meet a missing one.
                txn.open_table(TOPICS)?;
                txn.open_table(RECORDS)?;
                txn.open_table(CURSORS)?;
                txn.open_table(PRODUCERS)?;
                txn.open_table(EPOCHS)?;
                id
            };
            txn.commit()?;
            id
        };
        let db = Arc::new(db);
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut writer = Writer {
            db: db.clone(),
            server,
            topics: HashMap::new(),
            buf: Vec::new(),
            commits: commits.clone(),
        };
        let logs = writer.load()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = std::thread::Builder::new()
            .name(format!("herald-writer-{server}"))
            .spawn(move || writer.run(rx))?;
        Ok((Store { db, tx: Some(tx), writer: Some(writer), server, commits }, logs))
    }

    pub fn server_id(&self) -> ServerId {
        self.server
    }

    /// Group commits (write transactions, each one fsync) done since the store was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn sender(&self) -> &mpsc::UnboundedSender<Command> {
        self.tx.as_ref().expect("the sender lives until drop")
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.sender()
            .send(make(reply))
            .map_err(|_| Error::Unavailable { detail: "the storage writer has stopped".into() })?;
        rx.await.map_err(|_| Error::Unavailable { detail: "the storage writer has stopped".into() })?
    }

    /// Starts hosting a topic (idempotent: an existing id keeps its data).
    pub async fn create_topic(&self, meta: TopicMeta) -> Result<Arc<TopicLog>, Error> {
        self.call(|reply| Command::CreateTopic { meta, reply }).await
    }

    /// Drops a topic and all its records, cursors and producer state.
    pub async fn delete_topic(&self, id: TopicId) -> Result<(), Error> {
        self.call(|reply| Command::DeleteTopic { id, reply }).await
    }

    /// Queues a batch for the next group commit. The queueing happens now, in call order, so
    /// batches of one stream keep their order; the returned future resolves once the batch is
    /// durable: `Durability::Immediate` means fsynced before the commit returns, so an `Ok`
    /// here is safe against `kill -9` and power loss (G1 on one replica).
    pub fn append(
        &self,
        topic: TopicId,
        producer: ProducerId,
        sequence: Sequence,
        records: Vec<Record>,
    ) -> impl std::future::Future<Output = Result<Appended, Error>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.sender().send(Command::Append { topic, producer, sequence, records, reply });
        async move {
            sent.map_err(|_| Error::Unavailable { detail: "the storage writer has stopped".into() })?;
            rx.await.map_err(|_| Error::Unavailable { detail: "the storage writer has stopped".into() })?
        }
    }

    /// Moves a subscription's cursor forward to `next`; returns the cursor after the move.
    pub async fn ack(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
        next: Offset,
    ) -> Result<Offset, Error> {
        self.call(|reply| Command::Ack { topic, subscription, next, reply }).await
    }

    pub async fn create_subscription(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
        from: StartFrom,
        if_missing: bool,
    ) -> Result<Offset, Error> {
        self.call(|reply| Command::CreateSubscription { topic, subscription, from, if_missing, reply }).await
    }

    /// Deletes a subscription; returns how many records that freed.
    pub async fn delete_subscription(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
    ) -> Result<u64, Error> {
        self.call(|reply| Command::DeleteSubscription { topic, subscription, reply }).await
    }

    /// A number kept in the `meta` table (e.g. the naming book this server belongs to).
    pub fn meta(&self, key: &str) -> Result<Option<u64>, Error> {
        let txn = self.db.begin_read().map_err(|e| self.storage_err(e))?;
        let table = txn.open_table(META).map_err(|e| self.storage_err(e))?;
        let value = table.get(key).map_err(|e| self.storage_err(e))?;
        Ok(value.map(|v| v.value()))
    }

    pub async fn set_meta(&self, key: &'static str, value: u64) -> Result<(), Error> {
        self.call(|reply| Command::SetMeta { key, value, reply }).await
    }

    fn storage_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Storage { server: self.server, detail: e.to_string() }
    }

    /// Reads committed records `from..end` (at most `max_records`, and at most `max_bytes`
    /// of payload beyond the first record).
    pub fn read(
        &self,
        topic: &TopicLog,
        from: Offset,
        end: Offset,
        max_records: u32,
        max_bytes: u32,
    ) -> Result<Vec<StoredRecord>, Error> {
        let txn = self.db.begin_read().map_err(|e| self.storage_err(e))?;
        let table = txn.open_table(RECORDS).map_err(|e| self.storage_err(e))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for entry in table.range((topic.id, from)..(topic.id, end)).map_err(|e| self.storage_err(e))? {
            let (key, value) = entry.map_err(|e| self.storage_err(e))?;
            let (timestamp_ms, record): (u64, Record) = postcard::from_bytes(value.value())
                .map_err(|e| self.storage_err(format!("corrupt record: {e}")))?;
            bytes += record.size();
            out.push(StoredRecord { offset: key.value().1, timestamp_ms, record });
            if out.len() >= max_records as usize || bytes >= max_bytes as usize {
                break;
            }
        }
        Ok(out)
    }

    /// A subscription's committed cursor.
    pub fn cursor(&self, topic: TopicId, subscription: &SubscriptionName) -> Result<Option<Offset>, Error> {
        let txn = self.db.begin_read().map_err(|e| self.storage_err(e))?;
        let table = txn.open_table(CURSORS).map_err(|e| self.storage_err(e))?;
        let value = table.get((topic, subscription.as_str())).map_err(|e| self.storage_err(e))?;
        Ok(value.map(|v| v.value()))
    }

    /// Every subscription of a topic with its committed cursor and lag behind `commit`.
    pub fn subscriptions(&self, topic: TopicId, commit: Offset) -> Result<Vec<SubscriptionInfo>, Error> {
        let txn = self.db.begin_read().map_err(|e| self.storage_err(e))?;
        let table = txn.open_table(CURSORS).map_err(|e| self.storage_err(e))?;
        let mut out = Vec::new();
        for entry in table.range((topic, "")..(topic + 1, "")).map_err(|e| self.storage_err(e))? {
            let (key, value) = entry.map_err(|e| self.storage_err(e))?;
            let cursor = value.value();
            let name = SubscriptionName::new(key.value().1).map_err(|e| self.storage_err(e))?;
            out.push(SubscriptionInfo { name, cursor, lag: commit.saturating_sub(cursor) });
        }
        Ok(out)
    }

    /// Number of records stored for all topics (for tests and diagnostics).
    pub fn record_count(&self) -> Result<u64, Error> {
        let txn = self.db.begin_read().map_err(|e| self.storage_err(e))?;
        let table = txn.open_table(RECORDS).map_err(|e| self.storage_err(e))?;
        table.len().map_err(|e| self.storage_err(e))
    }
}

/// The writer thread's view of one topic.
struct WriterTopic {
    meta: TopicMeta,
    log_end: Offset,
    subscriptions: BTreeMap<String, Offset>,
    producers: HashMap<ProducerId, ProducerState>,
    state: watch::Sender<LogState>,
}

impl WriterTopic {
    fn log_state(&self) -> LogState {
        LogState {
            log_start: self.meta.log_start,
            log_end: self.log_end,
            commit: self.log_end,
            epoch: self.meta.epoch,
        }
    }

    fn handle(&self) -> Arc<TopicLog> {
        Arc::new(TopicLog {
            id: self.meta.id,
            name: self.meta.name.clone(),
            config: self.meta.config.clone(),
            role: self.meta.role,
            state: self.state.subscribe(),
        })
    }
}

struct Writer {
    db: Arc<Database>,
    server: ServerId,
    topics: HashMap<TopicId, WriterTopic>,
    buf: Vec<u8>,
    commits: Arc<std::sync::atomic::AtomicU64>,
}

/// A failure of the storage engine; the whole group commit is abandoned.
type StorageResult<T> = Result<T, redb::Error>;

/// Answers held back until the group commit is durable.
type Deferred = Vec<Box<dyn FnOnce(Result<(), Error>) + Send>>;

fn defer<T: Send + 'static>(deferred: &mut Deferred, reply: Reply<T>, result: Result<T, Error>) {
    deferred.push(Box::new(move |commit| {
        let _ = reply.send(commit.and(result));
    }));
}

impl Writer {
    /// Rebuilds the in-memory view from the committed tables (at open, and after a failed
    /// commit, so memory never runs ahead of disk).
    fn load(&mut self) -> anyhow::Result<Vec<Arc<TopicLog>>> {
        let txn = self.db.begin_read()?;
        let topics = txn.open_table(TOPICS)?;
        let records = txn.open_table(RECORDS)?;
        let cursors = txn.open_table(CURSORS)?;
        let producers = txn.open_table(PRODUCERS)?;
        let old = std::mem::take(&mut self.topics);
        let mut logs = Vec::new();
        for entry in topics.iter()? {
            let (_, value) = entry?;
            let meta: TopicMeta = postcard::from_bytes(value.value())?;
            let id = meta.id;
            let log_end = records
                .range((id, 0)..=(id, u64::MAX))?
                .next_back()
                .transpose()?
                .map(|(k, _)| k.value().1 + 1)
                .unwrap_or(0)
                .max(meta.log_start);
            let mut subscriptions = BTreeMap::new();
            for entry in cursors.range((id, "")..(id + 1, ""))? {
                let (k, v) = entry?;
                subscriptions.insert(k.value().1.to_string(), v.value());
            }
            let mut producer_state = HashMap::new();
            for entry in producers.range((id, 0)..=(id, u64::MAX))? {
                let (k, v) = entry?;
                producer_state.insert(k.value().1, postcard::from_bytes(v.value())?);
            }
            let state = LogState { log_start: meta.log_start, log_end, commit: log_end, epoch: meta.epoch };
            // Keep existing watch channels so handles held by the server stay live.
            let sender = match old.get(&id) {
                Some(t) => {
                    t.state.send_replace(state);
                    t.state.clone()
                }
                None => watch::Sender::new(state),
            };
            let topic =
                WriterTopic { meta, log_end, subscriptions, producers: producer_state, state: sender };
            logs.push(topic.handle());
            self.topics.insert(id, topic);
        }
        Ok(logs)
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_COMMANDS_PER_COMMIT {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            let mut deferred: Deferred = Vec::with_capacity(batch.len());
            let mut touched = HashSet::new();
            let outcome = self.db.begin_write().map_err(redb::Error::from).and_then(|txn| {
                for cmd in batch.drain(..) {
                    self.apply(&txn, cmd, &mut deferred, &mut touched)?;
                }
                txn.commit().map_err(redb::Error::from)
            });
            match outcome {
                Ok(()) => {
                    self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    for id in touched {
                        if let Some(t) = self.topics.get(&id) {
                            t.state.send_replace(t.log_state());
                        }
                    }
                    deferred.into_iter().for_each(|answer| answer(Ok(())));
                }
                Err(e) => {
                    // Nothing of this group is durable: fail every command in it (producers
                    // retry with the same sequence), and forget what memory ran ahead.
                    error!(server = self.server, error = %e, "group commit failed");
                    let err = Error::Storage { server: self.server, detail: e.to_string() };
                    batch.clear();
                    deferred.into_iter().for_each(|answer| answer(Err(err.clone())));
                    if let Err(e) = self.load() {
                        error!(error = %e, "reloading storage state failed; stopping the writer");
                        return;
                    }
                }
            }
        }
        info!(server = self.server, "storage writer stopped");
    }

    fn unknown(&self, id: TopicId) -> Error {
        Error::NotLeader { topic: format!("#{id}"), server: self.server, leader: None }
    }

    fn apply(
        &mut self,
        txn: &WriteTransaction,
        cmd: Command,
        deferred: &mut Deferred,
        touched: &mut HashSet<TopicId>,
    ) -> StorageResult<()> {
        match cmd {
            Command::CreateTopic { meta, reply } => {
                let id = meta.id;
                if let std::collections::hash_map::Entry::Vacant(slot) = self.topics.entry(id) {
                    let bytes = postcard::to_stdvec(&meta).expect("meta encodes");
                    txn.open_table(TOPICS)?.insert(id, bytes.as_slice())?;
                    txn.open_table(EPOCHS)?.insert((id, meta.epoch), meta.log_start)?;
                    let state = LogState {
                        log_start: meta.log_start,
                        log_end: meta.log_start,
                        commit: meta.log_start,
                        epoch: meta.epoch,
                    };
                    let topic = WriterTopic {
                        log_end: meta.log_start,
                        meta,
                        subscriptions: BTreeMap::new(),
                        producers: HashMap::new(),
                        state: watch::Sender::new(state),
                    };
                    slot.insert(topic);
                }
                touched.insert(id);
                let handle = self.topics[&id].handle();
                defer(deferred, reply, Ok(handle));
            }
            Command::SetMeta { key, value, reply } => {
                txn.open_table(META)?.insert(key, value)?;
                defer(deferred, reply, Ok(()));
            }
            Command::DeleteTopic { id, reply } => {
                if self.topics.remove(&id).is_some() {
                    txn.open_table(TOPICS)?.remove(id)?;
                    txn.open_table(RECORDS)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                    txn.open_table(CURSORS)?.retain_in((id, "")..(id + 1, ""), |_, _| false)?;
                    txn.open_table(PRODUCERS)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                    txn.open_table(EPOCHS)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                }
                defer(deferred, reply, Ok(()));
            }
            Command::Append { topic, producer, sequence, records, reply } => {
                let result = self.append(txn, topic, producer, sequence, records)?;
                if result.as_ref().is_ok_and(|a| !a.duplicate && a.count > 0) {
                    touched.insert(topic);
                }
                defer(deferred, reply, result);
            }
            Command::Ack { topic, subscription, next, reply } => {
                let result = self.ack(txn, topic, &subscription, next)?;
                touched.insert(topic);
                defer(deferred, reply, result);
            }
            Command::CreateSubscription { topic, subscription, from, if_missing, reply } => {
                let result = match self.topics.get_mut(&topic) {
                    None => Err(self.unknown(topic)),
                    Some(t) => match t.subscriptions.get(subscription.as_str()) {
                        Some(&cursor) if if_missing => Ok(cursor),
                        Some(_) => Err(Error::SubscriptionExists {
                            topic: t.meta.name.to_string(),
                            subscription: subscription.to_string(),
                        }),
                        None => {
                            let cursor = match from {
                                StartFrom::Earliest => t.meta.log_start,
                                StartFrom::Latest => t.log_end,
                            };
                            txn.open_table(CURSORS)?.insert((topic, subscription.as_str()), cursor)?;
                            t.subscriptions.insert(subscription.to_string(), cursor);
                            Ok(cursor)
                        }
                    },
                };
                defer(deferred, reply, result);
            }
            Command::DeleteSubscription { topic, subscription, reply } => {
                let result = match self.topics.get_mut(&topic) {
                    None => Err(self.unknown(topic)),
                    Some(t) => match t.subscriptions.remove(subscription.as_str()) {
                        None => Err(Error::UnknownSubscription {
                            topic: t.meta.name.to_string(),
                            subscription: subscription.to_string(),
                        }),
                        Some(_) => {
                            txn.open_table(CURSORS)?.remove((topic, subscription.as_str()))?;
                            let before = t.meta.log_start;
                            advance_log_start(txn, t)?;
                            touched.insert(topic);
                            Ok(t.meta.log_start - before)
                        }
                    },
                };
                defer(deferred, reply, result);
            }
        }
        Ok(())
    }

    fn append(
        &mut self,
        txn: &WriteTransaction,
        topic: TopicId,
        producer: ProducerId,
        sequence: Sequence,
        records: Vec<Record>,
    ) -> StorageResult<Result<Appended, Error>> {
        let server = self.server;
        let Some(t) = self.topics.get_mut(&topic) else { return Ok(Err(self.unknown(topic))) };
        let epoch = t.meta.epoch;
        let state = t.producers.entry(producer).or_default();
        let known = !state.recent.is_empty();
        if known {
            if let Some(seen) = state.recent.iter().find(|b| b.sequence == sequence) {
                return Ok(if seen.rejected {
                    Err(Error::invalid(format!(
                        "batch {sequence} of producer {producer:#x} was rejected earlier"
                    )))
                } else {
                    Ok(Appended { base: seen.base, count: seen.count, epoch, duplicate: true })
                });
            }
            if sequence <= state.last_sequence {
                return Ok(Err(Error::invalid(format!(
                    "batch {sequence} of producer {producer:#x} is older than the dedup window of {PRODUCER_DEDUP_WINDOW} batches"
                ))));
            }
            if sequence != state.last_sequence + 1 {
                return Ok(Err(Error::OutOfOrderSequence {
                    producer,
                    expected: state.last_sequence + 1,
                    got: sequence,
                }));
            }
        }
        let limit = t.meta.config.max_record_bytes as u64;
        let too_large = records.iter().enumerate().find(|(_, r)| r.size() as u64 > limit);
        let base = t.log_end;
        let (result, outcome) = match too_large {
            Some((index, r)) => {
                let err = Error::RecordTooLarge {
                    index: index as u32,
                    size: r.size() as u64,
                    limit,
                    enforced_by: format!(
                        "topic server {server} (max_record_bytes of topic {:?})",
                        t.meta.name.as_str()
                    ),
                };
                (Err(err), BatchOutcome { sequence, base, count: 0, rejected: true })
            }
            None => {
                let now = now_ms();
                let mut table = txn.open_table(RECORDS)?;
                for (i, record) in records.iter().enumerate() {
                    self.buf.clear();
                    let bytes = postcard::to_extend(&(now, record), std::mem::take(&mut self.buf))
                        .expect("record encodes");
                    table.insert((topic, base + i as u64), bytes.as_slice())?;
                    self.buf = bytes;
                }
                let count = records.len() as u32;
                t.log_end += count as u64;
                (
                    Ok(Appended { base, count, epoch, duplicate: false }),
                    BatchOutcome { sequence, base, count, rejected: false },
                )
            }
        };
        state.last_sequence = sequence;
        state.recent.push_back(outcome);
        while state.recent.len() > PRODUCER_DEDUP_WINDOW {
            state.recent.pop_front();
        }
        let bytes = postcard::to_stdvec(&*state).expect("producer state encodes");
        txn.open_table(PRODUCERS)?.insert((topic, producer), bytes.as_slice())?;
        Ok(result)
    }

    fn ack(
        &mut self,
        txn: &WriteTransaction,
        topic: TopicId,
        subscription: &SubscriptionName,
        next: Offset,
    ) -> StorageResult<Result<Offset, Error>> {
        let unknown = self.unknown(topic);
        let Some(t) = self.topics.get_mut(&topic) else { return Ok(Err(unknown)) };
        let Some(cursor) = t.subscriptions.get_mut(subscription.as_str()) else {
            return Ok(Err(Error::UnknownSubscription {
                topic: t.meta.name.to_string(),
                subscription: subscription.to_string(),
            }));
        };
        if next > t.log_end {
            return Ok(Err(Error::OffsetBeyondEnd {
                topic: t.meta.name.to_string(),
                offset: next,
                log_end: t.log_end,
            }));
        }
        if next <= *cursor {
            return Ok(Ok(*cursor)); // cursors never move backwards
        }
        *cursor = next;
        txn.open_table(CURSORS)?.insert((topic, subscription.as_str()), next)?;
        advance_log_start(txn, t)?;
        Ok(Ok(next))
    }
}

/// Deletes records every subscription has passed (G6): the log start becomes the lowest
/// cursor. A topic without subscriptions keeps everything.
fn advance_log_start(txn: &WriteTransaction, t: &mut WriterTopic) -> StorageResult<()> {
    let Some(&lowest) = t.subscriptions.values().min() else { return Ok(()) };
    let new_start = lowest.min(t.log_end);
    if new_start <= t.meta.log_start {
        return Ok(());
    }
    let id = t.meta.id;
    txn.open_table(RECORDS)?.retain_in((id, t.meta.log_start)..(id, new_start), |_, _| false)?;
    t.meta.log_start = new_start;
    let bytes = postcard::to_stdvec(&t.meta).expect("meta encodes");
    txn.open_table(TOPICS)?.insert(id, bytes.as_slice())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: TopicId, name: &str) -> TopicMeta {
        TopicMeta {
            id,
            name: TopicName::new(name).unwrap(),
            config: TopicConfig { max_record_bytes: 64 },
            epoch: 1,
            role: Role::Leader,
            log_start: 0,
        }
    }

    fn records(values: &[&str]) -> Vec<Record> {
        values.iter().map(|v| Record { payload: v.as_bytes().to_vec(), ..Record::default() }).collect()
    }

    fn sub(name: &str) -> SubscriptionName {
        SubscriptionName::new(name).unwrap()
    }

    fn payloads(store: &Store, log: &TopicLog) -> Vec<(Offset, String)> {
        let s = log.state();
        store
            .read(log, s.log_start, s.commit, 1000, u32::MAX)
            .unwrap()
            .into_iter()
            .map(|r| (r.offset, String::from_utf8(r.record.payload).unwrap()))
            .collect()
    }

    #[tokio::test]
    async fn appends_are_dense_and_retries_are_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        let log = store.create_topic(meta(7, "t")).await.unwrap();
        let a = store.append(7, 42, 0, records(&["a", "b"])).await.unwrap();
        let b = store.append(7, 42, 1, records(&["c"])).await.unwrap();
        assert_eq!((a.base, a.count, b.base, b.count), (0, 2, 2, 1));
        // A retry of batch 0 gets its original offsets and stores nothing.
        let again = store.append(7, 42, 0, records(&["a", "b"])).await.unwrap();
        assert_eq!((again.base, again.count, again.duplicate), (0, 2, true));
        assert_eq!(log.state().log_end, 3);
        // A gap in the sequence is refused.
        let gap = store.append(7, 42, 5, records(&["x"])).await.unwrap_err();
        assert!(matches!(gap, Error::OutOfOrderSequence { expected: 2, got: 5, .. }), "{gap:?}");
        // Another producer interleaves freely.
        let other = store.append(7, 43, 0, records(&["d"])).await.unwrap();
        assert_eq!(other.base, 3);
        let got: Vec<_> = payloads(&store, &log).into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, ["a", "b", "c", "d"]);
    }

    #[tokio::test]
    async fn queued_appends_share_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        let log = store.create_topic(meta(1, "t")).await.unwrap();
        let before = store.commits();
        // 200 producers queue a batch each before any is awaited.
        let pending: Vec<_> = (0..200).map(|p| store.append(1, p, 0, records(&["r"]))).collect();
        for (p, fut) in pending.into_iter().enumerate() {
            assert_eq!(fut.await.unwrap().base, p as u64, "queue order is offset order");
        }
        let commits = store.commits() - before;
        assert!(commits < 20, "200 appends took {commits} commits: group commit is not grouping");
        assert_eq!(log.state().commit, 200);
    }

    #[tokio::test]
    async fn an_oversize_record_rejects_its_batch_whole_and_uses_its_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        let log = store.create_topic(meta(1, "t")).await.unwrap();
        let big = "x".repeat(65);
        let err = store.append(1, 9, 0, records(&["ok", &big])).await.unwrap_err();
        match err {
            Error::RecordTooLarge { index, size, limit, enforced_by } => {
                assert_eq!((index, size, limit), (1, 65, 64));
                assert!(enforced_by.contains("topic server 1"), "{enforced_by}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(log.state().log_end, 0, "nothing of the batch is stored");
        // The next batch of that producer is in order.
        assert_eq!(store.append(1, 9, 1, records(&["next"])).await.unwrap().base, 0);
    }

    #[tokio::test]
    async fn records_are_deleted_only_when_every_subscription_passed_them() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        let log = store.create_topic(meta(1, "t")).await.unwrap();
        store.append(1, 1, 0, records(&["0", "1", "2", "3", "4"])).await.unwrap();
        // No subscription: everything is kept, even as records age.
        assert_eq!(log.state().log_start, 0);
        store.create_subscription(1, sub("a"), StartFrom::Earliest, false).await.unwrap();
        store.create_subscription(1, sub("b"), StartFrom::Earliest, false).await.unwrap();
        assert_eq!(store.ack(1, sub("a"), 4).await.unwrap(), 4);
        assert_eq!(log.state().log_start, 0, "b still needs offset 0");
        assert_eq!(store.ack(1, sub("b"), 2).await.unwrap(), 2);
        assert_eq!(log.state().log_start, 2);
        assert_eq!(payloads(&store, &log).first().unwrap().0, 2);
        // Cursors never move backwards, and never past the end.
        assert_eq!(store.ack(1, sub("a"), 1).await.unwrap(), 4);
        assert!(matches!(store.ack(1, sub("a"), 6).await, Err(Error::OffsetBeyondEnd { .. })));
        // Deleting b frees what only it held.
        assert_eq!(store.delete_subscription(1, sub("b")).await.unwrap(), 2);
        assert_eq!(log.state().log_start, 4);
        // Deleting the last subscription keeps the rest for a later subscriber.
        assert_eq!(store.delete_subscription(1, sub("a")).await.unwrap(), 0);
        assert_eq!(store.create_subscription(1, sub("late"), StartFrom::Earliest, false).await.unwrap(), 4);
        assert_eq!(store.create_subscription(1, sub("new"), StartFrom::Latest, false).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn everything_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path(), None).unwrap();
            store.create_topic(meta(3, "kept")).await.unwrap();
            store.append(3, 5, 0, records(&["a", "b", "c"])).await.unwrap();
            store.create_subscription(3, sub("s"), StartFrom::Earliest, false).await.unwrap();
            store.create_subscription(3, sub("slow"), StartFrom::Earliest, false).await.unwrap();
            store.ack(3, sub("s"), 2).await.unwrap();
            store.ack(3, sub("slow"), 1).await.unwrap();
        }
        let (store, logs) = Store::open(dir.path(), None).unwrap();
        assert_eq!(logs.len(), 1);
        let log = &logs[0];
        assert_eq!(log.state(), LogState { log_start: 1, log_end: 3, commit: 3, epoch: 1 });
        assert_eq!(store.cursor(3, &sub("s")).unwrap(), Some(2));
        // The dedup window survived too.
        let again = store.append(3, 5, 0, records(&["a", "b", "c"])).await.unwrap();
        assert!(again.duplicate);
        // The data directory stays bound to its server id.
        let id = store.server_id();
        drop(store);
        assert!(Store::open(dir.path(), Some(id + 1)).is_err());
    }

    #[tokio::test]
    async fn deleting_a_topic_removes_its_data_and_a_new_id_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        store.create_topic(meta(1, "t")).await.unwrap();
        store.append(1, 1, 0, records(&["a", "b"])).await.unwrap();
        store.delete_topic(1).await.unwrap();
        assert_eq!(store.record_count().unwrap(), 0);
        let log = store.create_topic(meta(2, "t")).await.unwrap();
        assert_eq!(log.state().log_end, 0);
    }

    #[tokio::test]
    async fn commits_wake_waiting_readers() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        let log = store.create_topic(meta(1, "t")).await.unwrap();
        let mut watch = log.watch();
        watch.borrow_and_update();
        store.append(1, 1, 0, records(&["a"])).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), watch.changed()).await.unwrap().unwrap();
        assert_eq!(watch.borrow().commit, 1);
    }
}
