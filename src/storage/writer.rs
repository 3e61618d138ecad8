//! The group-commit writer: one thread owns every write. It takes all queued commands,
//! applies them in one write transaction, shows a leader's new entries to its followers,
//! commits once with `Durability::Immediate` (one fsync), then publishes each touched topic's
//! state and answers the commands.
//!
//! The two halves ([`Writer::stage`] and [`Writer::finish`]) are separate calls so the
//! simulator can run other servers between them, and crash this one in the middle, exactly
//! where a real crash loses a group its followers may already hold.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use redb::{Database, Key, ReadableDatabase, ReadableTable, Table, TableDefinition, Value, WriteTransaction};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::command::{Command, Reply};
use super::cursors::{ack, create_subscription, delete_subscription, reset_cursor};
use super::dedup::Dedup;
use super::epochs::{become_leader, promise};
use super::producers::{append, Batch};
use super::recovery::{is_no_space, DbHandle, Opener, Reserve, REOPEN_BACKOFF_MAX, SPACE_CHECK_EVERY};
use super::state::{ChangedTopics, LogState, TopicLog, TopicMeta};
use super::tables::{decode, encode, CHUNKS, CURSORS, ENTRIES, EPOCHS, META, PRODUCERS, TOPICS};
use super::topic::{chunk_record_sizes, delete_all_records, Retention, WriterTopic};
use super::HostedTopic;
use crate::error::Error;
use crate::replication::{Cursor, CursorState, Entry, EntryKind, EpochHistory, PendingCursor, ProducerState};
use crate::types::{Epoch, Index, Offset, ProducerId, ServerId, TopicId};
use crate::wire::TopicConfig;

/// Commands folded into one write transaction at most; bounds the latency of the first one.
pub const MAX_COMMANDS_PER_COMMIT: usize = 4096;

/// Milliseconds since the Unix epoch, as the writer reads them (the simulator's are virtual).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A failure of the storage engine; the whole group commit is abandoned.
pub(super) type StorageResult<T> = Result<T, redb::Error>;

/// A group's write transaction, knowing whether anything was written: a group that wrote
/// nothing (e.g. a follower told only of a new commit point) is not committed, as a redb
/// commit costs a write and an fsync even when empty.
pub(super) struct Tx {
    txn: WriteTransaction,
    wrote: Cell<bool>,
}

impl Tx {
    pub fn open<K: Key + 'static, V: Value + 'static>(
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

/// Answers held back until the group commit is durable.
type Deferred = Vec<Box<dyn FnOnce(Result<(), Error>) + Send>>;

fn defer<T: Send + 'static>(deferred: &mut Deferred, reply: Reply<T>, result: Result<T, Error>) {
    deferred.push(Box::new(move |commit| {
        let _ = reply.send(commit.and(result));
    }));
}

/// A reply whose value is the state published after the commit.
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

/// A group between [`Writer::stage`] and [`Writer::finish`].
struct OpenGroup {
    /// `Err`: the transaction failed while the commands were applied.
    txn: StorageResult<Tx>,
    deferred: Deferred,
    touched: BTreeSet<TopicId>,
    /// Followers may have seen entries of this group.
    shown: bool,
}

/// How a group ended.
#[derive(Debug, PartialEq, Eq)]
pub enum GroupOutcome {
    /// Durable (or nothing to write); answers sent, state published.
    Committed,
    /// Nothing of it is durable: every command got a `Storage` error, memory was reloaded.
    Failed,
    /// The database refuses writes until it is reopened (after an I/O error); every command
    /// of the group was answered. The writer thread reopens it.
    Broken,
    /// The server must stop and recover from what is durable: the commit failed after
    /// followers saw entries of the group (reusing their indexes for other entries would fork
    /// the log; the naming server elects a replica that holds them, and this one truncates
    /// when it returns), or the storage engine refuses writes until it is reopened.
    Fatal,
}

/// The writer: the in-memory view of every hosted topic, and the database.
pub struct Writer {
    db: Arc<DbHandle>,
    /// Reopens the database after an I/O error; `None` (the simulator's disk): such an error
    /// stops the server, as a crash would.
    opener: Option<Opener>,
    reserve: Reserve,
    /// Low on space since a write found the disk full; when the writer last looked for room.
    low_space: Option<Instant>,
    /// `low_space.is_some()`, for the server (a leader low on space hands its topics on).
    low_space_flag: Arc<AtomicBool>,
    /// The epoch each topic's leader gave up: a group of it that followers may have seen failed.
    given_up: BTreeMap<TopicId, Epoch>,
    server: ServerId,
    topics: BTreeMap<TopicId, WriterTopic>,
    commits: Arc<AtomicU64>,
    commit_seconds: Histogram,
    clock: Clock,
    open: Option<OpenGroup>,
    retention: Retention,
    /// Where every topic's state changes are noted (see [`ChangedTopics`]).
    changed: Arc<ChangedTopics>,
}

impl Writer {
    pub(super) fn new(
        db: Arc<DbHandle>,
        server: ServerId,
        commits: Arc<AtomicU64>,
        commit_seconds: Histogram,
        clock: Clock,
        changed: Arc<ChangedTopics>,
    ) -> Self {
        Self {
            db,
            opener: None,
            reserve: Reserve::new(None),
            low_space: None,
            low_space_flag: Arc::new(AtomicBool::new(false)),
            given_up: BTreeMap::new(),
            server,
            topics: BTreeMap::new(),
            commits,
            commit_seconds,
            clock,
            open: None,
            retention: Retention::default(),
            changed,
        }
    }

    /// Lets the writer reopen the database in `dir` after an I/O error, and keep a reserve
    /// of space there (see `recovery`).
    pub(super) fn set_recovery(&mut self, dir: std::path::PathBuf, opener: Opener) {
        self.reserve = Reserve::new(Some(dir));
        if let Err(e) = self.reserve.ensure() {
            warn!(dir = %self.reserve.dir(), error = %e, "no room for the space reserve; a full disk will need space freed before writes resume");
        }
        self.opener = Some(opener);
    }

    /// Set while the disk is full (see `recovery`).
    pub(super) fn low_space_flag(&self) -> Arc<AtomicBool> {
        self.low_space_flag.clone()
    }

    fn database(&self) -> StorageResult<Arc<Database>> {
        self.db.get().ok_or_else(|| redb::Error::Io(std::io::Error::other("the database is being reopened")))
    }

    /// Keeps fewer (or more) applied entries than [`RETAINED_ENTRIES`](super::RETAINED_ENTRIES)
    /// (the simulator compacts early, so followers restart from snapshots often).
    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
        for t in self.topics.values_mut() {
            t.retention = retention;
        }
    }

    /// The producers' dedup state this writer holds, by topic, for the simulator to compare
    /// with what a restart loads ([`Store::producer_states`](super::Store::producer_states)).
    pub fn producer_states(&self) -> BTreeMap<TopicId, Vec<(ProducerId, ProducerState)>> {
        let states = |t: &WriterTopic| t.dedup.states.iter().map(|(p, s)| (*p, s.clone())).collect();
        self.topics.iter().map(|(id, t)| (*id, states(t))).collect()
    }

    /// Rebuilds the in-memory view from the committed tables (at open, and after a failed
    /// commit, so memory never runs ahead of disk). Existing watch channels are kept, so
    /// handles held by the server stay live.
    pub fn load(&mut self) -> anyhow::Result<Vec<HostedTopic>> {
        let txn = self.database()?.begin_read()?;
        let topics = txn.open_table(TOPICS)?;
        let entries = txn.open_table(ENTRIES)?;
        let chunks = txn.open_table(CHUNKS)?;
        let cursors = txn.open_table(CURSORS)?;
        let producers = txn.open_table(PRODUCERS)?;
        let epochs = txn.open_table(EPOCHS)?;
        let old = std::mem::take(&mut self.topics);
        let mut logs = Vec::new();
        for row in topics.iter()? {
            let (_, value) = row?;
            let meta: TopicMeta = decode(value.value())?;
            let id = meta.id;
            let mut t = WriterTopic::empty(meta.clone(), self.retention, &self.changed);
            if let Some(old) = old.get(&id) {
                t.state = old.state.clone();
                t.staged = old.staged.clone();
                t.staged.lock().expect("staged lock").clear();
            }
            let mut history = Vec::new();
            for row in epochs.range((id, 0)..=(id, u64::MAX))? {
                let (k, v) = row?;
                history.push((k.value().1, v.value()));
            }
            t.history = EpochHistory::new(history);
            let mut applied = BTreeMap::new();
            for row in cursors.range((id, "")..(id + 1, ""))? {
                let (k, v) = row?;
                applied.insert(k.value().1.to_string(), decode::<Cursor>(v.value())?);
            }
            t.cursors = CursorState::new(applied, meta.applied, meta.log_start);
            let mut commit_offset = meta.start_offset;
            for row in entries.range((id, meta.start_index)..(id, u64::MAX))? {
                let (k, v) = row?;
                let index = k.value().1;
                let entry: Entry = decode(v.value())?;
                if index < meta.applied {
                    commit_offset = entry.end;
                }
                if let EntryKind::Cursor { subscription, cursor, log_start } = entry.kind {
                    if index >= meta.applied {
                        t.cursors.push(index, PendingCursor { subscription, cursor, log_start });
                    }
                }
                t.end_index = index + 1;
                t.log_end = entry.end;
            }
            // What this replica applied was committed: a lower bound of the commit point
            // that survives restarts, so clients never see it move back.
            let commit_index = meta.applied.clamp(meta.start_index, t.end_index);
            t.leader_commit = (commit_index, commit_offset.min(t.log_end));
            let mut rows = chunks.range((id, 0)..=(id, u64::MAX))?.peekable();
            while let Some(row) = rows.next() {
                let (k, v) = row?;
                let next =
                    rows.peek().and_then(|r| r.as_ref().ok()).map_or(Offset::MAX, |(k, _)| k.value().1);
                let mut count = |_, size| {
                    t.bytes += size;
                    true
                };
                chunk_record_sizes(k.value().1, v.value(), meta.log_start, next, &mut count);
            }
            t.dedup = Dedup::load(&producers, &entries, id, meta.producers_index, Index::MAX)?;
            // After a failed group (not a restart), a leader whose epoch's first entry is
            // durable still leads it, unless followers may have seen what was lost.
            if let Some(e) = old.get(&id).and_then(|o| o.leading) {
                if t.history.last_epoch() == e && self.given_up.get(&id) != Some(&e) {
                    t.leading = Some(e);
                }
            }
            let published = t.state.borrow().clone();
            let keep = old.contains_key(&id).then_some(&published);
            t.state.send_replace(t.snapshot(keep));
            logs.push((t.handle(), t.meta.clone()));
            self.topics.insert(id, t);
        }
        Ok(logs)
    }

    /// Runs the writer until every [`Store`](super::Store) handle is gone.
    pub(super) fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_COMMANDS_PER_COMMIT {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            self.stage(std::mem::take(&mut batch));
            match self.finish() {
                GroupOutcome::Fatal => {
                    error!(
                        server = self.server,
                        "exiting: followers may hold entries this server could not make durable"
                    );
                    std::process::exit(74);
                }
                GroupOutcome::Broken => self.reopen(&mut rx),
                GroupOutcome::Committed | GroupOutcome::Failed => {}
            }
        }
        info!(server = self.server, "storage writer stopped");
    }

    /// Applies `commands` in a new write transaction and shows a leader's new entries to its
    /// followers; nothing is durable or answered until [`finish`](Self::finish).
    pub fn stage(&mut self, commands: Vec<Command>) {
        assert!(self.open.is_none(), "a group is already open");
        self.look_for_space();
        let (commands, refused): (Vec<Command>, Vec<Command>) =
            commands.into_iter().partition(|c| self.low_space.is_none() || !c.adds_data());
        for cmd in refused {
            cmd.fail(self.no_space());
        }
        let mut deferred: Deferred = Vec::with_capacity(commands.len());
        let mut touched = BTreeSet::new();
        let mut shown = false;
        let mut commands = commands.into_iter();
        let txn =
            self.database().and_then(|db| db.begin_write().map_err(redb::Error::from)).and_then(|txn| {
                let txn = Tx { txn, wrote: Cell::new(false) };
                for cmd in commands.by_ref() {
                    self.apply(&txn, cmd, &mut deferred, &mut touched)?;
                }
                for id in &touched {
                    if let Some(t) = self.topics.get_mut(id) {
                        if t.meta.is_solo() && t.end_index > t.cursors.applied_index() {
                            // A single replica is its own majority: what it writes is committed.
                            let end = t.end_index;
                            t.apply(&txn, end)?;
                        }
                        shown |= t.stage();
                    }
                }
                Ok(txn)
            });
        if let Err(e) = &txn {
            // The failing command was answered with the error; those after it never ran.
            for cmd in commands {
                cmd.fail(storage_error(self.server, e));
            }
            for id in &touched {
                if let Some(t) = self.topics.get_mut(id) {
                    shown |= t.stage();
                }
            }
        }
        self.open = Some(OpenGroup { txn, deferred, touched, shown });
    }

    /// Commits the open group; publishes and answers, or fails every command of it.
    pub fn finish(&mut self) -> GroupOutcome {
        let Some(group) = self.open.take() else { return GroupOutcome::Committed };
        let OpenGroup { txn, deferred, touched, shown } = group;
        let started = std::time::Instant::now();
        let outcome = txn.and_then(|txn| txn.finish());
        match outcome {
            Ok(committed) => {
                if committed {
                    self.commit_seconds.observe(started.elapsed().as_secs_f64());
                    self.commits.fetch_add(1, Ordering::Relaxed);
                }
                for id in touched {
                    if let Some(t) = self.topics.get(&id) {
                        t.publish();
                    }
                }
                deferred.into_iter().for_each(|answer| answer(Ok(())));
                GroupOutcome::Committed
            }
            Err(e) => {
                error!(server = self.server, error = %e, followers_saw_it = shown, "group commit failed");
                let err = self.failure(&e);
                if shown && self.opener.is_none() {
                    return GroupOutcome::Fatal;
                }
                // Nothing of this group is durable: fail every command in it (producers
                // retry with the same sequence), and forget what memory ran ahead.
                deferred.into_iter().for_each(|answer| answer(Err(err.clone())));
                if shown {
                    // Followers may hold entries of this group that this replica lost: it
                    // must not go on in their epochs. It gives them up; the naming server
                    // elects anew, and the entries are kept or truncated by the usual rule.
                    for id in &touched {
                        if let Some(e) = self.topics.get(id).and_then(|t| t.leading) {
                            self.given_up.insert(*id, e);
                        }
                    }
                }
                // After a failed write redb refuses every write until it is reopened (the
                // pages' fate is unknown: PostgreSQL's "fsyncgate").
                let usable = self.database().and_then(|db| db.begin_write().map_err(redb::Error::from));
                match usable {
                    Ok(txn) => {
                        let _ = txn.abort();
                    }
                    Err(e) if self.opener.is_none() => {
                        error!(server = self.server, error = %e, "the storage engine needs a restart");
                        return GroupOutcome::Fatal;
                    }
                    Err(_) => return GroupOutcome::Broken,
                }
                if let Err(e) = self.load() {
                    error!(error = %e, "reloading storage state failed");
                    return if self.opener.is_some() { GroupOutcome::Broken } else { GroupOutcome::Fatal };
                }
                GroupOutcome::Failed
            }
        }
    }

    /// The error every command of a failed group gets: the directory and the cause. A full
    /// disk also starts low-space mode.
    fn failure(&mut self, e: &redb::Error) -> Error {
        if is_no_space(e) {
            if self.low_space.is_none() {
                warn!(dir = %self.reserve.dir(), "the disk is full: producing stops until space is freed; reads, acks and deletions go on");
                self.reserve.release();
            }
            self.set_low_space(Some(Instant::now()));
            return self.no_space();
        }
        Error::Storage {
            server: self.server,
            detail: format!("writing in {} failed: {e}", self.reserve.dir()),
        }
    }

    fn no_space(&self) -> Error {
        Error::Storage {
            server: self.server,
            detail: format!(
                "no space left on {}: nothing more is stored until space is freed (reads, acks and deletions go on)",
                self.reserve.dir()
            ),
        }
    }

    /// Low on space: at most every [`SPACE_CHECK_EVERY`], tries to write the reserve again
    /// with as much room to spare; once it can, writes resume.
    fn look_for_space(&mut self) {
        let Some(at) = self.low_space else { return };
        if at.elapsed() < SPACE_CHECK_EVERY {
            return;
        }
        match self.reserve.take_back() {
            Ok(()) => {
                info!(dir = %self.reserve.dir(), "space is available again: writes resume");
                self.set_low_space(None);
            }
            Err(_) => self.set_low_space(Some(Instant::now())),
        }
    }

    /// Low on space since (or when last checked), or not; the server reads the flag.
    fn set_low_space(&mut self, since: Option<Instant>) {
        self.low_space = since;
        self.low_space_flag.store(since.is_some(), Ordering::Relaxed);
    }

    /// Opens the database again after an I/O error, retrying with backoff; commands that
    /// arrive meanwhile are answered with the error at once.
    fn reopen(&mut self, rx: &mut mpsc::UnboundedReceiver<Command>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.try_reopen() {
                Ok(()) => {
                    info!(server = self.server, dir = %self.reserve.dir(), "storage reopened after an I/O error");
                    return;
                }
                Err(e) => warn!(server = self.server, error = %e, "reopening storage failed; retrying"),
            }
            let err = self.low_space.map_or_else(
                || Error::Storage {
                    server: self.server,
                    detail: format!("storage in {} is being reopened after an I/O error", self.reserve.dir()),
                },
                |_| self.no_space(),
            );
            while let Ok(cmd) = rx.try_recv() {
                cmd.fail(err.clone());
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(REOPEN_BACKOFF_MAX);
        }
    }

    pub(super) fn try_reopen(&mut self) -> anyhow::Result<()> {
        let Some(opener) = &self.opener else { anyhow::bail!("this store cannot be reopened") };
        if let Some(old) = self.db.take() {
            // Readers hold the handle only for a read: wait for them, so the file is closed.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut old = old;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still) if Instant::now() < deadline => {
                        old = still;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => anyhow::bail!("readers still hold the database"),
                }
            }
        }
        let db = opener()?;
        self.db.put(db);
        self.load()?;
        Ok(())
    }

    /// Drops the open group without committing it, as a crash would (for the simulator).
    pub fn abandon(&mut self) {
        self.open.take();
    }

    fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    fn apply(
        &mut self,
        txn: &Tx,
        cmd: Command,
        deferred: &mut Deferred,
        touched: &mut BTreeSet<TopicId>,
    ) -> StorageResult<()> {
        let server = self.server;
        let now = self.now_ms();
        let topics = &mut self.topics;
        let retention = self.retention;
        let changed = &self.changed;
        match cmd {
            Command::CreateTopic { meta, reply } => {
                let id = meta.id;
                let result = (|| -> StorageResult<Result<Arc<TopicLog>, Error>> {
                    if let std::collections::btree_map::Entry::Vacant(slot) = topics.entry(id) {
                        txn.open(TOPICS)?.insert(id, encode(&meta).as_slice())?;
                        slot.insert(WriterTopic::empty(meta, retention, changed));
                    }
                    Ok(Ok(topics[&id].handle()))
                })();
                touched.insert(id);
                settle(deferred, reply, result, server)
            }
            Command::DeleteTopic { id, reply } => {
                let result = (|| -> StorageResult<Result<(), Error>> {
                    if topics.remove(&id).is_some() {
                        txn.open(TOPICS)?.remove(id)?;
                        txn.open(ENTRIES)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                        delete_all_records(txn, id)?;
                        txn.open(CURSORS)?.retain_in((id, "")..(id + 1, ""), |_, _| false)?;
                        txn.open(PRODUCERS)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                        txn.open(EPOCHS)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                    }
                    Ok(Ok(()))
                })();
                settle(deferred, reply, result, server)
            }
            Command::SetMeta { key, value, reply } => {
                let result = (|| -> StorageResult<Result<(), Error>> {
                    txn.open(META)?.insert(key, value)?;
                    Ok(Ok(()))
                })();
                settle(deferred, reply, result, server)
            }
            Command::RepairChunk { topic, base, bytes, reply } => {
                let result = with_topic(topics, topic, server, |t| t.repair_chunk(txn, base, &bytes, server));
                settle(deferred, reply, result, server)
            }
            Command::SetConfig { topic, config, reply } => {
                let result = with_topic(topics, topic, server, |t| {
                    // The record size limit is fixed at creation; policies may change.
                    t.meta.config =
                        TopicConfig { max_record_bytes: t.meta.config.max_record_bytes, ..config };
                    t.save_meta(txn)?;
                    Ok(Ok(()))
                });
                settle(deferred, reply, result, server)
            }
            Command::Assign { topic, voters, learners, leader, epoch, reply } => {
                let result = with_topic(topics, topic, server, |t| {
                    if t.leading.is_some_and(|e| leader != server || e != epoch) {
                        t.leading = None;
                    }
                    t.meta.voters = voters;
                    t.meta.learners = learners;
                    t.meta.leader = leader;
                    t.meta.epoch = t.meta.epoch.max(epoch);
                    t.meta.promised = t.meta.promised.max(epoch);
                    t.save_meta(txn)?;
                    Ok(Ok(()))
                });
                touched.insert(topic);
                settle(deferred, reply, result, server)
            }
            Command::Promise { topic, epoch, reply } => {
                let result = with_topic(topics, topic, server, |t| promise(txn, t, epoch).map(Ok));
                // Published at once: the follow task fetches with the new epoch, which fences
                // the old leader sooner.
                touched.insert(topic);
                settle(deferred, reply, result, server)
            }
            Command::BecomeLeader { topic, epoch, reply } => {
                let result = with_topic(topics, topic, server, |t| become_leader(txn, t, epoch, server));
                touched.insert(topic);
                settle_state(deferred, reply, result, topics.get(&topic), server)
            }
            Command::Append { topic, producer, sequence, records, refused, reply } => {
                let result = with_topic(topics, topic, server, |t| {
                    append(txn, t, Batch { producer, sequence, records, refused }, server, now)
                });
                if result.as_ref().is_ok_and(|r| r.as_ref().is_ok_and(|a| !a.duplicate)) {
                    touched.insert(topic);
                }
                settle(deferred, reply, result, server)
            }
            Command::ReplicaAppend { topic, chunk, reply } => {
                let result = with_topic(topics, topic, server, |t| t.replicate(txn, chunk, server));
                touched.insert(topic);
                settle_state(deferred, reply, result, topics.get(&topic), server)
            }
            Command::Truncate { topic, to, reply } => {
                let result = with_topic(topics, topic, server, |t| {
                    if t.leading.is_some() {
                        return Ok(Err(Error::internal(format!(
                            "{} leads its epoch; it truncates nothing",
                            t.name()
                        ))));
                    }
                    t.truncate(txn, to)
                });
                touched.insert(topic);
                settle_state(deferred, reply, result, topics.get(&topic), server)
            }
            Command::Reset { topic, reset, reply } => {
                let result = with_topic(topics, topic, server, |t| {
                    if t.leading.is_some() {
                        return Ok(Err(Error::internal(format!(
                            "{} leads its epoch; it takes no reset",
                            t.name()
                        ))));
                    }
                    t.reset(txn, reset).map(Ok)
                });
                touched.insert(topic);
                settle_state(deferred, reply, result, topics.get(&topic), server)
            }
            Command::Commit { topic, index, reply } => {
                let result = with_topic(topics, topic, server, |t| t.apply(txn, index).map(Ok));
                touched.insert(topic);
                settle(deferred, reply, result, server)
            }
            Command::ExpireProducers { topic, cutoff_ms, reply } => {
                let result =
                    with_topic(topics, topic, server, |t| t.expire_producers(txn, cutoff_ms).map(Ok));
                settle(deferred, reply, result, server)
            }
            Command::Ack { topic, subscription, next, reply } => {
                let result = with_topic(topics, topic, server, |t| ack(txn, t, &subscription, next, server));
                touched.insert(topic);
                settle(deferred, reply, result, server)
            }
            Command::CreateSubscription { topic, subscription, from, if_missing, reply } => {
                let result = with_topic(topics, topic, server, |t| {
                    create_subscription(txn, t, &subscription, from, if_missing, server)
                });
                touched.insert(topic);
                settle(deferred, reply, result, server)
            }
            Command::DeleteSubscription { topic, subscription, reply } => {
                let result =
                    with_topic(topics, topic, server, |t| delete_subscription(txn, t, &subscription, server));
                touched.insert(topic);
                settle(deferred, reply, result, server)
            }
            Command::ResetCursor { topic, subscription, to, execute, reply } => {
                let result = with_topic(topics, topic, server, |t| {
                    reset_cursor(txn, t, &subscription, to, execute, server)
                });
                touched.insert(topic);
                settle(deferred, reply, result, server)
            }
        }
    }
}

/// Runs `op` on the topic if this server hosts it.
fn with_topic<T>(
    topics: &mut BTreeMap<TopicId, WriterTopic>,
    id: TopicId,
    server: ServerId,
    op: impl FnOnce(&mut WriterTopic) -> StorageResult<Result<T, Error>>,
) -> StorageResult<Result<T, Error>> {
    match topics.get_mut(&id) {
        None => Ok(Err(Error::NotLeader { topic: format!("#{id}"), server, leader: None })),
        Some(t) => op(t),
    }
}

fn storage_error(server: ServerId, e: &redb::Error) -> Error {
    Error::Storage { server, detail: e.to_string() }
}

/// Defers the answer of a command until the group commits; a storage failure answers it at
/// once with the error and abandons the group.
fn settle<T: Send + 'static>(
    deferred: &mut Deferred,
    reply: Reply<T>,
    result: StorageResult<Result<T, Error>>,
    server: ServerId,
) -> StorageResult<()> {
    match result {
        Ok(r) => {
            defer(deferred, reply, r);
            Ok(())
        }
        Err(e) => {
            let _ = reply.send(Err(storage_error(server, &e)));
            Err(e)
        }
    }
}

/// [`settle`] for commands answered with the topic's state after the commit.
fn settle_state(
    deferred: &mut Deferred,
    reply: Reply<LogState>,
    result: StorageResult<Result<(), Error>>,
    topic: Option<&WriterTopic>,
    server: ServerId,
) -> StorageResult<()> {
    match (result, topic) {
        (Ok(r), Some(t)) => {
            defer_state(deferred, reply, r, t.state.subscribe());
            Ok(())
        }
        (Ok(r), None) => {
            defer(deferred, reply, r.and(Err(Error::internal("topic gone"))));
            Ok(())
        }
        (Err(e), _) => {
            let _ = reply.send(Err(storage_error(server, &e)));
            Err(e)
        }
    }
}
