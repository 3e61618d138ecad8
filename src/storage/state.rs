//! What storage tells the rest of the server about a topic: its stored meta, and the shape of
//! its log, published on a watch after every group commit.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::Error;
use crate::replication::{EpochHistory, ShippedEntry};
use crate::types::{Epoch, Index, Offset, ServerId, TopicId, TopicName};
use crate::wire::TopicConfig;

/// What a server stores about a topic it hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub id: TopicId,
    pub name: TopicName,
    pub config: TopicConfig,
    /// The voters and learners of the last assignment this server applied.
    pub voters: Vec<ServerId>,
    pub learners: Vec<ServerId>,
    /// The leader and epoch of the last assignment this server applied.
    pub leader: ServerId,
    pub epoch: Epoch,
    /// The newest epoch this replica promised to the naming server or followed: it refuses
    /// anything from an older one.
    pub promised: Epoch,
    /// Records below this offset are deleted (every subscription passed them).
    pub log_start: Offset,
    /// The first entry still stored, and the record offset it starts at; the entries before
    /// it were applied and their records deleted.
    pub start_index: Index,
    pub start_offset: Offset,
    /// Entries below this index are applied (cursor table, log start). Only grows; after a
    /// restart the entries after it are applied again.
    pub applied: Index,
    /// The `producers` table holds the dedup state the entries below this index built (a
    /// checkpoint, see `storage::dedup`); loading replays the entries from here on. Never
    /// below `start_index`: the entries it needs are not compacted away.
    pub producers_index: Index,
}

impl TopicMeta {
    /// A topic that is its own majority: it commits what is durable.
    pub fn is_solo(&self) -> bool {
        self.voters.len() <= 1 && self.learners.is_empty()
    }

    /// A new topic as the naming server placed it.
    pub fn new(
        id: TopicId,
        name: TopicName,
        config: TopicConfig,
        voters: Vec<ServerId>,
        learners: Vec<ServerId>,
        leader: ServerId,
        epoch: Epoch,
    ) -> Self {
        Self {
            id,
            name,
            config,
            voters,
            learners,
            leader,
            epoch,
            promised: 0,
            log_start: 0,
            start_index: 0,
            start_offset: 0,
            applied: 0,
            producers_index: 0,
        }
    }
}

/// The shape of a topic's log, published after every commit that changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    /// Records below this offset are deleted.
    pub log_start: Offset,
    /// One past the newest durable record.
    pub log_end: Offset,
    /// The first entry stored, and one past the newest durable entry.
    pub start_index: Index,
    pub end_index: Index,
    /// One past the newest entry written, durable or not: a leader shows followers the
    /// entries of a group commit while its own fsync is under way (see [`TopicLog::staged`]).
    pub staged_end: Index,
    /// One past the newest committed entry, and record: readable by consumers, acknowledged
    /// to producers. Set by the replication layer (the durable end for a single replica).
    pub commit_index: Index,
    pub commit: Offset,
    /// Entries below this are applied (the cursor table and log start reflect them).
    pub applied: Index,
    /// The epoch of the newest entry.
    pub epoch: Epoch,
    /// Epoch boundaries, consistent with `end_index`.
    pub history: Arc<EpochHistory>,
    /// The newest epoch this replica promised or followed.
    pub promised: Epoch,
    /// The epoch this replica leads, once it wrote that epoch's first entry (`None`: it
    /// follows, or was deposed).
    pub leading: Option<Epoch>,
    /// Bytes stored for `log_start..log_end` (the backlog).
    pub bytes: u64,
    /// Bytes deleted since this process opened the store (all subscriptions had read them).
    pub freed_bytes: u64,
    /// Records appended, and deleted, since this process opened the store.
    pub appended_records: u64,
    pub freed_records: u64,
    /// The first cursor entry not applied yet, if any (the leader applies committed ones).
    pub first_pending_cursor: Option<Index>,
}

/// A read handle on one topic: its identity and a watch on its durable and committed state.
#[derive(Debug)]
pub struct TopicLog {
    pub id: TopicId,
    pub name: TopicName,
    pub(super) state: StateTx,
    pub(super) staged: Arc<Mutex<Vec<ShippedEntry>>>,
}

impl TopicLog {
    /// The entries of the group commit under way from `from` on (contiguous, about
    /// `max_bytes` at most), or nothing if `from` is not one of them. A leader serves them to
    /// followers so its fsync and theirs overlap; the majority rule still counts only durable
    /// copies, and a leader whose commit fails exits rather than reuse indexes its followers
    /// may already hold.
    pub fn staged(&self, from: Index, max_bytes: usize) -> Vec<ShippedEntry> {
        let staged = self.staged.lock().expect("staged lock");
        let Some(first) = staged.iter().position(|e| e.index == from) else { return Vec::new() };
        let mut bytes = 0;
        let mut out = Vec::new();
        for e in &staged[first..] {
            let size = e.encoded_size();
            if bytes + size > max_bytes && !out.is_empty() {
                break;
            }
            bytes += size;
            out.push(e.clone());
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

    /// Publishes a new commit point (the replication layer's decision). It never moves
    /// backwards and never passes the durable log end.
    pub fn set_commit(&self, index: Index, offset: Offset) {
        self.state.send_if_modified(|s| {
            if index > s.commit_index && index <= s.end_index {
                s.commit_index = index;
                s.commit = offset.min(s.log_end).max(s.commit);
                true
            } else {
                false
            }
        });
    }

    /// Wakes everything waiting on the state (e.g. after a role change).
    pub fn poke(&self) {
        self.state.send_modify(|_| {});
    }

    /// Notes in the store's [`ChangedTopics`] that something about this topic outside its
    /// state changed (its replica's role, a follower's progress).
    pub fn mark_changed(&self) {
        self.state.changed.mark(self.id);
    }
}

/// The topics whose state changed since each reader last took them: a server re-reads only
/// those to tell the naming server and its leaders what changed, so an idle topic costs
/// nothing. At most one entry per hosted topic and reader (a deleted topic's lasts until
/// the next take).
#[derive(Debug, Default)]
pub struct ChangedTopics([Mutex<HashSet<TopicId>>; 2]);

/// Who reads [`ChangedTopics`]; each takes its own set.
#[derive(Debug, Clone, Copy)]
pub enum ChangeReader {
    /// The heartbeat's topic reports (`server::ReportLedger`).
    Reports = 0,
    /// The epochs a follower tells its leaders it follows in (`server::Followed`).
    FollowerAlive = 1,
}

impl ChangedTopics {
    pub fn mark(&self, id: TopicId) {
        for set in &self.0 {
            set.lock().expect("changed lock").insert(id);
        }
    }

    /// The topics changed since `reader` last took them.
    pub fn take(&self, reader: ChangeReader) -> HashSet<TopicId> {
        std::mem::take(&mut *self.0[reader as usize].lock().expect("changed lock"))
    }
}

/// A topic's state channel: every change it publishes is also noted in [`ChangedTopics`].
#[derive(Debug, Clone)]
pub(super) struct StateTx {
    tx: watch::Sender<LogState>,
    id: TopicId,
    changed: Arc<ChangedTopics>,
}

impl StateTx {
    pub(super) fn new(state: LogState, id: TopicId, changed: Arc<ChangedTopics>) -> Self {
        Self { tx: watch::Sender::new(state), id, changed }
    }

    pub(super) fn borrow(&self) -> watch::Ref<'_, LogState> {
        self.tx.borrow()
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<LogState> {
        self.tx.subscribe()
    }

    pub(super) fn send_modify(&self, modify: impl FnOnce(&mut LogState)) {
        self.tx.send_modify(modify);
        self.changed.mark(self.id);
    }

    pub(super) fn send_replace(&self, state: LogState) {
        self.tx.send_replace(state);
        self.changed.mark(self.id);
    }

    pub(super) fn send_if_modified(&self, modify: impl FnOnce(&mut LogState) -> bool) {
        if self.tx.send_if_modified(modify) {
            self.changed.mark(self.id);
        }
    }
}

/// Outcome of an append.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    pub base: Offset,
    pub count: u32,
    /// The batch's entry: the ack waits until it is committed.
    pub at: Pending,
    /// A retry answered from the dedup window; nothing was stored.
    pub duplicate: bool,
    /// The batch was refused, for this reason, once `at` commits: a refusal uses the batch's
    /// sequence number on every replica (see [`EntryKind::Refused`](crate::replication::EntryKind::Refused)).
    pub refused: Option<Error>,
}

/// An entry a caller waits to see committed (and applied): its index, and the epoch it was
/// written in, so a different entry at the same index never counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub index: Index,
    pub epoch: Epoch,
}

/// Outcome of a cursor change: the cursor after it, and the entry that made it (if it
/// changed anything, or an earlier change is still pending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorChange {
    pub cursor: Offset,
    pub pending: Option<Pending>,
}
