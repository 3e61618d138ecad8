//! The writer's view of one topic, and every change to it: entries written by the leader or
//! received by a follower, truncation, restart at the leader's state, applying committed
//! entries (cursors, deletion, compaction).
//!
//! Each change writes its rows in the group's transaction and updates memory at once; if
//! the group's commit fails the writer reloads memory from disk (see `writer`), so memory
//! never runs ahead of what is durable for long.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use redb::ReadableTable;
use tracing::{error, info};

use super::backlog::Evicting;
use super::chunk::{self, Chunk};
use super::dedup::Dedup;
use super::state::{ChangedTopics, LogState, Pending, StateTx, TopicLog, TopicMeta};
use super::tables::{decode, encode, stored_chunk_end, CHUNKS, CURSORS, ENTRIES, EPOCHS, PRODUCERS, TOPICS};
use super::writer::{StorageResult, Tx};
use crate::error::Error;
use crate::replication::{
    Cursor, CursorState, Entry, EntryKind, EpochHistory, PendingCursor, ReplicaChunk, ReplicaReset,
    ShippedEntry,
};
use crate::types::{Epoch, Index, Offset, ServerId, TopicId};

/// Applied entries kept below the compaction point for followers a little behind, so they
/// need not restart from the leader's state. Entries are small once their records are gone.
pub const RETAINED_ENTRIES: u64 = 4096;

/// Entries compacted at once at least (deleting rows one batch at a time costs less).
pub const COMPACT_BATCH: u64 = 1024;

/// How many applied entries a topic keeps, and compacts at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub retained: u64,
    pub batch: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self { retained: RETAINED_ENTRIES, batch: COMPACT_BATCH }
    }
}

/// A producer silent this long is forgotten (its dedup state is dropped), so the state of
/// short-lived producers (every `herald produce` is one) does not pile up. A retry after that
/// long would be appended again; Kafka's default for the same is a day as well.
pub const PRODUCER_STATE_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// Batches a topic takes between two sweeps of its expired producers.
pub(super) const PRODUCER_SWEEP_EVERY: u32 = 4096;

/// The writer's view of one topic.
pub(super) struct WriterTopic {
    pub meta: TopicMeta,
    /// One past the newest entry, and the record end after it.
    pub end_index: Index,
    pub log_end: Offset,
    /// A follower's latest word from the leader on the commit point; published with the
    /// durable state once this replica's own write has committed.
    pub leader_commit: (Index, Offset),
    pub history: EpochHistory,
    pub cursors: CursorState,
    pub dedup: Dedup,
    /// The epoch this replica leads, once it wrote that epoch's first entry. Never set on
    /// load: a restarted replica leads again only in a new epoch.
    pub leading: Option<Epoch>,
    pub state: StateTx,
    /// Bytes stored for `log_start..log_end`.
    pub bytes: u64,
    /// Bytes deleted since the store was opened.
    pub freed_bytes: u64,
    /// Records appended, and deleted, since the store was opened.
    pub appended_records: u64,
    pub freed_records: u64,
    /// The last eviction's reach, while its records wait to be deleted (see `backlog`).
    pub evicting: Option<Evicting>,
    /// Batches since expired producers were last swept.
    pub batches_since_sweep: u32,
    /// Entries written in the group under way, not yet shown to followers (leader only).
    pub appended: Vec<ShippedEntry>,
    pub retention: Retention,
    /// This replica started leading in the group under way: nothing of that group is shown
    /// before it is durable, so an epoch is never seen by a follower before its leader can
    /// remember having led it (and refuse to lead it again after a crash).
    pub begun: bool,
    /// Entries of the group under way shown to followers (the leader's side of
    /// [`TopicLog::staged`]); emptied once the group is durable.
    pub staged: Arc<Mutex<Vec<ShippedEntry>>>,
}

impl WriterTopic {
    /// A topic with nothing stored but its meta.
    pub fn empty(meta: TopicMeta, retention: Retention, changed: &Arc<ChangedTopics>) -> Self {
        let cursors = CursorState::new(BTreeMap::new(), meta.applied, meta.log_start);
        let t = Self {
            end_index: meta.start_index,
            log_end: meta.start_offset,
            leader_commit: (meta.start_index, meta.start_offset),
            history: EpochHistory::default(),
            cursors,
            dedup: Dedup::default(),
            leading: None,
            state: StateTx::new(
                LogState {
                    log_start: 0,
                    log_end: 0,
                    start_index: 0,
                    end_index: 0,
                    staged_end: 0,
                    commit_index: 0,
                    commit: 0,
                    applied: 0,
                    epoch: 0,
                    history: Arc::default(),
                    promised: 0,
                    leading: None,
                    bytes: 0,
                    freed_bytes: 0,
                    appended_records: 0,
                    freed_records: 0,
                    first_pending_cursor: None,
                },
                meta.id,
                changed.clone(),
            ),
            bytes: 0,
            freed_bytes: 0,
            appended_records: 0,
            freed_records: 0,
            evicting: None,
            batches_since_sweep: 0,
            appended: Vec::new(),
            retention,
            begun: false,
            staged: Arc::default(),
            meta,
        };
        t.state.send_replace(t.snapshot(None));
        t
    }

    pub fn handle(&self) -> Arc<TopicLog> {
        Arc::new(TopicLog {
            id: self.meta.id,
            name: self.meta.name.clone(),
            state: self.state.clone(),
            staged: self.staged.clone(),
        })
    }

    pub fn name(&self) -> String {
        self.meta.name.to_string()
    }

    /// The state as stored now; `commit` keeps a published commit point that is still valid.
    pub fn snapshot(&self, published: Option<&LogState>) -> LogState {
        let commit = if self.meta.is_solo() {
            (self.end_index, self.log_end)
        } else {
            let (mut i, mut o) = self.leader_commit;
            if let Some(p) = published {
                if p.commit_index > i {
                    (i, o) = (p.commit_index, p.commit);
                }
            }
            if i > self.end_index {
                (i, o) = (self.end_index, self.log_end);
            }
            (i, o)
        };
        LogState {
            log_start: self.meta.log_start,
            log_end: self.log_end,
            start_index: self.meta.start_index,
            end_index: self.end_index,
            staged_end: self.end_index,
            commit_index: commit.0,
            commit: commit.1,
            applied: self.cursors.applied_index(),
            epoch: self.history.last_epoch(),
            history: match published {
                Some(p) if *p.history == self.history => p.history.clone(),
                _ => Arc::new(self.history.clone()),
            },
            promised: self.meta.promised,
            leading: self.leading,
            bytes: self.bytes,
            freed_bytes: self.freed_bytes,
            appended_records: self.appended_records,
            freed_records: self.freed_records,
            first_pending_cursor: self.cursors.first_pending(),
        }
    }

    /// Shows followers the entries written in this group before it is durable. Returns
    /// whether there were any.
    pub fn stage(&mut self) -> bool {
        if std::mem::take(&mut self.begun) {
            self.appended.clear();
        }
        if self.appended.is_empty() {
            return false;
        }
        self.staged.lock().expect("staged lock").append(&mut self.appended);
        let end = self.end_index;
        self.state.send_modify(|s| s.staged_end = end);
        true
    }

    /// Publishes the durable state.
    pub fn publish(&self) {
        self.staged.lock().expect("staged lock").clear();
        self.state.send_modify(|s| *s = self.snapshot(Some(s)));
    }

    pub fn unknown_subscription(&self, subscription: &str) -> Error {
        Error::UnknownSubscription { topic: self.name(), subscription: subscription.to_string() }
    }

    /// `NotLeader` unless this replica leads its current epoch.
    pub fn check_leading(&self, server: ServerId) -> Result<Epoch, Error> {
        match self.leading {
            Some(e) if e == self.history.last_epoch() && e >= self.meta.promised => Ok(e),
            _ => Err(Error::NotLeader {
                topic: self.name(),
                server,
                leader: (self.meta.leader != server).then_some(self.meta.leader),
            }),
        }
    }

    pub fn save_meta(&self, txn: &Tx) -> StorageResult<()> {
        txn.open(TOPICS)?.insert(self.meta.id, encode(&self.meta).as_slice())?;
        Ok(())
    }

    /// Writes the producers' dedup checkpoint as of the log end (see `dedup`).
    fn checkpoint_producers(&mut self, txn: &Tx) -> StorageResult<()> {
        self.dedup.checkpoint(txn, self.meta.id)?;
        self.meta.producers_index = self.end_index;
        self.save_meta(txn)
    }

    /// Appends one entry (and a batch's records, the last ones of it: `chunk`, a stored record
    /// chunk, empty for other entries) at the log end, whoever wrote it. Returns its index.
    pub fn write_entry(&mut self, txn: &Tx, entry: Entry, chunk: Bytes, ship: bool) -> StorageResult<Index> {
        let index = self.end_index;
        let id = self.meta.id;
        txn.open(ENTRIES)?.insert((id, index), encode(&entry).as_slice())?;
        if self.history.assign(entry.epoch, index) {
            txn.open(EPOCHS)?.insert((id, entry.epoch), index)?;
        }
        if let EntryKind::Batch { .. } = &entry.kind {
            self.store_chunk(txn, entry.end, &chunk)?;
        }
        match (self.dedup.record(index, &entry), &entry.kind) {
            (Some(producer), EntryKind::Batch { .. }) => {
                self.batches_since_sweep += 1;
                self.dedup.keep_within_limit(producer);
            }
            // Entries a reset follower receives again were applied in the leader's state.
            (_, EntryKind::Cursor { subscription, cursor, log_start })
                if index >= self.cursors.applied_index() =>
            {
                let pending = PendingCursor {
                    subscription: subscription.clone(),
                    cursor: *cursor,
                    log_start: *log_start,
                };
                self.cursors.push(index, pending);
            }
            _ => {}
        }
        self.log_end = entry.end;
        self.end_index = index + 1;
        if self.dedup.checkpoint_due() {
            self.checkpoint_producers(txn)?;
        }
        if ship {
            self.appended.push(ShippedEntry { index, entry, chunk });
        }
        Ok(index)
    }

    /// Puts a peer's copy of the chunk at `base` in place of a damaged one (F19). The copy
    /// must pass its checksum and hold exactly the records the damaged chunk held: from
    /// `base` to the next chunk (or the log end). Committed chunks at the same offsets are
    /// byte-identical on every replica, so a copy that passes these checks is the chunk that
    /// was lost. Returns whether it replaced anything: a chunk that reads well now (repaired
    /// already) or that is gone (deleted, truncated) is left alone.
    pub fn repair_chunk(
        &mut self,
        txn: &Tx,
        base: Offset,
        copy: &[u8],
        server: ServerId,
    ) -> StorageResult<Result<bool, Error>> {
        let id = self.meta.id;
        let table = &mut txn.open(CHUNKS)?;
        let stored = table.get((id, base))?.map(|v| v.value().to_vec());
        let Some(stored) = stored else { return Ok(Ok(false)) };
        if Chunk::parse(&stored).is_ok() {
            return Ok(Ok(false));
        }
        let end = stored_chunk_end(&*table, id, base, self.log_end)?;
        let refuse = |why: String| {
            Ok(Err(Error::Storage {
                server,
                detail: format!(
                    "{}: a peer's copy of the chunk at offset {base} is refused: {why}",
                    self.name()
                ),
            }))
        };
        let chunk = match Chunk::parse(copy) {
            Ok(c) => c,
            Err(e) => return refuse(e.to_string()),
        };
        if chunk.end(base) != end {
            return refuse(format!("it ends at {}, the damaged one at {end}", chunk.end(base)));
        }
        table.insert((id, base), copy)?;
        Ok(Ok(true))
    }

    /// Stores a batch's records, the chunk of its last ones ending at `end`, as it came: a
    /// follower's copy is the leader's bytes. A follower restarted from a leader's state may
    /// already have its log start past the first of them (a newer leader that has not applied
    /// as far ships them): those are deleted here already, so it stores the rest, trimmed
    /// without decoding a record. The checksum is not computed again: the leader has just
    /// sealed the chunk, and a follower checked it before writing (`check_shipped`).
    fn store_chunk(&mut self, txn: &Tx, end: Offset, chunk: &[u8]) -> StorageResult<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let parsed = Chunk::parse_unchecked(chunk).map_err(corrupt)?;
        let first = end - parsed.count;
        let skip = self.meta.log_start.saturating_sub(first).min(parsed.count);
        let (mut counted, mut kept) = (0u64, 0u64);
        for raw in parsed.records().skip(skip as usize) {
            counted += parsed.stored_size(raw.map_err(corrupt)?);
            kept += 1;
        }
        if kept == 0 {
            return Ok(());
        }
        let table = &mut txn.open(CHUNKS)?;
        if skip == 0 {
            table.insert((self.meta.id, first), chunk)?;
        } else {
            let tail: Vec<&[u8]> =
                parsed.records().skip(skip as usize).collect::<Result<_, _>>().map_err(corrupt)?;
            table.insert(
                (self.meta.id, first + skip),
                chunk::encode_raw(parsed.timestamp_ms, &tail).as_slice(),
            )?;
        }
        self.bytes += counted;
        self.appended_records += kept;
        Ok(())
    }

    /// Leader: records a cursor change (`None` deletes the subscription) as an entry, with
    /// the log start it allows. Returns the entry to wait for.
    pub fn set_cursor(
        &mut self,
        txn: &Tx,
        subscription: &str,
        cursor: Option<Cursor>,
        epoch: Epoch,
    ) -> StorageResult<Pending> {
        let mut latest = self.cursors.latest_all();
        match cursor {
            Some(c) => latest.insert(subscription.to_string(), c),
            None => latest.remove(subscription),
        };
        let log_start = self.cursors.log_start_after(&latest).min(self.log_end);
        let kind = EntryKind::Cursor { subscription: subscription.to_string(), cursor, log_start };
        let entry = Entry { epoch, end: self.log_end, kind };
        let ship = !self.meta.is_solo();
        let index = self.write_entry(txn, entry, Bytes::new(), ship)?;
        Ok(Pending { index, epoch })
    }

    /// The entry that set a subscription's latest cursor, if it is not applied yet: a caller
    /// told of that cursor must wait for it.
    pub fn pending_change(&self, subscription: &str) -> Option<Pending> {
        let index = self.cursors.pending_index(subscription)?;
        Some(Pending { index, epoch: self.history.epoch_at(index) })
    }

    /// Follower: writes what the leader sent. Refuses a stale leader, and entries that do
    /// not start at its log end.
    pub fn replicate(
        &mut self,
        txn: &Tx,
        chunk: ReplicaChunk,
        server: ServerId,
    ) -> StorageResult<Result<(), Error>> {
        if chunk.epoch < self.meta.promised {
            return Ok(Err(Error::StaleEpoch {
                topic: self.name(),
                server,
                epoch: chunk.epoch,
                current: self.meta.promised,
            }));
        }
        if self.leading.is_some() {
            return Ok(Err(Error::internal(format!("{} leads its epoch; it takes no entries", self.name()))));
        }
        if let Some(first) = chunk.entries.first() {
            if first.index != self.end_index {
                return Ok(Err(Error::internal(format!(
                    "replica of {} got entry {} but its log ends at {}",
                    self.name(),
                    first.index,
                    self.end_index
                ))));
            }
        }
        if let Some(e) = chunk.entries.iter().find_map(|e| check_shipped(e).err()) {
            return Ok(Err(Error::internal(format!(
                "{}: the leader's entries are refused: {e}",
                self.name()
            ))));
        }
        if chunk.epoch > self.meta.promised {
            self.meta.promised = chunk.epoch;
            self.save_meta(txn)?;
        }
        for shipped in chunk.entries {
            self.write_entry(txn, shipped.entry, shipped.chunk, false)?;
        }
        if self.batches_since_sweep >= PRODUCER_SWEEP_EVERY {
            // Dated by the log's own timestamps, so every replica forgets the same producers.
            let newest = self.dedup.states.values().map(|p| p.last_ms).max().unwrap_or(0);
            self.expire_producers(txn, newest.saturating_sub(PRODUCER_STATE_TTL_MS))?;
        }
        let commit = if chunk.commit_index <= self.end_index {
            (chunk.commit_index, chunk.commit)
        } else {
            (self.end_index, self.log_end)
        };
        if commit.0 > self.leader_commit.0 {
            self.leader_commit = commit;
        }
        self.apply(txn, self.leader_commit.0)?;
        Ok(Ok(()))
    }

    /// Follower: drops the divergent tail from `to` on. Never below what is applied: that
    /// is committed, and a rule asking for it is a bug to report, not to obey.
    pub fn truncate(&mut self, txn: &Tx, to: Index) -> StorageResult<Result<(), Error>> {
        let floor = self.cursors.applied_index().max(self.meta.start_index);
        if to < floor {
            error!(topic = %self.meta.name, to, applied = floor, "refusing to truncate applied (committed) entries");
            return Ok(Err(Error::internal(format!(
                "{}: truncation to {to} would drop committed entries (applied up to {floor})",
                self.name()
            ))));
        }
        if to >= self.end_index {
            return Ok(Ok(()));
        }
        let id = self.meta.id;
        let offset = self.offset_at(txn, to)?;
        info!(topic = %self.meta.name, from = to, to = self.end_index, records_from = offset, "truncating a divergent tail");
        txn.open(ENTRIES)?.retain_in((id, to)..(id, u64::MAX), |_, _| false)?;
        if offset < self.log_end {
            self.bytes = self.bytes.saturating_sub(truncate_records(txn, id, offset)?);
        }
        let dropped: Vec<Epoch> =
            self.history.entries().iter().filter(|(_, s)| *s >= to).map(|(e, _)| *e).collect();
        self.history.truncate(to);
        let mut epochs = txn.open(EPOCHS)?;
        for e in dropped {
            epochs.remove((id, e))?;
        }
        drop(epochs);
        self.cursors.truncate(to);
        let checkpoint_at = self.meta.producers_index;
        self.dedup.truncate(txn, id, checkpoint_at, to)?;
        self.end_index = to;
        self.log_end = offset;
        if checkpoint_at > to {
            self.checkpoint_producers(txn)?;
        }
        if self.leader_commit.0 > to {
            self.leader_commit = (to, offset);
        }
        self.evicting = None;
        Ok(Ok(()))
    }

    /// The record offset where entry `index` starts (the end of the one before it).
    fn offset_at(&self, txn: &Tx, index: Index) -> StorageResult<Offset> {
        if index <= self.meta.start_index {
            return Ok(self.meta.start_offset);
        }
        let entries = txn.open(ENTRIES)?;
        let value = entries.get((self.meta.id, index - 1))?;
        match value {
            Some(v) => Ok(decode::<Entry>(v.value()).map_err(corrupt)?.end),
            None => Ok(self.meta.start_offset),
        }
    }

    /// Follower: drops everything and restarts at the leader's first stored entry, with the
    /// state the entries before it built.
    pub fn reset(&mut self, txn: &Tx, reset: ReplicaReset) -> StorageResult<()> {
        info!(topic = %self.meta.name, start = reset.start_index, log_start = reset.log_start, "restarting the replica at the leader's first stored entry");
        let id = self.meta.id;
        txn.open(ENTRIES)?.retain_in((id, 0)..(id, u64::MAX), |_, _| false)?;
        delete_all_records(txn, id)?;
        self.bytes = 0;
        let mut epochs = txn.open(EPOCHS)?;
        epochs.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        for (e, s) in &reset.history {
            epochs.insert((id, *e), *s)?;
        }
        drop(epochs);
        self.history = EpochHistory::new(reset.history);
        let mut cursors = txn.open(CURSORS)?;
        cursors.retain_in((id, "")..(id + 1, ""), |_, _| false)?;
        for (name, c) in &reset.cursors {
            cursors.insert((id, name.as_str()), encode(c).as_slice())?;
        }
        drop(cursors);
        self.cursors.reset(reset.cursors.into_iter().collect(), reset.applied, reset.log_start);
        txn.open(PRODUCERS)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        self.dedup.reset(reset.producers, reset.start_index);
        self.dedup.checkpoint(txn, id)?;
        self.meta.producers_index = reset.start_index;
        self.meta.start_index = reset.start_index;
        self.meta.start_offset = reset.start_offset;
        self.meta.log_start = reset.log_start;
        self.meta.applied = reset.applied;
        self.end_index = reset.start_index;
        self.log_end = reset.start_offset;
        self.leader_commit = (reset.start_index, reset.start_offset);
        self.evicting = None;
        self.save_meta(txn)
    }

    /// Applies committed entries below `upto`: stores the cursors they set, deletes the
    /// records every subscription passed, and compacts entries nobody needs. Returns how many
    /// records were deleted.
    pub fn apply(&mut self, txn: &Tx, upto: Index) -> StorageResult<u64> {
        let upto = upto.min(self.end_index);
        let (changes, moved) = self.cursors.apply(upto);
        let id = self.meta.id;
        if !changes.is_empty() {
            let mut table = txn.open(CURSORS)?;
            for (name, cursor) in &changes {
                match cursor {
                    Some(c) => table.insert((id, name.as_str()), encode(c).as_slice())?,
                    None => table.remove((id, name.as_str()))?,
                };
            }
        }
        let mut freed = 0;
        if let Some(new_start) = moved {
            let target = new_start.min(self.log_end).max(self.meta.log_start);
            if target > self.meta.log_start {
                let bytes = delete_below(txn, id, self.meta.log_start, target, self.log_end)?;
                self.bytes = self.bytes.saturating_sub(bytes);
                self.freed_bytes += bytes;
                freed = target - self.meta.log_start;
                self.freed_records += freed;
            }
            self.meta.log_start = new_start.max(self.meta.log_start);
        }
        debug_assert!(
            self.cursors.applied_all().values().all(|c| c.next >= self.meta.log_start),
            "{}: applied cursors {:?} below the log start {} after applying to {upto}",
            self.meta.name,
            self.cursors.applied_all(),
            self.meta.log_start
        );
        let compacted = self.compact(txn)?;
        if !changes.is_empty() || moved.is_some() || compacted {
            self.meta.applied = self.cursors.applied_index();
            self.save_meta(txn)?;
        }
        Ok(freed)
    }

    /// Drops applied entries whose records are all deleted, in batches, keeping the last
    /// [`RETAINED_ENTRIES`] of them for followers a little behind.
    fn compact(&mut self, txn: &Tx) -> StorageResult<bool> {
        let limit = self.cursors.applied_index().saturating_sub(self.retention.retained);
        if limit < self.meta.start_index + self.retention.batch {
            return Ok(false);
        }
        let id = self.meta.id;
        let (mut to, mut offset) = (self.meta.start_index, self.meta.start_offset);
        {
            let entries = txn.open(ENTRIES)?;
            for row in entries.range((id, self.meta.start_index)..(id, limit))? {
                let (key, value) = row?;
                let entry: Entry = decode(value.value()).map_err(corrupt)?;
                if entry.end > self.meta.log_start {
                    break;
                }
                (to, offset) = (key.value().1 + 1, entry.end);
            }
        }
        if to == self.meta.start_index {
            return Ok(false);
        }
        if to > self.meta.producers_index {
            // The entries to drop are part of the dedup state: checkpoint it first.
            self.checkpoint_producers(txn)?;
        }
        txn.open(ENTRIES)?.retain_in((id, self.meta.start_index)..(id, to), |_, _| false)?;
        self.meta.start_index = to;
        self.meta.start_offset = offset;
        Ok(true)
    }

    /// Forgets the producers whose last batch is older than `cutoff_ms`; returns how many.
    pub fn expire_producers(&mut self, txn: &Tx, cutoff_ms: u64) -> StorageResult<usize> {
        self.batches_since_sweep = 0;
        let expired = self.dedup.expire(cutoff_ms);
        if expired > 0 {
            self.checkpoint_producers(txn)?;
            info!(topic = %self.meta.name, producers = expired, "forgot producers silent for a day");
        }
        Ok(expired)
    }
}

/// A stored value that does not decode: the store is damaged.
pub(super) fn corrupt(e: impl std::fmt::Display) -> redb::Error {
    redb::Error::Corrupted(format!("a stored value does not decode: {e}"))
}

/// Checks an entry a leader shipped before any of it is written: a batch's records come as
/// one chunk that passes its checksum, is framed as its header says, holds at most the
/// batch's records and carries its timestamp; other entries carry none. The records are
/// not decoded: the leader checked them when it took the batch.
fn check_shipped(shipped: &ShippedEntry) -> Result<(), String> {
    let at = shipped.index;
    match &shipped.entry.kind {
        _ if shipped.chunk.is_empty() => Ok(()),
        EntryKind::Batch { count, timestamp_ms, .. } => {
            let chunk = Chunk::parse(&shipped.chunk).map_err(|e| format!("entry {at}: {e}"))?;
            chunk.check_framing().map_err(|e| format!("entry {at}: {e}"))?;
            if chunk.count > u64::from(*count) || chunk.timestamp_ms != *timestamp_ms {
                return Err(format!(
                    "entry {at} is a batch of {count} records stamped {timestamp_ms}, its chunk holds {} stamped {}",
                    chunk.count, chunk.timestamp_ms
                ));
            }
            Ok(())
        }
        _ => Err(format!("entry {at} is not a batch but carries records")),
    }
}

/// Calls `each(offset, counted bytes)` for a topic's stored records `from..until`, in
/// order, until it returns false.
pub(super) fn each_record_size(
    txn: &Tx,
    topic: TopicId,
    from: Offset,
    until: Offset,
    mut each: impl FnMut(Offset, u64) -> bool,
) -> StorageResult<()> {
    if from >= until {
        return Ok(());
    }
    let table = txn.open(CHUNKS)?;
    let holding = table.range((topic, 0)..=(topic, from))?.next_back().transpose()?;
    let first = holding.map_or(from, |(k, _)| k.value().1);
    let mut rows = table.range((topic, first)..(topic, until))?.peekable();
    while let Some(row) = rows.next() {
        let (k, v) = row?;
        // A chunk runs to the next one, whatever its (maybe damaged) header says.
        let next = rows.peek().and_then(|r| r.as_ref().ok()).map_or(until, |(k, _)| k.value().1);
        if !chunk_record_sizes(k.value().1, v.value(), from, next, &mut each) {
            return Ok(());
        }
    }
    Ok(())
}

/// Calls `each(offset, size)` for the records `from..until` of the chunk stored at `base`;
/// false once `each` asked to stop. Sizes are read from the framing without the checksum
/// (counting needs no more). A chunk damaged so that its records cannot be told apart (see
/// `server::repair`) counts the stored bytes not yet counted once, at its next offset in
/// range: its records still go, are still truncated, and the count is near enough, where
/// failing would leave a replica unable to delete, truncate or even start.
pub(super) fn chunk_record_sizes(
    base: Offset,
    bytes: &[u8],
    from: Offset,
    until: Offset,
    each: &mut impl FnMut(Offset, u64) -> bool,
) -> bool {
    let Ok(chunk) = Chunk::parse_unchecked(bytes) else {
        let at = base.max(from);
        return at >= until || each(at, bytes.len() as u64);
    };
    let mut counted = 0u64;
    for (offset, raw) in (base..).zip(chunk.records()) {
        if offset >= until {
            return true;
        }
        let Ok(raw) = raw else {
            let at = offset.max(from);
            return at >= until || each(at, (bytes.len() as u64).saturating_sub(counted));
        };
        let size = chunk.stored_size(raw);
        counted += size;
        if offset >= from && !each(offset, size) {
            return false;
        }
    }
    true
}

/// Deletes a topic's records `from..until` (`from`: its log start); returns the bytes it
/// counted for them. Space comes back a chunk at a time: a chunk reaching past `until` stays
/// whole, and readers never see its records below the log start.
pub(super) fn delete_below(
    txn: &Tx,
    topic: TopicId,
    from: Offset,
    until: Offset,
    log_end: Offset,
) -> StorageResult<u64> {
    let mut freed = 0;
    each_record_size(txn, topic, from, until, |_, size| {
        freed += size;
        true
    })?;
    // Every chunk below the last one starting under `until` goes, and that one if it ends by
    // `until` (by where the next starts: its header may be damaged).
    let mut table = txn.open(CHUNKS)?;
    let Some(last) = table.range((topic, 0)..(topic, until))?.next_back().transpose()? else {
        return Ok(freed);
    };
    let last_base = last.0.value().1;
    drop(last);
    let last_goes = stored_chunk_end(&table, topic, last_base, log_end)? <= until;
    table.retain_in((topic, 0)..(topic, until), |(_, base), _| base == last_base && !last_goes)?;
    Ok(freed)
}

/// Deletes a topic's records from `offset` on (a divergent tail); a chunk that starts before
/// `offset` keeps its head. Returns the bytes it counted for them. Truncation cuts at an
/// entry's start and a chunk never spans two entries, so the head is kept only if that ever
/// changes: correct either way.
fn truncate_records(txn: &Tx, topic: TopicId, offset: Offset) -> StorageResult<u64> {
    let mut freed = 0;
    each_record_size(txn, topic, offset, u64::MAX, |_, size| {
        freed += size;
        true
    })?;
    let mut table = txn.open(CHUNKS)?;
    let head = match table.range((topic, 0)..(topic, offset))?.next_back() {
        Some(row) => {
            let (k, v) = row?;
            let (base, bytes) = (k.value().1, v.value());
            // Only a chunk the cut falls inside is read (and checked): one that ends before
            // it stays as it is, damaged or not (a peer's copy repairs it, `repair_chunk`).
            if Chunk::parse_unchecked(bytes).map_err(corrupt)?.end(base) > offset {
                let chunk = Chunk::parse(bytes).map_err(corrupt)?;
                let kept: Vec<&[u8]> = chunk
                    .records()
                    .take((offset - base) as usize)
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)?;
                Some((base, chunk::encode_raw(chunk.timestamp_ms, &kept)))
            } else {
                None
            }
        }
        None => None,
    };
    if let Some((base, buf)) = head {
        table.insert((topic, base), buf.as_slice())?;
    }
    table.retain_in((topic, offset)..=(topic, u64::MAX), |_, _| false)?;
    Ok(freed)
}

/// Deletes every record of a topic.
pub(super) fn delete_all_records(txn: &Tx, topic: TopicId) -> StorageResult<()> {
    txn.open(CHUNKS)?.retain_in((topic, 0)..=(topic, u64::MAX), |_, _| false)?;
    Ok(())
}
