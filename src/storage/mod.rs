//! A topic server's storage: records, cursors, producer state and epoch history in redb.
//!
//! # Layout
//! One redb file per server (`DATA/herald.redb`), tables keyed by topic id:
//! - `topics`: id -> [`TopicMeta`] (name, config, last assignment, promised epoch, log start);
//! - `records`: (id, offset) -> [`StoredValue`] (timestamp, batch header on a batch's first
//!   record, [`Record`]);
//! - `cursors`: (id, subscription) -> (cursor or deleted, version), see
//!   [`CursorLog`](crate::replication::CursorLog);
//! - `producers`: (id, producer) -> [`ProducerState`] (dedup window);
//! - `epochs`: (id, epoch) -> first offset of that epoch ([`EpochHistory`]);
//! - `meta`: the server id this data directory belongs to, and its naming book's id.
//!
//! # Group commit
//! One writer thread owns every write (redb allows one write transaction at a time anyway).
//! It takes all queued commands, applies them in one write transaction and commits once with
//! `Durability::Immediate` (one fsync), then answers each command. Readers use their own read
//! transactions and never wait for the writer.
//!
//! # Who decides what
//! Storage keeps the log durable and consistent; the replication rules
//! ([`crate::replication`]) decide. The commit offset is theirs: the writer publishes the
//! durable log end, and the replication layer publishes the commit offset on the same watch
//! ([`TopicLog::set_commit`]). A topic with a single replica commits what is durable.
//!
//! # Invariants
//! - Offsets of a topic are dense: records exist exactly for `log_start..log_end`.
//! - Batches are whole: a batch's records are written in one transaction, and replicated whole.
//! - `log_start` only grows; it never passes the lowest committed cursor (once any
//!   subscription exists) nor the commit offset. A topic without subscriptions keeps its
//!   records.
//! - A cursor only moves forward and never past the commit offset.
//! - The published [`LogState`] only ever describes durable (fsynced) data.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::histogram::Histogram;
use redb::{
    Database, Key, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, Value, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::error::Error;
use crate::replication::{Cursor, CursorLog, EpochHistory};
use crate::types::{
    now_ms, Epoch, Offset, ProducerId, Sequence, ServerId, StartFrom, SubscriptionName, TopicId, TopicName,
};
use crate::wire::{
    BacklogPolicy, Record, ResetOutcome, ResetTo, StoredRecord, SubscriptionInfo, TopicConfig,
};

pub mod faults;

const TOPICS: TableDefinition<u64, &[u8]> = TableDefinition::new("topics");
const RECORDS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("records");
const CURSORS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("cursors");
const PRODUCERS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("producers");
const EPOCHS: TableDefinition<(u64, u64), u64> = TableDefinition::new("epochs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Batches a producer may have unacknowledged and still be deduplicated on retry. The client
/// keeps its in-flight window below this (`client::MAX_INFLIGHT`).
pub const PRODUCER_DEDUP_WINDOW: usize = 128;

/// Version of the on-disk layout (tables and value encodings). 2: topic policies in the
/// topic meta, eviction records in cursors.
pub const STORAGE_FORMAT: u64 = 2;

/// A producer silent this long is forgotten (its dedup state is dropped), so the state of
/// short-lived producers (every `herald produce` is one) does not pile up. A retry after that
/// long would be appended again; Kafka's default for the same is a day as well.
pub const PRODUCER_STATE_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// Batches a topic takes between two sweeps of its expired producers.
const PRODUCER_SWEEP_EVERY: u32 = 4096;

/// Records behind a cursor up to which its lag in bytes is summed exactly.
pub const LAG_BYTES_SCAN: u64 = 100_000;

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
    /// The replica set of the last assignment this server applied.
    pub replicas: Vec<ServerId>,
    /// The leader and epoch of the last assignment this server applied.
    pub leader: ServerId,
    pub epoch: Epoch,
    /// The newest epoch this replica promised to the naming server or followed: it refuses
    /// anything from an older one.
    pub promised: Epoch,
    pub log_start: Offset,
}

impl TopicMeta {
    /// A topic that is its own majority: it commits what is durable.
    pub fn is_solo(&self) -> bool {
        self.replicas.len() <= 1
    }
}

/// The shape of a topic's log, published after every commit that changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    pub log_start: Offset,
    /// One past the newest durable record.
    pub log_end: Offset,
    /// One past the newest record written, durable or not: a leader shows followers the
    /// batches of a group commit while its own fsync is under way (see [`TopicLog::staged`]).
    pub staged_end: Offset,
    /// One past the newest committed record: readable by consumers, acknowledged to
    /// producers. Set by the replication layer (equal to `log_end` for a single replica).
    pub commit: Offset,
    /// The newest epoch boundary adopted (see [`EpochHistory`]).
    pub epoch: Epoch,
    /// Epoch boundaries, consistent with `log_end`.
    pub history: Arc<EpochHistory>,
    /// Version of the newest cursor change held durably.
    pub cursor_version: u64,
    /// The newest cursor version known to be on a majority.
    pub cursor_commit: u64,
    /// The newest epoch this replica promised or followed.
    pub promised: Epoch,
    /// Bytes stored for `log_start..log_end` (the backlog).
    pub bytes: u64,
    /// Bytes deleted since this process opened the store (all subscriptions had read them).
    pub freed_bytes: u64,
    /// Records appended, and deleted, since this process opened the store.
    pub appended_records: u64,
    pub freed_records: u64,
}

/// A read handle on one topic: its identity and a watch on its durable and committed state.
#[derive(Debug)]
pub struct TopicLog {
    pub id: TopicId,
    pub name: TopicName,
    state: watch::Sender<LogState>,
    staged: Arc<Mutex<Vec<ReplicatedBatch>>>,
}

impl TopicLog {
    /// The batches of the group commit under way from `from` on (contiguous, whole batches,
    /// about `max_bytes` at most), or nothing if `from` is not where one of them starts.
    /// A leader serves them to followers so its fsync and theirs overlap; the majority rule
    /// still counts only durable copies, and a leader whose commit fails exits rather than
    /// reuse offsets its followers may already hold.
    pub fn staged(&self, from: Offset, max_bytes: usize) -> Vec<ReplicatedBatch> {
        let staged = self.staged.lock().expect("staged lock");
        let Some(first) = staged.iter().position(|b| b.base == from) else { return Vec::new() };
        let mut bytes = 0;
        let mut out = Vec::new();
        for b in &staged[first..] {
            if bytes >= max_bytes && !out.is_empty() {
                break;
            }
            bytes += b.records.iter().map(Record::size).sum::<usize>();
            out.push(b.clone());
        }
        out
    }

    pub fn state(&self) -> LogState {
        self.state.borrow().clone()
    }

    /// A receiver that wakes when the state changes.
    pub fn watch(&self) -> watch::Receiver<LogState> {
        self.state.subscribe()
    }

    /// Publishes a new commit offset (the replication layer's decision). The commit offset
    /// never moves backwards and never passes the durable log end.
    pub fn set_commit(&self, commit: Offset) {
        self.state.send_if_modified(|s| {
            let c = commit.min(s.log_end);
            if c > s.commit {
                s.commit = c;
                true
            } else {
                false
            }
        });
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    pub last_sequence: Sequence,
    /// Oldest first, at most [`PRODUCER_DEDUP_WINDOW`] entries.
    pub recent: VecDeque<BatchOutcome>,
    /// When its last batch was appended (the batch's timestamp, so replicas agree).
    pub last_ms: u64,
}

impl ProducerState {
    fn record(&mut self, outcome: BatchOutcome, at_ms: u64) {
        self.last_ms = self.last_ms.max(at_ms);
        self.last_sequence = outcome.sequence;
        self.recent.push_back(outcome);
        while self.recent.len() > PRODUCER_DEDUP_WINDOW {
            self.recent.pop_front();
        }
    }
}

/// How one batch of a producer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOutcome {
    pub sequence: Sequence,
    pub base: Offset,
    pub count: u32,
    /// The batch was refused (e.g. a record over the size limit); it still used its sequence
    /// number so the batches after it are not out of order.
    pub rejected: bool,
}

/// Who sent a batch, stored on the batch's first record so followers rebuild the leader's
/// dedup state from the log itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    pub producer: ProducerId,
    pub sequence: Sequence,
    pub count: u32,
}

/// A stored record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredValue {
    timestamp_ms: u64,
    header: Option<BatchHeader>,
    record: Record,
}

/// [`StoredValue`] borrowing its record, for writing (the same encoding).
#[derive(Serialize)]
struct StoredValueRef<'a> {
    timestamp_ms: u64,
    header: Option<BatchHeader>,
    record: &'a Record,
}

/// A whole batch as it travels from leader to follower.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedBatch {
    pub base: Offset,
    pub timestamp_ms: u64,
    /// `None` for a batch whose first record was already deleted at the leader.
    pub header: Option<BatchHeader>,
    pub records: Vec<Record>,
}

/// What a follower writes from one fetch answer, in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaChunk {
    /// The leader's epoch.
    pub epoch: Epoch,
    /// Whole batches from the follower's log end on.
    pub batches: Vec<ReplicatedBatch>,
    /// The leader's epoch boundaries; those the follower's log reaches are adopted.
    pub history: Vec<(Epoch, Offset)>,
    /// The leader's log start: the follower deletes below it (within what it holds).
    pub log_start: Offset,
    /// The leader's commit offset.
    pub commit: Offset,
    /// Cursor changes newer than the follower's cursor version.
    pub cursors: Vec<(String, Option<Cursor>, u64)>,
    /// The newest cursor version a majority holds.
    pub cursor_commit: u64,
}

/// A follower's restart from the leader's log start, after it fell behind the deletions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReset {
    pub log_start: Offset,
    pub history: Vec<(Epoch, Offset)>,
    pub producers: Vec<(ProducerId, ProducerState)>,
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A topic found in storage at open: its read handle and its stored meta.
pub type HostedTopic = (Arc<TopicLog>, TopicMeta);

enum Command {
    CreateTopic {
        meta: TopicMeta,
        reply: Reply<Arc<TopicLog>>,
    },
    DeleteTopic {
        id: TopicId,
        reply: Reply<()>,
    },
    Assign {
        topic: TopicId,
        replicas: Vec<ServerId>,
        leader: ServerId,
        epoch: Epoch,
        reply: Reply<()>,
    },
    Promise {
        topic: TopicId,
        epoch: Epoch,
        reply: Reply<(Epoch, Offset)>,
    },
    BecomeLeader {
        topic: TopicId,
        epoch: Epoch,
        reply: Reply<LogState>,
    },
    Append {
        topic: TopicId,
        producer: ProducerId,
        sequence: Sequence,
        records: Vec<Record>,
        reply: Reply<Appended>,
    },
    ReplicaAppend {
        topic: TopicId,
        chunk: ReplicaChunk,
        reply: Reply<LogState>,
    },
    Truncate {
        topic: TopicId,
        to: Offset,
        reply: Reply<LogState>,
    },
    Reset {
        topic: TopicId,
        reset: ReplicaReset,
        reply: Reply<LogState>,
    },
    Ack {
        topic: TopicId,
        subscription: SubscriptionName,
        next: Offset,
        reply: Reply<(Offset, u64)>,
    },
    ExpireProducers {
        topic: TopicId,
        cutoff_ms: u64,
        reply: Reply<usize>,
    },
    ReportEvicted {
        topic: TopicId,
        subscription: SubscriptionName,
        records: u64,
        reply: Reply<u64>,
    },
    ResetCursor {
        topic: TopicId,
        subscription: SubscriptionName,
        to: ResetTo,
        execute: bool,
        reply: Reply<(ResetOutcome, u64)>,
    },
    CreateSubscription {
        topic: TopicId,
        subscription: SubscriptionName,
        from: StartFrom,
        if_missing: bool,
        reply: Reply<(Offset, u64)>,
    },
    DeleteSubscription {
        topic: TopicId,
        subscription: SubscriptionName,
        reply: Reply<(u64, u64)>,
    },
    CommitCursors {
        topic: TopicId,
        version: u64,
        reply: Reply<u64>,
    },
    SetMeta {
        key: &'static str,
        value: u64,
        reply: Reply<()>,
    },
    SetConfig {
        topic: TopicId,
        config: TopicConfig,
        reply: Reply<()>,
    },
}

/// Where a store keeps its bytes.
#[derive(Debug, Clone, Default)]
pub enum Medium {
    /// `DATA/herald.redb`, durable once fsynced.
    #[default]
    File,
    /// The same file, but writes are held in memory until fsynced, so a `kill -9` loses what
    /// a power cut would (for power-loss tests; see [`faults::VolatileFile`]).
    VolatileFile,
    /// An in-memory disk a test can cut the power of or fail (see [`faults::SimDisk`]).
    Sim(faults::SimDisk),
}

/// A server's storage: the redb database and the writer thread in front of it.
pub struct Store {
    db: Arc<Database>,
    /// `None` only while dropping.
    tx: Option<mpsc::UnboundedSender<Command>>,
    writer: Option<std::thread::JoinHandle<()>>,
    server: ServerId,
    commits: Arc<AtomicU64>,
    commit_seconds: Histogram,
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

fn stopped() -> Error {
    Error::Unavailable { detail: "the storage writer has stopped".into() }
}

impl Store {
    /// Opens (or creates) the store in `dir`. The data directory is bound to one server id:
    /// `requested` must match the stored id if there is one; without either, a random id is
    /// chosen and kept. Returns the store, and a handle and the meta of every hosted topic.
    pub fn open(dir: &Path, requested: Option<ServerId>) -> anyhow::Result<(Store, Vec<HostedTopic>)> {
        Self::open_on(dir, requested, &Medium::File)
    }

    /// [`open`](Self::open) on a chosen [`Medium`].
    pub fn open_on(
        dir: &Path,
        requested: Option<ServerId>,
        medium: &Medium,
    ) -> anyhow::Result<(Store, Vec<HostedTopic>)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("herald.redb");
        let mut builder = Database::builder();
        builder.set_cache_size(CACHE_BYTES);
        let opened = match medium {
            Medium::File => builder.create(&path),
            Medium::VolatileFile => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?;
                builder.create_with_backend(faults::VolatileFile::new(file)?)
            }
            Medium::Sim(disk) => builder.create_with_backend(disk.backend()),
        };
        let db = opened.map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        let server = {
            let txn = db.begin_write()?;
            let id = {
                let mut meta = txn.open_table(META)?;
                let stored = meta.get("server_id")?.map(|v| v.value());
                // A directory from before the format was recorded is format 1.
                let format = meta.get("format")?.map(|v| v.value()).or(stored.map(|_| 1));
                if let Some(f) = format.filter(|f| *f != STORAGE_FORMAT) {
                    anyhow::bail!(
                        "{} holds data in storage format {f}; this Herald reads format {STORAGE_FORMAT} (no migration between them yet: use a new --data directory)",
                        dir.display()
                    );
                }
                meta.insert("format", STORAGE_FORMAT)?;
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
        let commits = Arc::new(AtomicU64::new(0));
        let commit_seconds = crate::metrics::commit_histogram();
        let mut writer = Writer {
            db: db.clone(),
            server,
            topics: HashMap::new(),
            buf: Vec::new(),
            commits: commits.clone(),
            commit_seconds: commit_seconds.clone(),
        };
        let logs = writer.load()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = std::thread::Builder::new()
            .name(format!("herald-writer-{server}"))
            .spawn(move || writer.run(rx))?;
        Ok((Store { db, tx: Some(tx), writer: Some(writer), server, commits, commit_seconds }, logs))
    }

    pub fn server_id(&self) -> ServerId {
        self.server
    }

    /// How long group commits (write transaction and fsync) take, in seconds.
    pub fn commit_seconds(&self) -> &Histogram {
        &self.commit_seconds
    }

    /// Group commits (write transactions, each one fsync) done since the store was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    fn sender(&self) -> &mpsc::UnboundedSender<Command> {
        self.tx.as_ref().expect("the sender lives until drop")
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.sender().send(make(reply)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Starts hosting a topic (idempotent: an existing id keeps its data).
    pub async fn create_topic(&self, meta: TopicMeta) -> Result<Arc<TopicLog>, Error> {
        self.call(|reply| Command::CreateTopic { meta, reply }).await
    }

    /// Drops a topic and all its records, cursors and producer state.
    pub async fn delete_topic(&self, id: TopicId) -> Result<(), Error> {
        self.call(|reply| Command::DeleteTopic { id, reply }).await
    }

    /// Records the naming server's latest assignment (kept for restarts).
    pub async fn assign(
        &self,
        topic: TopicId,
        replicas: Vec<ServerId>,
        leader: ServerId,
        epoch: Epoch,
    ) -> Result<(), Error> {
        self.call(|reply| Command::Assign { topic, replicas, leader, epoch, reply }).await
    }

    /// Durably promises `epoch` (refusing older epochs from now on); returns this replica's
    /// `(last epoch, log end)` for the election.
    pub async fn promise(&self, topic: TopicId, epoch: Epoch) -> Result<(Epoch, Offset), Error> {
        self.call(|reply| Command::Promise { topic, epoch, reply }).await
    }

    /// Durably starts `epoch` at the current log end, as its leader.
    pub async fn become_leader(&self, topic: TopicId, epoch: Epoch) -> Result<LogState, Error> {
        self.call(|reply| Command::BecomeLeader { topic, epoch, reply }).await
    }

    /// Queues a batch for the next group commit. The queueing happens now, in call order, so
    /// batches of one stream keep their order; the returned future resolves once the batch is
    /// durable: `Durability::Immediate` means fsynced before the commit returns, so an `Ok`
    /// here is safe against `kill -9` and power loss on this replica.
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
            sent.map_err(|_| stopped())?;
            rx.await.map_err(|_| stopped())?
        }
    }

    /// Follower: writes what the leader sent, durably; returns the new state.
    pub async fn replica_append(&self, topic: TopicId, chunk: ReplicaChunk) -> Result<LogState, Error> {
        self.call(|reply| Command::ReplicaAppend { topic, chunk, reply }).await
    }

    /// Follower: drops the divergent tail from `to` on.
    pub async fn truncate(&self, topic: TopicId, to: Offset) -> Result<LogState, Error> {
        self.call(|reply| Command::Truncate { topic, to, reply }).await
    }

    /// Follower: drops everything and restarts at the leader's log start.
    pub async fn reset(&self, topic: TopicId, reset: ReplicaReset) -> Result<LogState, Error> {
        self.call(|reply| Command::Reset { topic, reset, reply }).await
    }

    /// Leader: moves a subscription's cursor forward to `next` (at most `commit`); returns
    /// the cursor after the move and the version of the change.
    pub async fn ack(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
        next: Offset,
    ) -> Result<(Offset, u64), Error> {
        self.call(|reply| Command::Ack { topic, subscription, next, reply }).await
    }

    /// Leader: moves a subscription's cursor anywhere in `log_start..=commit`, backwards
    /// too (or, without `execute`, only says where); returns the outcome and the change's
    /// version (0 if nothing changed).
    pub async fn reset_cursor(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
        to: ResetTo,
        execute: bool,
    ) -> Result<(ResetOutcome, u64), Error> {
        self.call(|reply| Command::ResetCursor { topic, subscription, to, execute, reply }).await
    }

    /// Forgets the producers of a topic whose last batch is older than `cutoff_ms` (done on
    /// its own every few thousand batches with [`PRODUCER_STATE_TTL_MS`]); returns how many.
    pub async fn expire_producers(&self, topic: TopicId, cutoff_ms: u64) -> Result<usize, Error> {
        self.call(|reply| Command::ExpireProducers { topic, cutoff_ms, reply }).await
    }

    /// Leader: notes that a consumer was told of `records` evicted records.
    pub async fn report_evicted(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
        records: u64,
    ) -> Result<u64, Error> {
        self.call(|reply| Command::ReportEvicted { topic, subscription, records, reply }).await
    }

    /// Leader: creates a subscription; returns its cursor and the change's version.
    pub async fn create_subscription(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
        from: StartFrom,
        if_missing: bool,
    ) -> Result<(Offset, u64), Error> {
        self.call(|reply| Command::CreateSubscription { topic, subscription, from, if_missing, reply }).await
    }

    /// Leader: deletes a subscription; returns the change's version and how many records
    /// that freed (for a single replica; replicated topics free them when the change commits).
    pub async fn delete_subscription(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
    ) -> Result<(u64, u64), Error> {
        self.call(|reply| Command::DeleteSubscription { topic, subscription, reply }).await
    }

    /// Marks cursor changes up to `version` as committed and moves the log start to the
    /// lowest committed cursor (within the commit offset); returns how many records that freed.
    pub async fn commit_cursors(&self, topic: TopicId, version: u64) -> Result<u64, Error> {
        self.call(|reply| Command::CommitCursors { topic, version, reply }).await
    }

    /// A number kept in the `meta` table (e.g. the naming book this server belongs to).
    pub fn meta(&self, key: &str) -> Result<Option<u64>, Error> {
        let txn = self.read_txn()?;
        let table = txn.open_table(META).map_err(|e| self.storage_err(e))?;
        let value = table.get(key).map_err(|e| self.storage_err(e))?;
        Ok(value.map(|v| v.value()))
    }

    pub async fn set_meta(&self, key: &'static str, value: u64) -> Result<(), Error> {
        self.call(|reply| Command::SetMeta { key, value, reply }).await
    }

    /// Stores a topic's policies as the book last gave them, so a restarted replica that
    /// leads before it hears from the naming server enforces them.
    pub async fn set_config(&self, topic: TopicId, config: TopicConfig) -> Result<(), Error> {
        self.call(|reply| Command::SetConfig { topic, config, reply }).await
    }

    fn storage_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Storage { server: self.server, detail: e.to_string() }
    }

    fn read_txn(&self) -> Result<ReadTransaction, Error> {
        self.db.begin_read().map_err(|e| self.storage_err(e))
    }

    /// Reads records `from..end` (at most `max_records`, and at most `max_bytes` of payload
    /// beyond the first record).
    pub fn read(
        &self,
        topic: &TopicLog,
        from: Offset,
        end: Offset,
        max_records: u32,
        max_bytes: u32,
    ) -> Result<Vec<StoredRecord>, Error> {
        let txn = self.read_txn()?;
        let table = txn.open_table(RECORDS).map_err(|e| self.storage_err(e))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for entry in table.range((topic.id, from)..(topic.id, end)).map_err(|e| self.storage_err(e))? {
            let (key, value) = entry.map_err(|e| self.storage_err(e))?;
            let v: StoredValue = decode(value.value()).map_err(|e| self.storage_err(e))?;
            bytes += v.record.size();
            out.push(StoredRecord { offset: key.value().1, timestamp_ms: v.timestamp_ms, record: v.record });
            if out.len() >= max_records as usize || bytes >= max_bytes as usize {
                break;
            }
        }
        Ok(out)
    }

    /// Reads whole batches from `from` up to `end`, stopping at a batch boundary once
    /// `max_bytes` are gathered (for a follower).
    pub fn read_batches(
        &self,
        topic: TopicId,
        from: Offset,
        end: Offset,
        max_bytes: usize,
    ) -> Result<Vec<ReplicatedBatch>, Error> {
        let txn = self.read_txn()?;
        let table = txn.open_table(RECORDS).map_err(|e| self.storage_err(e))?;
        let mut out: Vec<ReplicatedBatch> = Vec::new();
        let mut bytes = 0usize;
        for entry in table.range((topic, from)..(topic, end)).map_err(|e| self.storage_err(e))? {
            let (key, value) = entry.map_err(|e| self.storage_err(e))?;
            let v: StoredValue = decode(value.value()).map_err(|e| self.storage_err(e))?;
            let offset = key.value().1;
            let starts_batch = v.header.is_some() || out.is_empty();
            if starts_batch {
                if bytes >= max_bytes {
                    break;
                }
                out.push(ReplicatedBatch {
                    base: offset,
                    timestamp_ms: v.timestamp_ms,
                    header: v.header,
                    records: Vec::new(),
                });
            }
            bytes += v.record.size();
            out.last_mut().expect("a batch").records.push(v.record);
        }
        Ok(out)
    }

    /// A subscription's cursor (latest, committed or not).
    pub fn cursor(&self, topic: TopicId, subscription: &SubscriptionName) -> Result<Option<Cursor>, Error> {
        let txn = self.read_txn()?;
        let table = txn.open_table(CURSORS).map_err(|e| self.storage_err(e))?;
        let value = table.get((topic, subscription.as_str())).map_err(|e| self.storage_err(e))?;
        match value {
            None => Ok(None),
            Some(v) => Ok(decode::<(Option<Cursor>, u64)>(v.value()).map_err(|e| self.storage_err(e))?.0),
        }
    }

    /// Every live subscription of a topic with its cursor and lag behind the commit offset of
    /// `state`. Lag in bytes is summed over the records when at most [`LAG_BYTES_SCAN`] are
    /// behind, and estimated from the topic's average stored record beyond that, so a
    /// listing or a metrics scrape costs the same however large a backlog grows.
    pub fn subscriptions(&self, topic: TopicId, state: &LogState) -> Result<Vec<SubscriptionInfo>, Error> {
        let commit = state.commit;
        let txn = self.read_txn()?;
        let table = txn.open_table(CURSORS).map_err(|e| self.storage_err(e))?;
        let mut out = Vec::new();
        for entry in table.range((topic, "")..(topic + 1, "")).map_err(|e| self.storage_err(e))? {
            let (key, value) = entry.map_err(|e| self.storage_err(e))?;
            let (cursor, _): (Option<Cursor>, u64) =
                decode(value.value()).map_err(|e| self.storage_err(e))?;
            if let Some(c) = cursor {
                let name = SubscriptionName::new(key.value().1).map_err(|e| self.storage_err(e))?;
                out.push(SubscriptionInfo {
                    name,
                    cursor: c.next,
                    lag: commit.saturating_sub(c.next),
                    lag_bytes: 0,
                    last_ack_ms: None,
                    consumer: None,
                    evicted: c.evicted,
                    evicted_at_ms: (c.evicted_at_ms > 0).then_some(c.evicted_at_ms),
                });
            }
        }
        drop(table);
        let records = txn.open_table(RECORDS).map_err(|e| self.storage_err(e))?;
        let stored = state.log_end.saturating_sub(state.log_start).max(1);
        for sub in &mut out {
            if sub.lag > LAG_BYTES_SCAN {
                sub.lag_bytes = (sub.lag as u128 * state.bytes as u128 / stored as u128) as u64;
            } else if sub.cursor < commit {
                for entry in
                    records.range((topic, sub.cursor)..(topic, commit)).map_err(|e| self.storage_err(e))?
                {
                    sub.lag_bytes += entry.map_err(|e| self.storage_err(e))?.1.value().len() as u64;
                }
            }
        }
        Ok(out)
    }

    /// Cursor changes newer than `version`, in version order (for a follower).
    pub fn cursor_changes(
        &self,
        topic: TopicId,
        version: u64,
    ) -> Result<Vec<(String, Option<Cursor>, u64)>, Error> {
        let txn = self.read_txn()?;
        let table = txn.open_table(CURSORS).map_err(|e| self.storage_err(e))?;
        let mut out = Vec::new();
        for entry in table.range((topic, "")..(topic + 1, "")).map_err(|e| self.storage_err(e))? {
            let (key, value) = entry.map_err(|e| self.storage_err(e))?;
            let (cursor, v): (Option<Cursor>, u64) =
                decode(value.value()).map_err(|e| self.storage_err(e))?;
            if v > version {
                out.push((key.value().1.to_string(), cursor, v));
            }
        }
        out.sort_by_key(|c| c.2);
        Ok(out)
    }

    /// The dedup state of every producer of a topic (sent to a follower that is reset).
    pub fn producer_states(&self, topic: TopicId) -> Result<Vec<(ProducerId, ProducerState)>, Error> {
        let txn = self.read_txn()?;
        let table = txn.open_table(PRODUCERS).map_err(|e| self.storage_err(e))?;
        let mut out = Vec::new();
        for entry in table.range((topic, 0)..=(topic, u64::MAX)).map_err(|e| self.storage_err(e))? {
            let (key, value) = entry.map_err(|e| self.storage_err(e))?;
            out.push((key.value().1, decode(value.value()).map_err(|e| self.storage_err(e))?));
        }
        Ok(out)
    }

    /// Number of records stored for all topics (for tests and diagnostics).
    pub fn record_count(&self) -> Result<u64, Error> {
        let txn = self.read_txn()?;
        let table = txn.open_table(RECORDS).map_err(|e| self.storage_err(e))?;
        table.len().map_err(|e| self.storage_err(e))
    }
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("storage values encode")
}

/// The writer thread's view of one topic.
struct WriterTopic {
    meta: TopicMeta,
    log_end: Offset,
    /// A follower's latest word from the leader on the commit offset; published with the
    /// durable state once this replica's own write has committed.
    leader_commit: Offset,
    history: EpochHistory,
    cursors: CursorLog,
    producers: HashMap<ProducerId, ProducerState>,
    state: watch::Sender<LogState>,
    /// Bytes stored for `log_start..log_end`.
    bytes: u64,
    /// Bytes deleted since the store was opened.
    freed_bytes: u64,
    /// Records appended, and deleted, since the store was opened.
    appended_records: u64,
    freed_records: u64,
    /// The last eviction's reach, while its records wait to be deleted (see [`make_room`]).
    evicting: Option<Evicting>,
    /// Batches since expired producers were last swept.
    batches_since_sweep: u32,
    /// Batches appended in the group under way, not yet shown to followers.
    appended: Vec<ReplicatedBatch>,
    /// Batches of the group under way shown to followers (the leader's side of
    /// [`TopicLog::staged`]); emptied once the group is durable.
    staged: Arc<Mutex<Vec<ReplicatedBatch>>>,
}

impl WriterTopic {
    fn handle(&self) -> Arc<TopicLog> {
        Arc::new(TopicLog {
            id: self.meta.id,
            name: self.meta.name.clone(),
            state: self.state.clone(),
            staged: self.staged.clone(),
        })
    }

    /// Shows followers the batches appended in this group before it is durable. Returns
    /// whether there were any.
    fn stage(&mut self) -> bool {
        if self.appended.is_empty() {
            return false;
        }
        self.staged.lock().expect("staged lock").append(&mut self.appended);
        let end = self.log_end;
        self.state.send_modify(|s| s.staged_end = end);
        true
    }

    /// Publishes the durable state; a single replica's commit follows its log end.
    fn publish(&self) {
        let solo = self.meta.is_solo();
        self.staged.lock().expect("staged lock").clear();
        self.state.send_modify(|s| {
            s.log_start = self.meta.log_start;
            s.log_end = self.log_end;
            s.staged_end = self.log_end;
            s.epoch = self.history.last_epoch();
            if *s.history != self.history {
                s.history = Arc::new(self.history.clone());
            }
            s.cursor_version = self.cursors.version();
            s.cursor_commit = self.cursors.committed_version();
            s.promised = self.meta.promised;
            s.bytes = self.bytes;
            s.freed_bytes = self.freed_bytes;
            s.appended_records = self.appended_records;
            s.freed_records = self.freed_records;
            s.commit = if solo {
                self.log_end
            } else {
                s.commit.max(self.leader_commit).min(self.log_end).max(self.meta.log_start)
            };
        });
    }

    fn name(&self) -> String {
        self.meta.name.to_string()
    }

    fn unknown_subscription(&self, subscription: &str) -> Error {
        Error::UnknownSubscription { topic: self.name(), subscription: subscription.to_string() }
    }
}

struct Writer {
    db: Arc<Database>,
    server: ServerId,
    topics: HashMap<TopicId, WriterTopic>,
    buf: Vec<u8>,
    commits: Arc<AtomicU64>,
    commit_seconds: Histogram,
}

/// A group's write transaction, knowing whether anything was written: a group that wrote
/// nothing (e.g. a follower told only of a new commit offset) is not committed, as a redb
/// commit costs a write and an fsync even when empty.
struct Tx {
    txn: WriteTransaction,
    wrote: Cell<bool>,
}

impl Tx {
    fn open<K: Key + 'static, V: Value + 'static>(
        &self,
        table: TableDefinition<K, V>,
    ) -> Result<Table<'_, K, V>, redb::TableError> {
        self.wrote.set(true);
        self.txn.open_table(table)
    }

    /// Commits what was written; returns whether there was anything.
    fn finish(self) -> StorageResult<bool> {
        if self.wrote.get() {
            self.txn.commit()?;
        } else {
            self.txn.abort()?;
        }
        Ok(self.wrote.get())
    }
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

/// A reply whose value is computed after the commit (the published state).
fn defer_state(
    deferred: &mut Deferred,
    reply: Reply<LogState>,
    result: Result<(), Error>,
    state: watch::Receiver<LogState>,
) {
    deferred.push(Box::new(move |commit| {
        let _ = reply.send(commit.and(result).map(|_| state.borrow().clone()));
    }));
}

impl Writer {
    /// Rebuilds the in-memory view from the committed tables (at open, and after a failed
    /// commit, so memory never runs ahead of disk).
    fn load(&mut self) -> anyhow::Result<Vec<HostedTopic>> {
        let txn = self.db.begin_read()?;
        let topics = txn.open_table(TOPICS)?;
        let records = txn.open_table(RECORDS)?;
        let cursors = txn.open_table(CURSORS)?;
        let producers = txn.open_table(PRODUCERS)?;
        let epochs = txn.open_table(EPOCHS)?;
        let old = std::mem::take(&mut self.topics);
        let mut logs = Vec::new();
        for entry in topics.iter()? {
            let (_, value) = entry?;
            let meta: TopicMeta = decode(value.value())?;
            let id = meta.id;
            let log_end = records
                .range((id, 0)..=(id, u64::MAX))?
                .next_back()
                .transpose()?
                .map(|(k, _)| k.value().1 + 1)
                .unwrap_or(0)
                .max(meta.log_start);
            let mut bytes = 0;
            for entry in records.range((id, 0)..=(id, u64::MAX))? {
                bytes += entry?.1.value().len() as u64;
            }
            let mut history = Vec::new();
            for entry in epochs.range((id, 0)..=(id, u64::MAX))? {
                let (k, v) = entry?;
                history.push((k.value().1, v.value()));
            }
            let mut changes = Vec::new();
            for entry in cursors.range((id, "")..(id + 1, ""))? {
                let (k, v) = entry?;
                let (cursor, version): (Option<Cursor>, u64) = decode(v.value())?;
                changes.push((k.value().1.to_string(), cursor, version));
            }
            changes.sort_by_key(|c| c.2);
            let mut cursor_log = CursorLog::default();
            for (name, cursor, version) in changes {
                cursor_log.apply(&name, cursor, version);
            }
            if meta.is_solo() {
                cursor_log.commit(cursor_log.version());
            }
            let mut producer_state = HashMap::new();
            for entry in producers.range((id, 0)..=(id, u64::MAX))? {
                let (k, v) = entry?;
                producer_state.insert(k.value().1, decode(v.value())?);
            }
            let history = EpochHistory::new(history);
            let state = LogState {
                log_start: meta.log_start,
                log_end,
                staged_end: log_end,
                commit: if meta.is_solo() { log_end } else { meta.log_start },
                epoch: history.last_epoch(),
                history: Arc::new(history.clone()),
                cursor_version: cursor_log.version(),
                cursor_commit: cursor_log.committed_version(),
                promised: meta.promised,
                bytes,
                freed_bytes: 0,
                appended_records: 0,
                freed_records: 0,
            };
            // Keep existing watch channels so handles held by the server stay live.
            let (sender, staged) = match old.get(&id) {
                Some(t) => {
                    let commit = t.state.borrow().commit.min(log_end);
                    t.state.send_replace(LogState { commit: commit.max(state.commit), ..state });
                    t.staged.lock().expect("staged lock").clear();
                    (t.state.clone(), t.staged.clone())
                }
                None => (watch::Sender::new(state), Arc::default()),
            };
            let topic = WriterTopic {
                meta: meta.clone(),
                log_end,
                leader_commit: 0,
                history,
                cursors: cursor_log,
                producers: producer_state,
                state: sender,
                bytes,
                freed_bytes: 0,
                appended_records: 0,
                freed_records: 0,
                evicting: None,
                batches_since_sweep: 0,
                appended: Vec::new(),
                staged,
            };
            logs.push((topic.handle(), meta));
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
            let mut shown = false;
            let outcome = self.db.begin_write().map_err(redb::Error::from).and_then(|txn| {
                let txn = Tx { txn, wrote: Cell::new(false) };
                for cmd in batch.drain(..) {
                    self.apply(&txn, cmd, &mut deferred, &mut touched)?;
                }
                for id in &touched {
                    if let Some(t) = self.topics.get_mut(id) {
                        shown |= t.stage();
                    }
                }
                let started = std::time::Instant::now();
                let committed = txn.finish()?;
                if committed {
                    self.commit_seconds.observe(started.elapsed().as_secs_f64());
                }
                Ok(committed)
            });
            match outcome {
                Ok(committed) => {
                    self.commits.fetch_add(committed as u64, Ordering::Relaxed);
                    for id in touched {
                        if let Some(t) = self.topics.get(&id) {
                            t.publish();
                        }
                    }
                    deferred.into_iter().for_each(|answer| answer(Ok(())));
                }
                Err(e) if shown => {
                    // Followers may hold records of this group already: reusing their offsets
                    // for other records would fork the log. Stop; the naming server elects a
                    // replica that holds them, and this one truncates when it returns.
                    error!(server = self.server, error = %e, "group commit failed after followers saw it; exiting");
                    std::process::exit(74);
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

    fn not_hosted(&self, id: TopicId) -> Error {
        Error::NotLeader { topic: format!("#{id}"), server: self.server, leader: None }
    }

    fn apply(
        &mut self,
        txn: &Tx,
        cmd: Command,
        deferred: &mut Deferred,
        touched: &mut HashSet<TopicId>,
    ) -> StorageResult<()> {
        let server = self.server;
        match cmd {
            Command::CreateTopic { meta, reply } => {
                let id = meta.id;
                if let std::collections::hash_map::Entry::Vacant(slot) = self.topics.entry(id) {
                    txn.open(TOPICS)?.insert(id, encode(&meta).as_slice())?;
                    let mut history = EpochHistory::default();
                    if meta.is_solo() || meta.leader == server {
                        // The first leader's epoch starts the log; followers adopt it by fetching.
                        history.assign(meta.epoch, meta.log_start);
                        txn.open(EPOCHS)?.insert((id, meta.epoch), meta.log_start)?;
                    }
                    let state = LogState {
                        log_start: meta.log_start,
                        log_end: meta.log_start,
                        staged_end: meta.log_start,
                        commit: meta.log_start,
                        epoch: history.last_epoch(),
                        history: Arc::new(history.clone()),
                        cursor_version: 0,
                        cursor_commit: 0,
                        promised: meta.promised,
                        bytes: 0,
                        freed_bytes: 0,
                        appended_records: 0,
                        freed_records: 0,
                    };
                    slot.insert(WriterTopic {
                        log_end: meta.log_start,
                        leader_commit: 0,
                        meta,
                        history,
                        cursors: CursorLog::default(),
                        producers: HashMap::new(),
                        state: watch::Sender::new(state),
                        bytes: 0,
                        freed_bytes: 0,
                        appended_records: 0,
                        freed_records: 0,
                        evicting: None,
                        batches_since_sweep: 0,
                        appended: Vec::new(),
                        staged: Arc::default(),
                    });
                }
                touched.insert(id);
                let handle = self.topics[&id].handle();
                defer(deferred, reply, Ok(handle));
            }
            Command::DeleteTopic { id, reply } => {
                if self.topics.remove(&id).is_some() {
                    txn.open(TOPICS)?.remove(id)?;
                    txn.open(RECORDS)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                    txn.open(CURSORS)?.retain_in((id, "")..(id + 1, ""), |_, _| false)?;
                    txn.open(PRODUCERS)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                    txn.open(EPOCHS)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                }
                defer(deferred, reply, Ok(()));
            }
            Command::SetMeta { key, value, reply } => {
                txn.open(META)?.insert(key, value)?;
                defer(deferred, reply, Ok(()));
            }
            Command::SetConfig { topic, config, reply } => {
                let result = match self.topics.get_mut(&topic) {
                    None => Err(self.not_hosted(topic)),
                    Some(t) => {
                        // The record size limit is fixed at creation; policies may change.
                        t.meta.config =
                            TopicConfig { max_record_bytes: t.meta.config.max_record_bytes, ..config };
                        txn.open(TOPICS)?.insert(topic, encode(&t.meta).as_slice())?;
                        Ok(())
                    }
                };
                defer(deferred, reply, result);
            }
            Command::Assign { topic, replicas, leader, epoch, reply } => {
                let result = match self.topics.get_mut(&topic) {
                    None => Err(self.not_hosted(topic)),
                    Some(t) => {
                        t.meta.replicas = replicas;
                        t.meta.leader = leader;
                        t.meta.epoch = t.meta.epoch.max(epoch);
                        t.meta.promised = t.meta.promised.max(epoch);
                        txn.open(TOPICS)?.insert(topic, encode(&t.meta).as_slice())?;
                        touched.insert(topic);
                        Ok(())
                    }
                };
                defer(deferred, reply, result);
            }
            Command::Promise { topic, epoch, reply } => {
                let result = match self.topics.get_mut(&topic) {
                    None => Err(self.not_hosted(topic)),
                    Some(t) => {
                        if epoch > t.meta.promised {
                            t.meta.promised = epoch;
                            txn.open(TOPICS)?.insert(topic, encode(&t.meta).as_slice())?;
                        }
                        Ok((t.history.last_epoch(), t.log_end))
                    }
                };
                defer(deferred, reply, result);
            }
            Command::BecomeLeader { topic, epoch, reply } => {
                let Some(t) = self.topics.get_mut(&topic) else {
                    defer(deferred, reply, Err(self.not_hosted(topic)));
                    return Ok(());
                };
                let result = if epoch < t.meta.promised {
                    Err(Error::StaleEpoch { topic: t.name(), server, epoch, current: t.meta.promised })
                } else {
                    if t.history.assign(epoch, t.log_end) {
                        txn.open(EPOCHS)?.insert((topic, epoch), t.log_end)?;
                    }
                    t.evicting = None;
                    t.meta.promised = epoch;
                    t.meta.epoch = epoch;
                    t.meta.leader = server;
                    txn.open(TOPICS)?.insert(topic, encode(&t.meta).as_slice())?;
                    touched.insert(topic);
                    Ok(())
                };
                defer_state(deferred, reply, result, t.state.subscribe());
            }
            Command::Append { topic, producer, sequence, records, reply } => {
                let result = self.append(txn, topic, producer, sequence, records)?;
                if result.as_ref().is_ok_and(|a| !a.duplicate && a.count > 0) {
                    touched.insert(topic);
                }
                defer(deferred, reply, result);
            }
            Command::ReplicaAppend { topic, chunk, reply } => {
                let result = self.replica_append(txn, topic, chunk)?;
                touched.insert(topic);
                let state = self.topics.get(&topic).map(|t| t.state.subscribe());
                match state {
                    Some(state) => defer_state(deferred, reply, result, state),
                    None => defer(deferred, reply, Err(self.not_hosted(topic))),
                }
            }
            Command::Truncate { topic, to, reply } => {
                let Some(t) = self.topics.get_mut(&topic) else {
                    defer(deferred, reply, Err(self.not_hosted(topic)));
                    return Ok(());
                };
                let to = to.clamp(t.meta.log_start, t.log_end);
                t.leader_commit = t.leader_commit.min(to);
                t.evicting = None;
                if to < t.log_end {
                    info!(topic = %t.meta.name, from = to, to = t.log_end, "truncating a divergent tail");
                    t.bytes -= delete_records(txn, topic, to..t.log_end)?;
                    t.log_end = to;
                }
                let dropped: Vec<Epoch> =
                    t.history.entries().iter().filter(|(_, s)| *s >= to).map(|(e, _)| *e).collect();
                t.history.truncate(to);
                let mut epochs = txn.open(EPOCHS)?;
                for e in dropped {
                    epochs.remove((topic, e))?;
                }
                // Forget the dedup entries of truncated batches.
                let mut producers = txn.open(PRODUCERS)?;
                for (id, state) in t.producers.iter_mut() {
                    let before = state.recent.len();
                    state.recent.retain(|b| b.base < to || (b.count == 0 && b.base <= to));
                    if state.recent.len() != before {
                        state.last_sequence = state.recent.back().map_or(0, |b| b.sequence);
                        producers.insert((topic, *id), encode(&*state).as_slice())?;
                    }
                }
                touched.insert(topic);
                defer_state(deferred, reply, Ok(()), t.state.subscribe());
            }
            Command::Reset { topic, reset, reply } => {
                let Some(t) = self.topics.get_mut(&topic) else {
                    defer(deferred, reply, Err(self.not_hosted(topic)));
                    return Ok(());
                };
                info!(topic = %t.meta.name, log_start = reset.log_start, "restarting the replica at the leader's log start");
                t.evicting = None;
                delete_records(txn, topic, 0..u64::MAX)?;
                t.bytes = 0;
                let mut epochs = txn.open(EPOCHS)?;
                epochs.retain_in((topic, 0)..=(topic, u64::MAX), |_, _| false)?;
                let history: Vec<(Epoch, Offset)> =
                    reset.history.into_iter().filter(|(_, s)| *s <= reset.log_start).collect();
                for (e, s) in &history {
                    epochs.insert((topic, *e), *s)?;
                }
                t.history = EpochHistory::new(history);
                let mut producers = txn.open(PRODUCERS)?;
                producers.retain_in((topic, 0)..=(topic, u64::MAX), |_, _| false)?;
                t.producers.clear();
                for (id, state) in reset.producers {
                    producers.insert((topic, id), encode(&state).as_slice())?;
                    t.producers.insert(id, state);
                }
                t.meta.log_start = reset.log_start;
                t.log_end = reset.log_start;
                txn.open(TOPICS)?.insert(topic, encode(&t.meta).as_slice())?;
                touched.insert(topic);
                defer_state(deferred, reply, Ok(()), t.state.subscribe());
            }
            Command::ExpireProducers { topic, cutoff_ms, reply } => {
                let result = match self.topics.get_mut(&topic) {
                    None => Err(self.not_hosted(topic)),
                    Some(t) => Ok(expire_producers(txn, t, cutoff_ms)?),
                };
                defer(deferred, reply, result);
            }
            Command::ReportEvicted { topic, subscription, records, reply } => {
                let result = match self.topics.get_mut(&topic) {
                    None => Err(self.not_hosted(topic)),
                    Some(t) => match t.cursors.cursor(subscription.as_str()) {
                        Some(c) if c.unreported > 0 => {
                            let told = Cursor { unreported: c.unreported.saturating_sub(records), ..c };
                            let (version, _) = set_cursor_state(txn, t, subscription.as_str(), told)?;
                            touched.insert(topic);
                            Ok(version)
                        }
                        _ => Ok(0),
                    },
                };
                defer(deferred, reply, result);
            }
            Command::ResetCursor { topic, subscription, to, execute, reply } => {
                let result = self.reset_cursor(txn, topic, &subscription, to, execute)?;
                touched.insert(topic);
                defer(deferred, reply, result);
            }
            Command::Ack { topic, subscription, next, reply } => {
                let result = self.ack(txn, topic, &subscription, next)?;
                touched.insert(topic);
                defer(deferred, reply, result);
            }
            Command::CreateSubscription { topic, subscription, from, if_missing, reply } => {
                let result = match self.topics.get_mut(&topic) {
                    None => Err(self.not_hosted(topic)),
                    Some(t) => match t.cursors.get(subscription.as_str()) {
                        Some(cursor) if if_missing => Ok((cursor, t.cursors.version())),
                        Some(_) => Err(Error::SubscriptionExists {
                            topic: t.name(),
                            subscription: subscription.to_string(),
                        }),
                        None => {
                            let cursor = match from {
                                StartFrom::Earliest => t.meta.log_start,
                                StartFrom::Latest => t.state.borrow().commit,
                            };
                            let (version, _) = set_cursor(txn, t, subscription.as_str(), Some(cursor))?;
                            touched.insert(topic);
                            Ok((cursor, version))
                        }
                    },
                };
                defer(deferred, reply, result);
            }
            Command::DeleteSubscription { topic, subscription, reply } => {
                let result = match self.topics.get_mut(&topic) {
                    None => Err(self.not_hosted(topic)),
                    Some(t) => match t.cursors.get(subscription.as_str()) {
                        None => Err(t.unknown_subscription(subscription.as_str())),
                        Some(_) => {
                            let (version, freed) = set_cursor(txn, t, subscription.as_str(), None)?;
                            touched.insert(topic);
                            Ok((version, freed))
                        }
                    },
                };
                defer(deferred, reply, result);
            }
            Command::CommitCursors { topic, version, reply } => {
                let result = match self.topics.get_mut(&topic) {
                    None => Err(self.not_hosted(topic)),
                    Some(t) => {
                        touched.insert(topic);
                        Ok(commit_cursors(txn, t, version)?)
                    }
                };
                defer(deferred, reply, result);
            }
        }
        Ok(())
    }

    fn append(
        &mut self,
        txn: &Tx,
        topic: TopicId,
        producer: ProducerId,
        sequence: Sequence,
        records: Vec<Record>,
    ) -> StorageResult<Result<Appended, Error>> {
        let server = self.server;
        let Some(t) = self.topics.get_mut(&topic) else { return Ok(Err(self.not_hosted(topic))) };
        let epoch = t.history.last_epoch();
        let state = t.producers.entry(producer).or_default();
        if !state.recent.is_empty() {
            if let Some(seen) = state.recent.iter().find(|b| b.sequence == sequence) {
                return Ok(if seen.rejected {
                    Err(Error::invalid(format!(
                        "batch {sequence} of producer {producer:#x} was rejected earlier"
                    )))
                } else {
                    Ok(Appended { base: seen.base, count: seen.count, epoch, duplicate: true })
                });
            }
            // Gaps are accepted: a refused batch uses its number but leaves no record to
            // replicate, so a new leader may not know the number after it.
            if sequence <= state.last_sequence {
                return Ok(Err(Error::invalid(format!(
                    "batch {sequence} of producer {producer:#x} is older than the dedup window of {PRODUCER_DEDUP_WINDOW} batches"
                ))));
            }
        }
        let limit = t.meta.config.max_record_bytes as u64;
        let too_large = records.iter().enumerate().find(|(_, r)| r.size() as u64 > limit);
        if too_large.is_none() {
            // Refused for the backlog: the sequence is not used, so the producer can send the
            // same batch again once subscriptions have read (and freed) records.
            if let Err(e) = make_room(txn, t, &records)? {
                return Ok(Err(e));
            }
        }
        let state = t.producers.entry(producer).or_default();
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
                let count = records.len() as u32;
                let header = BatchHeader { producer, sequence, count };
                let timestamp_ms = now_ms();
                t.bytes +=
                    write_batch(txn, topic, base, timestamp_ms, Some(header), &records, &mut self.buf)?;
                t.log_end += count as u64;
                t.appended_records += count as u64;
                if !t.meta.is_solo() {
                    t.appended.push(ReplicatedBatch { base, timestamp_ms, header: Some(header), records });
                }
                (
                    Ok(Appended { base, count, epoch, duplicate: false }),
                    BatchOutcome { sequence, base, count, rejected: false },
                )
            }
        };
        state.record(outcome, now_ms());
        txn.open(PRODUCERS)?.insert((topic, producer), encode(&*state).as_slice())?;
        t.batches_since_sweep += 1;
        if t.batches_since_sweep >= PRODUCER_SWEEP_EVERY {
            expire_producers(txn, t, now_ms().saturating_sub(PRODUCER_STATE_TTL_MS))?;
        }
        Ok(result)
    }

    fn replica_append(
        &mut self,
        txn: &Tx,
        topic: TopicId,
        chunk: ReplicaChunk,
    ) -> StorageResult<Result<(), Error>> {
        let server = self.server;
        let Some(t) = self.topics.get_mut(&topic) else { return Ok(Err(self.not_hosted(topic))) };
        if chunk.epoch < t.meta.promised {
            return Ok(Err(Error::StaleEpoch {
                topic: t.name(),
                server,
                epoch: chunk.epoch,
                current: t.meta.promised,
            }));
        }
        let mut meta_changed = chunk.epoch > t.meta.promised;
        t.meta.promised = t.meta.promised.max(chunk.epoch);
        if let Some(first) = chunk.batches.first() {
            if first.base != t.log_end {
                return Ok(Err(Error::internal(format!(
                    "replica of {} got a batch at {} but its log ends at {}",
                    t.name(),
                    first.base,
                    t.log_end
                ))));
            }
        }
        for batch in chunk.batches {
            let count = batch.records.len() as u64;
            if let Some(h) = batch.header {
                let state = t.producers.entry(h.producer).or_default();
                let outcome =
                    BatchOutcome { sequence: h.sequence, base: batch.base, count: h.count, rejected: false };
                state.record(outcome, batch.timestamp_ms);
                txn.open(PRODUCERS)?.insert((topic, h.producer), encode(&*state).as_slice())?;
                t.batches_since_sweep += 1;
            }
            t.bytes += write_batch(
                txn,
                topic,
                batch.base,
                batch.timestamp_ms,
                batch.header,
                &batch.records,
                &mut self.buf,
            )?;
            t.log_end = batch.base + count;
            t.appended_records += count;
        }
        if t.batches_since_sweep >= PRODUCER_SWEEP_EVERY {
            expire_producers(txn, t, now_ms().saturating_sub(PRODUCER_STATE_TTL_MS))?;
        }
        for (epoch, start) in t.history.to_adopt(&chunk.history, t.log_end) {
            if t.history.assign(epoch, start) {
                txn.open(EPOCHS)?.insert((topic, epoch), start)?;
            }
        }
        if !chunk.cursors.is_empty() {
            let mut table = txn.open(CURSORS)?;
            for (name, cursor, version) in &chunk.cursors {
                t.cursors.apply(name, *cursor, *version);
                table.insert((topic, name.as_str()), encode(&(*cursor, *version)).as_slice())?;
            }
        }
        t.cursors.commit(chunk.cursor_commit);
        let target = chunk.log_start.min(t.log_end);
        if target > t.meta.log_start {
            let freed = delete_records(txn, topic, t.meta.log_start..target)?;
            t.bytes -= freed;
            t.freed_bytes += freed;
            t.freed_records += target - t.meta.log_start;
            t.meta.log_start = target;
            meta_changed = true;
        }
        if meta_changed {
            txn.open(TOPICS)?.insert(topic, encode(&t.meta).as_slice())?;
        }
        t.leader_commit = t.leader_commit.max(chunk.commit.min(t.log_end));
        Ok(Ok(()))
    }

    fn reset_cursor(
        &mut self,
        txn: &Tx,
        topic: TopicId,
        subscription: &SubscriptionName,
        to: ResetTo,
        execute: bool,
    ) -> StorageResult<Result<(ResetOutcome, u64), Error>> {
        let not_hosted = self.not_hosted(topic);
        let Some(t) = self.topics.get_mut(&topic) else { return Ok(Err(not_hosted)) };
        let Some(before) = t.cursors.get(subscription.as_str()) else {
            return Ok(Err(t.unknown_subscription(subscription.as_str())));
        };
        let (log_start, commit) = (t.meta.log_start, t.state.borrow().commit);
        let after = match to {
            ResetTo::Earliest => log_start,
            ResetTo::Latest => commit,
            ResetTo::Offset(o) if o < log_start => {
                return Ok(Err(Error::CursorBeforeLogStart {
                    topic: t.name(),
                    subscription: None,
                    offset: o,
                    log_start,
                }))
            }
            ResetTo::Offset(o) if o > commit => {
                return Ok(Err(Error::OffsetBeyondEnd { topic: t.name(), offset: o, log_end: commit }))
            }
            ResetTo::Offset(o) => o,
        };
        let mut version = 0;
        if execute && after != before {
            version = set_cursor(txn, t, subscription.as_str(), Some(after))?.0;
        }
        Ok(Ok((ResetOutcome { before, after, log_start, commit, executed: execute }, version)))
    }

    fn ack(
        &mut self,
        txn: &Tx,
        topic: TopicId,
        subscription: &SubscriptionName,
        next: Offset,
    ) -> StorageResult<Result<(Offset, u64), Error>> {
        let not_hosted = self.not_hosted(topic);
        let Some(t) = self.topics.get_mut(&topic) else { return Ok(Err(not_hosted)) };
        let Some(cursor) = t.cursors.get(subscription.as_str()) else {
            return Ok(Err(t.unknown_subscription(subscription.as_str())));
        };
        let commit = t.state.borrow().commit;
        if next > commit {
            return Ok(Err(Error::OffsetBeyondEnd { topic: t.name(), offset: next, log_end: commit }));
        }
        if next <= cursor {
            return Ok(Ok((cursor, t.cursors.version()))); // cursors never move backwards
        }
        let (version, _) = set_cursor(txn, t, subscription.as_str(), Some(next))?;
        Ok(Ok((next, version)))
    }
}

fn write_batch(
    txn: &Tx,
    topic: TopicId,
    base: Offset,
    timestamp_ms: u64,
    header: Option<BatchHeader>,
    records: &[Record],
    buf: &mut Vec<u8>,
) -> StorageResult<u64> {
    let mut table = txn.open(RECORDS)?;
    let mut written = 0;
    for (i, record) in records.iter().enumerate() {
        let value = StoredValueRef { timestamp_ms, header: if i == 0 { header } else { None }, record };
        buf.clear();
        let bytes = postcard::to_extend(&value, std::mem::take(buf)).expect("record encodes");
        table.insert((topic, base + i as u64), bytes.as_slice())?;
        written += bytes.len() as u64;
        *buf = bytes;
    }
    Ok(written)
}

/// Deletes a topic's records in `range`; returns the bytes they took.
fn delete_records(txn: &Tx, topic: TopicId, range: std::ops::Range<Offset>) -> StorageResult<u64> {
    let mut freed = 0;
    txn.open(RECORDS)?.retain_in((topic, range.start)..(topic, range.end), |_, v| {
        freed += v.len() as u64;
        false
    })?;
    Ok(freed)
}

/// Moves a subscription to `next` (`None` deletes it), keeping its eviction record; see
/// [`record_cursor`].
fn set_cursor(
    txn: &Tx,
    t: &mut WriterTopic,
    subscription: &str,
    next: Option<Offset>,
) -> StorageResult<(u64, u64)> {
    let version = t.cursors.set(subscription, next);
    record_cursor(txn, t, subscription, version)
}

/// Replaces a subscription's whole cursor (position and eviction record); see
/// [`record_cursor`].
fn set_cursor_state(
    txn: &Tx,
    t: &mut WriterTopic,
    subscription: &str,
    cursor: Cursor,
) -> StorageResult<(u64, u64)> {
    let version = t.cursors.set_cursor(subscription, Some(cursor));
    record_cursor(txn, t, subscription, version)
}

/// Stores the cursor change just made (version `version`) durably. A single replica is its
/// own majority: it commits the change at once, deleting what no subscription needs any more.
/// Returns the version and the records that freed.
fn record_cursor(
    txn: &Tx,
    t: &mut WriterTopic,
    subscription: &str,
    version: u64,
) -> StorageResult<(u64, u64)> {
    let cursor = t.cursors.cursor(subscription);
    txn.open(CURSORS)?.insert((t.meta.id, subscription), encode(&(cursor, version)).as_slice())?;
    let freed = if t.meta.is_solo() { commit_cursors(txn, t, version)? } else { 0 };
    Ok((version, freed))
}

/// What the last eviction freed, until the deletion catches up: the next batches count it as
/// gone rather than evict again (and scan the log again) while the cursor moves replicate.
#[derive(Debug, Clone, Copy)]
struct Evicting {
    /// Records below this offset are on their way out.
    until: Offset,
    /// Their bytes, when the eviction was decided.
    bytes: u64,
    /// `freed_bytes` then: what was deleted since counts against `bytes`.
    freed_mark: u64,
}

/// Stored bytes of a record beyond its own size (framing, timestamp), for the backlog check.
const STORED_OVERHEAD: u64 = 16;

/// Keeps a topic within its backlog limit before `records` are appended (G6). Under
/// `reject` it refuses them, naming the subscription that holds the oldest records. Under
/// `evict` it moves the slowest subscriptions past the oldest records, down to 90 % of the
/// limit so evictions come in steps, and records how many each lost; the records are freed
/// once the moves commit. Only committed records are evicted; a topic without subscriptions
/// keeps its records and refuses more.
fn make_room(txn: &Tx, t: &mut WriterTopic, records: &[Record]) -> StorageResult<Result<(), Error>> {
    let Some(limit) = t.meta.config.backlog_limit else { return Ok(Ok(())) };
    let incoming: u64 = records.iter().map(|r| r.size() as u64 + STORED_OVERHEAD).sum();
    if t.bytes + incoming <= limit {
        return Ok(Ok(()));
    }
    let slowest = t.cursors.live().min_by_key(|(_, c)| c.next).map(|(name, c)| (name.to_string(), c.next));
    let full = |t: &WriterTopic| Error::BacklogFull {
        topic: t.name(),
        limit,
        backlog: t.bytes,
        oldest_held_by: slowest.as_ref().map(|(name, _)| name.clone()),
    };
    let Some((_, lowest)) = slowest.clone() else { return Ok(Err(full(t))) };
    if t.meta.config.backlog_policy == BacklogPolicy::Reject {
        return Ok(Err(full(t)));
    }
    // What an earlier eviction (or read records) will free once its deletion commits.
    let (scan_from, pending) = match t.evicting {
        Some(e) if t.meta.log_start < e.until => {
            (e.until, e.bytes.saturating_sub(t.freed_bytes.saturating_sub(e.freed_mark)))
        }
        _ => (t.meta.log_start, 0),
    };
    let effective = t.bytes.saturating_sub(pending);
    if effective + incoming <= limit {
        return Ok(Ok(()));
    }
    let need = (effective + incoming).saturating_sub(limit / 10 * 9);
    let commit = t.state.borrow().commit;
    let (id, mut target, mut freed) = (t.meta.id, scan_from, 0u64);
    if scan_from < commit {
        for entry in txn.open(RECORDS)?.range((id, scan_from)..(id, commit))? {
            let (key, value) = entry?;
            freed += value.value().len() as u64;
            target = key.value().1 + 1;
            if freed >= need {
                break;
            }
        }
    }
    t.evicting = Some(Evicting { until: target, bytes: pending + freed, freed_mark: t.freed_bytes });
    if target <= lowest {
        // What is below the slowest cursor is read and waits for deletion; nothing to evict.
        return Ok(Ok(()));
    }
    let now = now_ms();
    let behind: Vec<(String, Cursor)> =
        t.cursors.live().filter(|(_, c)| c.next < target).map(|(n, c)| (n.to_string(), c)).collect();
    for (name, c) in behind {
        let lost = target - c.next;
        warn!(topic = %t.meta.name, subscription = %name, from = c.next, to = target, lost, limit, "backlog limit reached: evicted records the subscription had not read");
        let moved = Cursor {
            next: target,
            unreported: c.unreported + lost,
            evicted: c.evicted + lost,
            evicted_at_ms: now,
        };
        set_cursor_state(txn, t, &name, moved)?;
    }
    Ok(Ok(()))
}

/// Forgets the producers whose last batch is older than `cutoff_ms`; returns how many.
fn expire_producers(txn: &Tx, t: &mut WriterTopic, cutoff_ms: u64) -> StorageResult<usize> {
    t.batches_since_sweep = 0;
    let expired: Vec<ProducerId> =
        t.producers.iter().filter(|(_, p)| p.last_ms < cutoff_ms).map(|(id, _)| *id).collect();
    if !expired.is_empty() {
        let mut table = txn.open(PRODUCERS)?;
        for id in &expired {
            t.producers.remove(id);
            table.remove((t.meta.id, *id))?;
        }
        info!(topic = %t.meta.name, producers = expired.len(), "forgot producers silent for a day");
    }
    Ok(expired.len())
}

/// Commits cursor changes up to `version` and deletes the records every subscription has
/// passed (G6): the log start becomes the lowest committed cursor, within the commit offset.
/// A topic without subscriptions keeps everything. Returns how many records were freed.
fn commit_cursors(txn: &Tx, t: &mut WriterTopic, version: u64) -> StorageResult<u64> {
    t.cursors.commit(version);
    let Some(lowest) = t.cursors.lowest_held() else { return Ok(0) };
    let commit = if t.meta.is_solo() { t.log_end } else { t.state.borrow().commit };
    let new_start = lowest.min(commit).min(t.log_end);
    if new_start <= t.meta.log_start {
        return Ok(0);
    }
    let id = t.meta.id;
    let freed = new_start - t.meta.log_start;
    let freed_bytes = delete_records(txn, id, t.meta.log_start..new_start)?;
    t.bytes -= freed_bytes;
    t.freed_bytes += freed_bytes;
    t.freed_records += new_start - t.meta.log_start;
    t.meta.log_start = new_start;
    txn.open(TOPICS)?.insert(id, encode(&t.meta).as_slice())?;
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: TopicId, name: &str) -> TopicMeta {
        TopicMeta {
            id,
            name: TopicName::new(name).unwrap(),
            config: TopicConfig { max_record_bytes: 64, ..TopicConfig::default() },
            replicas: vec![1],
            leader: 1,
            epoch: 1,
            promised: 1,
            log_start: 0,
        }
    }

    /// A topic of a three-replica set, hosted on a server that follows.
    fn follower_meta(id: TopicId) -> TopicMeta {
        TopicMeta { replicas: vec![1, 2, 3], leader: 2, ..meta(id, "replicated") }
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
            .read(log, s.log_start, s.log_end, 1000, u32::MAX)
            .unwrap()
            .into_iter()
            .map(|r| (r.offset, String::from_utf8(r.record.payload).unwrap()))
            .collect()
    }

    fn batch(base: Offset, producer: ProducerId, sequence: Sequence, values: &[&str]) -> ReplicatedBatch {
        ReplicatedBatch {
            base,
            timestamp_ms: 5,
            header: Some(BatchHeader { producer, sequence, count: values.len() as u32 }),
            records: records(values),
        }
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
        // A sequence below the window's newest that it does not hold is refused.
        assert!(store.append(7, 42, 5, records(&["x"])).await.is_ok(), "gaps are accepted");
        assert!(matches!(store.append(7, 42, 4, records(&["y"])).await, Err(Error::InvalidArgument { .. })));
        // Another producer interleaves freely.
        let other = store.append(7, 43, 0, records(&["d"])).await.unwrap();
        assert_eq!(other.base, 4);
        let got: Vec<_> = payloads(&store, &log).into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, ["a", "b", "c", "x", "d"]);
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
        assert!(matches!(store.append(1, 9, 0, records(&["ok"])).await, Err(Error::InvalidArgument { .. })));
        assert_eq!(store.append(1, 9, 1, records(&["next"])).await.unwrap().base, 0);
    }

    fn limited(id: TopicId, limit: u64, policy: BacklogPolicy) -> TopicMeta {
        let mut m = meta(id, &format!("limited-{id}"));
        m.config.max_record_bytes = 1000;
        m.config.backlog_limit = Some(limit);
        m.config.backlog_policy = policy;
        m
    }

    fn hundred_bytes(n: usize) -> Vec<Record> {
        (0..n).map(|_| Record { payload: vec![b'x'; 100], ..Record::default() }).collect()
    }

    #[tokio::test]
    async fn the_reject_policy_refuses_at_the_limit_and_keeps_the_sequence_free() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        let log = store.create_topic(limited(1, 2000, BacklogPolicy::Reject)).await.unwrap();
        store.create_subscription(1, sub("slow"), StartFrom::Earliest, false).await.unwrap();
        let mut seq = 0;
        let refusal = loop {
            match store.append(1, 7, seq, hundred_bytes(3)).await {
                Ok(_) => seq += 1,
                Err(e) => break e,
            }
            assert!(seq < 100, "never refused");
        };
        let stored = log.state().bytes;
        assert!(stored <= 2000 && stored > 1500, "{stored}");
        match refusal {
            Error::BacklogFull { limit, backlog, oldest_held_by, .. } => {
                assert_eq!((limit, backlog, oldest_held_by.as_deref()), (2000, stored, Some("slow")));
            }
            other => panic!("{other:?}"),
        }
        // Once the subscription has read, the same batch (same sequence) goes in.
        let end = log.state().log_end;
        store.ack(1, sub("slow"), end).await.unwrap();
        assert_eq!(log.state().bytes, 0);
        let a = store.append(1, 7, seq, hundred_bytes(3)).await.unwrap();
        assert_eq!((a.base, a.duplicate), (end, false));
    }

    #[tokio::test]
    async fn the_evict_policy_moves_only_the_slow_and_records_what_they_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        let log = store.create_topic(limited(1, 2000, BacklogPolicy::Evict)).await.unwrap();
        store.create_subscription(1, sub("slow"), StartFrom::Earliest, false).await.unwrap();
        store.create_subscription(1, sub("fast"), StartFrom::Earliest, false).await.unwrap();
        for seq in 0..40 {
            store.append(1, 7, seq, hundred_bytes(3)).await.expect("evict never refuses");
            store.ack(1, sub("fast"), log.state().log_end).await.unwrap();
            assert!(log.state().bytes <= 2000 + 3 * 120, "{}", log.state().bytes);
        }
        let slow = store.cursor(1, &sub("slow")).unwrap().unwrap();
        let fast = store.cursor(1, &sub("fast")).unwrap().unwrap();
        assert!(slow.evicted > 0 && slow.evicted_at_ms > 0);
        assert_eq!(
            (slow.next, slow.unreported),
            (slow.evicted, slow.evicted),
            "moved by what it lost, not yet told"
        );
        assert_eq!((fast.next, fast.evicted), (120, 0));
        assert_eq!(log.state().log_start, slow.next, "what it lost is freed");
        // Telling a consumer clears the notice, not the record.
        store.report_evicted(1, sub("slow"), slow.unreported).await.unwrap();
        let told = store.cursor(1, &sub("slow")).unwrap().unwrap();
        assert_eq!((told.unreported, told.evicted, told.next), (0, slow.evicted, slow.next));
        // Without subscriptions there is nobody to evict from: the limit refuses.
        let log2 = store.create_topic(limited(2, 500, BacklogPolicy::Evict)).await.unwrap();
        store.append(2, 7, 0, hundred_bytes(3)).await.unwrap();
        assert!(matches!(
            store.append(2, 7, 1, hundred_bytes(3)).await,
            Err(Error::BacklogFull { oldest_held_by: None, .. })
        ));
        assert_eq!(log2.state().log_end, 3);
    }

    #[tokio::test]
    async fn a_replicated_leader_evicts_once_until_the_deletion_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        // The limit is ten times a batch, so one eviction (down to 90 %) makes room for more.
        let meta = TopicMeta { replicas: vec![1, 2, 3], ..limited(1, 20_000, BacklogPolicy::Evict) };
        let log = store.create_topic(meta).await.unwrap();
        store.create_subscription(1, sub("slow"), StartFrom::Earliest, false).await.unwrap();
        store.create_subscription(1, sub("fast"), StartFrom::Earliest, false).await.unwrap();
        // Appends as the replication layer would see them committed, with `fast` keeping up.
        let mut seq = 0;
        let mut append = || {
            seq += 1;
            let (store, log) = (&store, &log);
            async move {
                store.append(1, 7, seq, hundred_bytes(3)).await.unwrap();
                log.set_commit(log.state().log_end);
                store.ack(1, sub("fast"), log.state().log_end).await.unwrap();
            }
        };
        let evicted = loop {
            append().await;
            let slow = store.cursor(1, &sub("slow")).unwrap().unwrap();
            if slow.evicted > 0 {
                break slow.evicted;
            }
            assert!(log.state().log_end < 1000, "never evicted");
        };
        // Until the cursor moves commit and the records go, more batches evict nothing more.
        for _ in 0..2 {
            append().await;
        }
        assert_eq!(store.cursor(1, &sub("slow")).unwrap().unwrap().evicted, evicted);
        let before = log.state().bytes;
        store.commit_cursors(1, log.state().cursor_version).await.unwrap();
        assert_eq!(log.state().log_start, evicted, "what was evicted is deleted");
        assert!(log.state().bytes < before);
    }

    #[tokio::test]
    async fn silent_producers_are_forgotten_on_every_replica_alike() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        store.create_topic(meta(1, "t")).await.unwrap();
        store.append(1, 7, 0, records(&["a"])).await.unwrap();
        store.append(1, 8, 0, records(&["b"])).await.unwrap();
        let states = store.producer_states(1).unwrap();
        assert!(states.iter().all(|(_, p)| p.last_ms > 0 && p.last_ms <= now_ms()));
        assert_eq!(store.expire_producers(1, 0).await.unwrap(), 0, "none is older than the cutoff");
        assert_eq!(store.expire_producers(1, now_ms() + 1).await.unwrap(), 2);
        assert!(store.producer_states(1).unwrap().is_empty());
        // The cost of forgetting: a retry that late is a new batch.
        assert!(!store.append(1, 7, 0, records(&["a"])).await.unwrap().duplicate);
        // A follower dates a producer by the batch's timestamp, as the leader did.
        store.create_topic(follower_meta(2)).await.unwrap();
        let mut old = batch(0, 9, 0, &["x"]);
        old.timestamp_ms = 1000;
        let chunk =
            ReplicaChunk { epoch: 1, batches: vec![old], history: vec![(1, 0)], ..ReplicaChunk::default() };
        store.replica_append(2, chunk).await.unwrap();
        assert_eq!(store.producer_states(2).unwrap()[0].1.last_ms, 1000);
        assert_eq!(store.expire_producers(2, 1001).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn lag_in_bytes_is_exact_for_short_lags_and_estimated_for_long_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        let log = store.create_topic(meta(1, "t")).await.unwrap();
        store.create_subscription(1, sub("behind"), StartFrom::Earliest, false).await.unwrap();
        let n = LAG_BYTES_SCAN as usize + 20_000;
        let batch: Vec<Record> =
            (0..n / 4).map(|i| Record { payload: vec![b'x'; 8 + i % 5], ..Record::default() }).collect();
        for seq in 0..4 {
            store.append(1, 7, seq, batch.clone()).await.unwrap();
        }
        store.create_subscription(1, sub("near"), StartFrom::Latest, false).await.unwrap();
        store.append(1, 7, 4, records(&["abc", "defgh"])).await.unwrap();
        let state = log.state();
        let subs = store.subscriptions(1, &state).unwrap();
        let by = |name: &str| subs.iter().find(|s| s.name.as_str() == name).unwrap().clone();
        let near = by("near");
        assert_eq!(near.lag, 2);
        let exact: u64 = store
            .read_batches(1, state.commit - 2, state.commit, usize::MAX)
            .unwrap()
            .iter()
            .flat_map(|b| &b.records)
            .map(|r| r.size() as u64)
            .sum();
        assert!(
            near.lag_bytes > exact && near.lag_bytes < exact + 2 * STORED_OVERHEAD,
            "stored bytes, framing included"
        );
        let behind = by("behind");
        assert!(behind.lag > LAG_BYTES_SCAN);
        // Estimated from the average stored record: within a few percent of the total.
        let total = state.bytes as f64;
        assert!((behind.lag_bytes as f64 - total).abs() / total < 0.01, "{} vs {total}", behind.lag_bytes);
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
        let (_, version) = store.create_subscription(1, sub("b"), StartFrom::Earliest, false).await.unwrap();
        assert_eq!(log.state().cursor_commit, version, "a single replica commits cursor changes at once");
        assert_eq!(store.ack(1, sub("a"), 4).await.unwrap().0, 4);
        assert_eq!(log.state().log_start, 0, "b still needs offset 0");
        assert_eq!(store.ack(1, sub("b"), 2).await.unwrap().0, 2);
        assert_eq!(log.state().log_start, 2);
        assert_eq!(payloads(&store, &log).first().unwrap().0, 2);
        // Cursors never move backwards, and never past the commit offset.
        assert_eq!(store.ack(1, sub("a"), 1).await.unwrap().0, 4);
        assert!(matches!(store.ack(1, sub("a"), 6).await, Err(Error::OffsetBeyondEnd { .. })));
        // Deleting b frees what only it held.
        assert_eq!(store.delete_subscription(1, sub("b")).await.unwrap().1, 2);
        assert_eq!(log.state().log_start, 4);
        // Deleting the last subscription keeps the rest for a later subscriber.
        assert_eq!(store.delete_subscription(1, sub("a")).await.unwrap().1, 0);
        assert_eq!(store.create_subscription(1, sub("late"), StartFrom::Earliest, false).await.unwrap().0, 4);
        assert_eq!(store.create_subscription(1, sub("new"), StartFrom::Latest, false).await.unwrap().0, 5);
        assert!(
            store.subscriptions(1, &log.state()).unwrap().iter().all(|s| s.name.as_str() != "a"),
            "deleted stay deleted"
        );
    }

    #[test]
    fn a_directory_of_another_storage_format_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), Some(1)).unwrap());
        {
            let db = Database::create(dir.path().join("herald.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("format", 1).unwrap();
            txn.commit().unwrap();
        }
        let err = Store::open(dir.path(), Some(1)).err().expect("refused").to_string();
        assert!(err.contains("storage format 1") && err.contains("reads format 2"), "{err}");
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
        let (log, meta) = &logs[0];
        let state = log.state();
        assert_eq!((state.log_start, state.log_end, state.commit, state.epoch), (1, 3, 3, 1));
        assert_eq!(meta.name.as_str(), "kept");
        assert_eq!(store.cursor(3, &sub("s")).unwrap(), Some(Cursor::at(2)));
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

    #[tokio::test]
    async fn a_replicated_leader_commits_only_what_replication_says() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        let log = store.create_topic(TopicMeta { replicas: vec![1, 2, 3], ..meta(1, "r") }).await.unwrap();
        store.append(1, 1, 0, records(&["a", "b"])).await.unwrap();
        let s = log.state();
        assert_eq!((s.log_end, s.commit), (2, 0), "durable but not committed");
        log.set_commit(5);
        assert_eq!(log.state().commit, 2, "never past the durable end");
        // Batches read for a follower are whole and carry the producer's numbers.
        store.append(1, 1, 1, records(&["c"])).await.unwrap();
        let batches = store.read_batches(1, 0, 3, 1).unwrap();
        assert_eq!(batches.len(), 1, "stops at a batch boundary once over the byte budget");
        assert_eq!(batches[0].records.len(), 2);
        assert_eq!(batches[0].header, Some(BatchHeader { producer: 1, sequence: 0, count: 2 }));
        assert_eq!(store.read_batches(1, 0, 3, 1 << 20).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn staged_batches_are_served_whole_from_a_batch_start_and_cleared_when_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        let log = store.create_topic(TopicMeta { replicas: vec![1, 2, 3], ..meta(1, "r") }).await.unwrap();
        // As the writer leaves them between applying a group and its fsync.
        *log.staged.lock().unwrap() = vec![batch(0, 7, 0, &["a", "b"]), batch(2, 7, 1, &["c"])];
        assert_eq!(log.staged(0, 1 << 20).len(), 2);
        assert_eq!(log.staged(2, 1 << 20)[0].base, 2);
        assert!(log.staged(1, 1 << 20).is_empty(), "never from inside a batch");
        assert!(log.staged(3, 1 << 20).is_empty(), "nothing past the staged end");
        assert_eq!(log.staged(0, 1).len(), 1, "stops at a batch boundary once over the byte budget");
        // The next durable group publishes its state and clears what was staged before.
        store.append(1, 1, 0, records(&["x"])).await.unwrap();
        assert!(log.staged(0, 1 << 20).is_empty());
        let s = log.state();
        assert_eq!((s.log_end, s.staged_end), (1, 1));
    }

    #[tokio::test]
    async fn a_group_that_writes_nothing_is_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
        let log = store.create_topic(follower_meta(1)).await.unwrap();
        let chunk = ReplicaChunk {
            epoch: 1,
            batches: vec![batch(0, 7, 0, &["a", "b"])],
            history: vec![(1, 0)],
            ..ReplicaChunk::default()
        };
        store.replica_append(1, chunk).await.unwrap();
        let commits = store.commits();
        // A fetch answer carrying only the leader's new commit offset.
        let news = ReplicaChunk { epoch: 1, history: vec![(1, 0)], commit: 2, ..ReplicaChunk::default() };
        let state = store.replica_append(1, news).await.unwrap();
        assert_eq!(state.commit, 2, "the commit offset is published");
        assert_eq!(store.commits(), commits, "without a write transaction (and its fsync)");
        // Records still make a commit, and everything survives a reopen.
        let more = ReplicaChunk {
            epoch: 1,
            batches: vec![batch(2, 7, 1, &["c"])],
            history: vec![(1, 0)],
            ..ReplicaChunk::default()
        };
        store.replica_append(1, more).await.unwrap();
        assert_eq!(store.commits(), commits + 1);
        drop((store, log));
        let (store, hosted) = Store::open(dir.path(), None).unwrap();
        assert_eq!(hosted[0].0.state().log_end, 3);
        assert_eq!(payloads(&store, &hosted[0].0).len(), 3);
    }

    #[tokio::test]
    async fn a_follower_appends_truncates_and_resets_by_the_leaders_word() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
        let log = store.create_topic(follower_meta(1)).await.unwrap();
        assert_eq!(log.state().epoch, 0, "a follower adopts epochs by fetching");
        let chunk = ReplicaChunk {
            epoch: 1,
            batches: vec![batch(0, 7, 0, &["a", "b"]), batch(2, 7, 1, &["c"])],
            history: vec![(1, 0)],
            log_start: 0,
            commit: 2,
            cursors: vec![("s".into(), Some(Cursor::at(1)), 1)],
            cursor_commit: 1,
        };
        let state = store.replica_append(1, chunk).await.unwrap();
        assert_eq!((state.log_end, state.commit, state.epoch, state.cursor_version), (3, 2, 1, 1));
        assert_eq!(store.cursor(1, &sub("s")).unwrap(), Some(Cursor::at(1)));
        // The follower rebuilt the leader's dedup state from the batch headers.
        let producers = store.producer_states(1).unwrap();
        assert_eq!(producers[0].1.last_sequence, 1);

        // A promise fences older epochs and reports (last epoch, log end).
        assert_eq!(store.promise(1, 3).await.unwrap(), (1, 3));
        let stale = ReplicaChunk { epoch: 2, ..ReplicaChunk::default() };
        assert!(matches!(store.replica_append(1, stale).await, Err(Error::StaleEpoch { current: 3, .. })));

        // Truncating a divergent tail drops its records and the dedup entries of its batches.
        let state = store.truncate(1, 2).await.unwrap();
        assert_eq!(state.log_end, 2);
        assert_eq!(store.producer_states(1).unwrap()[0].1.last_sequence, 0);
        // The next leader's batches continue from there.
        let chunk = ReplicaChunk {
            epoch: 3,
            batches: vec![batch(2, 8, 0, &["z"])],
            history: vec![(1, 0), (3, 2)],
            log_start: 1,
            commit: 3,
            ..ReplicaChunk::default()
        };
        let state = store.replica_append(1, chunk).await.unwrap();
        assert_eq!((state.log_start, state.log_end, state.commit, state.epoch), (1, 3, 3, 3));
        let got: Vec<_> = payloads(&store, &log).into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, ["b", "z"], "the leader's deletion applied, the divergent record replaced");

        // Behind the leader's log start: drop everything, restart there with its history.
        let reset = ReplicaReset {
            log_start: 10,
            history: vec![(1, 0), (3, 2), (5, 12)],
            producers: vec![(8, ProducerState::default())],
        };
        let state = store.reset(1, reset).await.unwrap();
        assert_eq!(
            (state.log_start, state.log_end, state.epoch),
            (10, 10, 3),
            "epoch 5 starts past the log end"
        );
        assert_eq!(store.record_count().unwrap(), 0);
        // And it all survives a reopen.
        drop(log);
        drop(store);
        let (_, logs) = Store::open(dir.path(), Some(3)).unwrap();
        let (log, meta) = &logs[0];
        assert_eq!(meta.promised, 3);
        assert_eq!((log.state().log_start, log.state().log_end), (10, 10));
    }

    #[tokio::test]
    async fn becoming_leader_starts_an_epoch_at_the_log_end() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Some(2)).unwrap();
        store.create_topic(follower_meta(1)).await.unwrap();
        let chunk = ReplicaChunk {
            epoch: 1,
            batches: vec![batch(0, 7, 0, &["a"])],
            history: vec![(1, 0)],
            ..Default::default()
        };
        store.replica_append(1, chunk).await.unwrap();
        let state = store.become_leader(1, 2).await.unwrap();
        assert_eq!(state.history.entries(), &[(1, 0), (2, 1)]);
        assert!(matches!(store.become_leader(1, 1).await, Err(Error::StaleEpoch { .. })));
    }
}
