//! A topic server's storage: each topic's replicated log, its records, cursors, producer
//! state and epoch history, in redb.
//!
//! # Layout
//! One redb file per server (`DATA/herald.redb`), tables keyed by topic id (`tables`):
//! - `topics`: id -> [`TopicMeta`] (name, config, last assignment, promised epoch, log start,
//!   first stored entry, applied index);
//! - `entries`: (id, index) -> [`Entry`](crate::replication::Entry): batches, cursor
//!   changes, epoch starts;
//! - `record_chunks`: (id, offset of the first) -> the records of one batch as one value with
//!   a checksum (`chunk`), read by consumers and shipped to followers;
//! - `cursors`: (id, subscription) -> the applied [`Cursor`];
//! - `producers`: (id, producer) -> [`ProducerState`] (dedup window), a checkpoint the
//!   entries after it complete (`dedup`): a produce writes no row here;
//! - `epochs`: (id, epoch) -> index of its first entry ([`EpochHistory`](crate::replication::EpochHistory));
//! - `meta`: the server id this data directory belongs to, its naming book's id, the format.
//!
//! # Group commit
//! One writer thread owns every write (`writer`; redb allows one write transaction at a time
//! anyway). It takes all queued commands, applies them in one write transaction and commits
//! once with `Durability::Immediate` (one fsync), then answers each command. Readers use
//! their own read transactions (`read`) and never wait for the writer.
//!
//! # Files
//! - `writer`: the group commit; `command`: what it takes; `state`: what it publishes;
//! - `topic`: one topic's log in the writer (entries, apply, compaction, follower writes);
//! - `epochs`, `producers`, `cursors`, `backlog`: the leader's rules for epoch starts,
//!   producers' batches, subscriptions' cursors and backlog limits; `dedup`: the producers'
//!   dedup state and its checkpoint;
//! - `tables`: the redb tables; `chunk`: how a batch's records are one value; `read`:
//!   readers; `faults`: backends that fail on purpose.
//!
//! # Who decides what
//! Storage keeps the log durable and consistent; the replication rules
//! ([`crate::replication`]) decide. The commit point is theirs: the writer publishes the
//! durable log end, and the replication layer publishes the commit point on the same watch
//! ([`TopicLog::set_commit`]) and asks the writer to apply committed entries
//! ([`Store::commit`]). A topic with a single replica commits and applies what is durable.
//!
//! # Invariants
//! - Offsets of a topic are dense: chunks hold every record of `log_start..log_end` and
//!   none past it (a follower just restarted at the leader's state may have nothing yet);
//!   the first chunk may start below `log_start`, its records there hidden from readers.
//! - Entries exist exactly for `start_index..end_index`; those below `applied` are applied,
//!   and only those below `start_index` were ever deleted.
//! - A batch's entry and records are written in one transaction.
//! - `log_start` only grows, and only as applied (committed) cursor entries allow.
//! - A replica leads an epoch only after writing its first entry, and never an epoch it held
//!   before a restart.
//! - The published [`LogState`] only ever describes durable (fsynced) data.

mod backlog;
pub mod chunk;
mod command;
mod cursors;
pub mod damage;
mod dedup;
mod epochs;
pub mod faults;
mod producers;
mod read;
pub mod recovery;
mod state;
mod tables;
mod topic;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::histogram::Histogram;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::replication::{ReplicaChunk, ReplicaReset};
use crate::types::{
    Epoch, Index, Offset, ProducerId, Record, Sequence, ServerId, StartFrom, SubscriptionName, TopicId,
};
use crate::wire::{ResetOutcome, ResetTo, TopicConfig};

pub use crate::replication::{BatchOutcome, Cursor, ProducerState, PRODUCER_DEDUP_WINDOW};
pub use command::{Command, Reply};
pub use read::LAG_BYTES_SCAN;
pub use state::{
    Appended, ChangeReader, ChangedTopics, CursorChange, LogState, Pending, TopicLog, TopicMeta,
};
pub use topic::{Retention, COMPACT_BATCH, PRODUCER_STATE_TTL_MS, RETAINED_ENTRIES};
pub use writer::{Clock, GroupOutcome, Writer, MAX_COMMANDS_PER_COMMIT};

use tables::{CHUNKS, CURSORS, ENTRIES, EPOCHS, META, PRODUCERS, TOPICS};

/// Version of the on-disk layout (tables and value encodings). 3: a replicated log of
/// entries (batches, cursor changes, epoch starts) beside the records; applied cursors.
/// 4: records stored a batch per value (`chunk`), with a CRC32C. 5: the producers table is
/// a checkpoint the entries after `TopicMeta::producers_index` complete (`dedup`).
pub const STORAGE_FORMAT: u64 = 5;

/// redb page cache. Records live on disk, not in RAM: memory stays flat as backlogs grow.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// A topic found in storage at open: its read handle and its stored meta.
pub type HostedTopic = (Arc<TopicLog>, TopicMeta);

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
    db: Arc<recovery::DbHandle>,
    /// `None` only while dropping, or for a store whose writer the caller drives.
    tx: Option<mpsc::UnboundedSender<Command>>,
    writer: Option<std::thread::JoinHandle<()>>,
    server: ServerId,
    commits: Arc<AtomicU64>,
    commit_seconds: Histogram,
    low_space: Arc<std::sync::atomic::AtomicBool>,
    changed: Arc<ChangedTopics>,
    damaged: Arc<damage::Damaged>,
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

/// Milliseconds since the Unix epoch, from the system clock.
pub fn system_clock() -> Clock {
    Arc::new(crate::types::now_ms)
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
        let (mut store, writer, logs) = Self::open_parts(dir, requested, medium, system_clock())?;
        // Unbounded in type only: every command carries a reply its sender awaits, so the queue
        // holds at most one command per request or task in flight, and those are bounded (per
        // connection by `transport::limits`' streams, pipelining and byte budget; one follow
        // and one apply task per hosted topic).
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = std::thread::Builder::new()
            .name(format!("herald-writer-{}", store.server))
            .spawn(move || writer.run(rx))?;
        store.tx = Some(tx);
        store.writer = Some(handle);
        Ok((store, logs))
    }

    /// A store whose [`Writer`] the caller drives itself, group by group (the simulator does,
    /// to interleave servers and crash one between a group's two halves).
    pub fn open_driven(
        dir: &Path,
        requested: Option<ServerId>,
        medium: &Medium,
        clock: Clock,
    ) -> anyhow::Result<(Store, Writer, Vec<HostedTopic>)> {
        Self::open_parts(dir, requested, medium, clock)
    }

    fn open_parts(
        dir: &Path,
        requested: Option<ServerId>,
        medium: &Medium,
        clock: Clock,
    ) -> anyhow::Result<(Store, Writer, Vec<HostedTopic>)> {
        let path = dir.join("herald.redb");
        // Also how the writer reopens the file after an I/O error (see `recovery`).
        let file_opener = {
            let path = path.clone();
            move || {
                let mut builder = Database::builder();
                builder.set_cache_size(CACHE_BYTES);
                builder.create(&path)
            }
        };
        let mut builder = Database::builder();
        builder.set_cache_size(CACHE_BYTES);
        let opened = match medium {
            Medium::File => {
                crate::files::private_dir(dir)?;
                file_opener()
            }
            Medium::VolatileFile => {
                crate::files::private_dir(dir)?;
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
        if !matches!(medium, Medium::Sim(_)) {
            crate::files::private_file(&path)?;
        }
        let server = Self::check_format(&db, dir, requested)?;
        let db = recovery::DbHandle::new(db);
        let commits = Arc::new(AtomicU64::new(0));
        let commit_seconds = crate::metrics::commit_histogram();
        let changed = Arc::new(ChangedTopics::default());
        let mut writer =
            Writer::new(db.clone(), server, commits.clone(), commit_seconds.clone(), clock, changed.clone());
        if let Medium::File = medium {
            writer.set_recovery(dir.to_path_buf(), Box::new(file_opener));
        }
        let logs = writer.load()?;
        let low_space = writer.low_space_flag();
        let damaged = Arc::new(damage::Damaged::default());
        let store = Store {
            db,
            tx: None,
            writer: None,
            server,
            commits,
            commit_seconds,
            low_space,
            changed,
            damaged,
        };
        Ok((store, writer, logs))
    }

    /// Checks the stored format and server id (writing them on first open); returns the id.
    fn check_format(db: &Database, dir: &Path, requested: Option<ServerId>) -> anyhow::Result<ServerId> {
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
            txn.open_table(ENTRIES)?;
            txn.open_table(CHUNKS)?;
            txn.open_table(CURSORS)?;
            txn.open_table(PRODUCERS)?;
            txn.open_table(EPOCHS)?;
            id
        };
        txn.commit()?;
        Ok(id)
    }

    pub fn server_id(&self) -> ServerId {
        self.server
    }

    /// The chunks found damaged (by reads or the scrub) that no peer's copy has repaired yet.
    pub fn damaged(&self) -> &damage::Damaged {
        &self.damaged
    }

    /// The topics whose state changed since they were last taken.
    pub fn changed_topics(&self) -> &ChangedTopics {
        &self.changed
    }

    /// The disk is full: new data is refused until space is freed (see `recovery`).
    pub fn low_on_space(&self) -> bool {
        self.low_space.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long group commits (write transaction and fsync) take, in seconds.
    pub fn commit_seconds(&self) -> &Histogram {
        &self.commit_seconds
    }

    /// Group commits (write transactions, each one fsync) done since the store was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Whether the writer still takes commands (it stops only if its thread died).
    pub fn is_writing(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| !tx.is_closed())
    }

    fn send(&self, cmd: Command) -> Result<(), Error> {
        self.tx.as_ref().ok_or_else(stopped)?.send(cmd).map_err(|_| stopped())
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await.map_err(|_| stopped())?
    }

    /// Starts hosting a topic (idempotent: an existing id keeps its data).
    pub async fn create_topic(&self, meta: TopicMeta) -> Result<Arc<TopicLog>, Error> {
        self.call(|reply| Command::CreateTopic { meta, reply }).await
    }

    /// Drops a topic and all its entries, records, cursors and producer state.
    pub async fn delete_topic(&self, id: TopicId) -> Result<(), Error> {
        self.call(|reply| Command::DeleteTopic { id, reply }).await
    }

    /// Records the naming server's latest assignment (kept for restarts).
    pub async fn assign(
        &self,
        topic: TopicId,
        voters: Vec<ServerId>,
        learners: Vec<ServerId>,
        leader: ServerId,
        epoch: Epoch,
    ) -> Result<(), Error> {
        self.call(|reply| Command::Assign { topic, voters, learners, leader, epoch, reply }).await
    }

    /// Durably promises `epoch` (refusing older epochs from now on); returns this replica's
    /// `(last epoch, log end index)` for the election.
    pub async fn promise(&self, topic: TopicId, epoch: Epoch) -> Result<(Epoch, Index), Error> {
        self.call(|reply| Command::Promise { topic, epoch, reply }).await
    }

    /// Durably starts `epoch` with its first entry, as its leader.
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
        self.append_or_refuse(topic, producer, sequence, records, None)
    }

    /// [`append`](Self::append), or with `refused` (the server's policy refused the batch)
    /// records only that the batch's sequence was used, and answers with the refusal.
    pub fn append_or_refuse(
        &self,
        topic: TopicId,
        producer: ProducerId,
        sequence: Sequence,
        records: Vec<Record>,
        refused: Option<Error>,
    ) -> impl std::future::Future<Output = Result<Appended, Error>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.send(Command::Append { topic, producer, sequence, records, refused, reply });
        async move {
            sent?;
            rx.await.map_err(|_| stopped())?
        }
    }

    /// Follower: writes what the leader sent, durably; returns the new state.
    pub async fn replica_append(&self, topic: TopicId, chunk: ReplicaChunk) -> Result<LogState, Error> {
        self.call(|reply| Command::ReplicaAppend { topic, chunk, reply }).await
    }

    /// Follower: drops the divergent tail from entry `to` on.
    pub async fn truncate(&self, topic: TopicId, to: Index) -> Result<LogState, Error> {
        self.call(|reply| Command::Truncate { topic, to, reply }).await
    }

    /// Follower: drops everything and restarts at the leader's first stored entry.
    pub async fn reset(&self, topic: TopicId, reset: ReplicaReset) -> Result<LogState, Error> {
        self.call(|reply| Command::Reset { topic, reset, reply }).await
    }

    /// Leader: applies the committed entries below `index` (cursor changes, deletion);
    /// returns how many records that deleted.
    pub async fn commit(&self, topic: TopicId, index: Index) -> Result<u64, Error> {
        self.call(|reply| Command::Commit { topic, index, reply }).await
    }

    /// Leader: moves a subscription's cursor forward to `next` (at most the commit offset).
    pub async fn ack(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
        next: Offset,
    ) -> Result<CursorChange, Error> {
        self.call(|reply| Command::Ack { topic, subscription, next, reply }).await
    }

    /// Leader: moves a subscription's cursor anywhere in `log_start..=commit`, backwards
    /// too (or, without `execute`, only says where).
    pub async fn reset_cursor(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
        to: ResetTo,
        execute: bool,
    ) -> Result<(ResetOutcome, Option<Pending>), Error> {
        self.call(|reply| Command::ResetCursor { topic, subscription, to, execute, reply }).await
    }

    /// Forgets the producers of a topic whose last batch is older than `cutoff_ms` (done on
    /// its own every few thousand batches with [`PRODUCER_STATE_TTL_MS`]); returns how many.
    pub async fn expire_producers(&self, topic: TopicId, cutoff_ms: u64) -> Result<usize, Error> {
        self.call(|reply| Command::ExpireProducers { topic, cutoff_ms, reply }).await
    }

    /// Leader: creates a subscription.
    pub async fn create_subscription(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
        from: StartFrom,
        if_missing: bool,
    ) -> Result<CursorChange, Error> {
        self.call(|reply| Command::CreateSubscription { topic, subscription, from, if_missing, reply }).await
    }

    /// Leader: deletes a subscription (its records are freed once the deletion is applied).
    pub async fn delete_subscription(
        &self,
        topic: TopicId,
        subscription: SubscriptionName,
    ) -> Result<CursorChange, Error> {
        self.call(|reply| Command::DeleteSubscription { topic, subscription, reply }).await
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

    /// Replaces the damaged chunk of `topic` at `base` with `copy`, a peer's (see
    /// `WriterTopic::repair_chunk`); answers whether it replaced it.
    pub async fn repair_chunk(
        &self,
        topic: TopicId,
        base: Offset,
        copy: bytes::Bytes,
    ) -> Result<bool, Error> {
        self.call(|reply| Command::RepairChunk { topic, base, bytes: copy, reply }).await
    }

    fn storage_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Storage { server: self.server, detail: e.to_string() }
    }

    fn read_txn(&self) -> Result<ReadTransaction, Error> {
        let db = self
            .db
            .get()
            .ok_or_else(|| self.storage_err("the database is being reopened after an I/O error"))?;
        db.begin_read().map_err(|e| self.storage_err(e))
    }
}

#[cfg(test)]
mod tests;
