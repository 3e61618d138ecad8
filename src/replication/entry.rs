//! What the replicated log holds, and what travels from a leader to its followers.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::producers::ProducerState;
use crate::types::{Epoch, Index, Offset, ProducerId, Sequence};

/// One entry of a topic's replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The epoch of the leader that wrote it.
    pub epoch: Epoch,
    /// The record log's end after this entry (one past its last record, for a batch).
    pub end: Offset,
    pub kind: EntryKind,
}

/// What an entry does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// The first entry of every epoch. A new leader learns where the commit point is once
    /// this commits (Raft's no-op): everything before it is then committed too, cursor
    /// moves included, and the leader may serve consumers.
    Begin,
    /// A producer's batch: records `end - count .. end`, stored apart from the entry.
    Batch {
        count: u32,
        timestamp_ms: u64,
        /// Who sent it, so every replica rebuilds the producer's dedup window from the log.
        producer: Option<(ProducerId, Sequence)>,
    },
    /// A producer's batch refused as a whole (a record over the size limit, a schema
    /// violation): it stores nothing, but uses its sequence number on every replica, so the
    /// producer's next batch is in order wherever it lands.
    Refused { producer: ProducerId, sequence: Sequence },
    /// A subscription's cursor is set (`None`: the subscription is deleted). Once the entry
    /// is applied, records below `log_start` are deleted: it is the lowest cursor after the
    /// change (never lower than the log start before it), so a change and the deletion it
    /// allows commit together, in the log's one order.
    Cursor { subscription: String, cursor: Option<Cursor>, log_start: Offset },
}

impl Entry {
    /// Offset of a batch's first record (`end` for other entries).
    pub fn base(&self) -> Offset {
        match &self.kind {
            EntryKind::Batch { count, .. } => self.end - *count as Offset,
            _ => self.end,
        }
    }
}

/// A subscription's durable position, and what the backlog policy took from it (G6: an
/// eviction is recorded, and reported to the next consumer, never a silent skip).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The next offset to read.
    pub next: Offset,
    /// Records the `evict` policy skipped that no consumer has been told of yet.
    pub unreported: u64,
    /// Records the `evict` policy ever skipped.
    pub evicted: u64,
    /// When it last did (ms since the Unix epoch; 0: never).
    pub evicted_at_ms: u64,
}

impl Cursor {
    pub fn at(next: Offset) -> Self {
        Self { next, ..Self::default() }
    }
}

/// Bytes a shipped entry takes beyond its records' own (index, entry header, counts): an
/// upper bound, for sizing replication chunks.
pub const SHIPPED_ENTRY_OVERHEAD: usize = 96;

/// An entry as the leader ships it. A batch carries its records as the leader stores them:
/// one record chunk ([`crate::storage::chunk`]), forwarded as bytes and checked by its
/// checksum on arrival, never decoded on the way. Only the last records when the leader
/// already deleted the first (they are below the log start everywhere the entry is applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippedEntry {
    pub index: Index,
    pub entry: Entry,
    /// The batch's stored records as one chunk; empty for other entries, and for a batch
    /// whose records were all deleted.
    pub chunk: Bytes,
}

impl ShippedEntry {
    /// Its size in a replication chunk (at most; see [`SHIPPED_ENTRY_OVERHEAD`]).
    pub fn encoded_size(&self) -> usize {
        SHIPPED_ENTRY_OVERHEAD + self.chunk.len()
    }
}

/// A leader's answer with entries: what a follower writes in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaChunk {
    /// The leader's epoch.
    pub epoch: Epoch,
    /// Consecutive entries from the follower's log end on.
    pub entries: Vec<ShippedEntry>,
    /// The leader's commit point: entries below `commit_index` (records below `commit`)
    /// are committed.
    pub commit_index: Index,
    pub commit: Offset,
}

/// A follower's restart at the leader's first stored entry, after it fell behind what the
/// leader applied and compacted: the state those entries built, instead of the entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReset {
    /// The leader's first stored entry, and the record offset where it starts.
    pub start_index: Index,
    pub start_offset: Offset,
    /// Epoch boundaries before `start_index`.
    pub history: Vec<(Epoch, Index)>,
    /// The leader's applied state: entries below `applied` built `cursors` and `log_start`.
    pub applied: Index,
    pub log_start: Offset,
    pub cursors: Vec<(String, Cursor)>,
    pub producers: Vec<(ProducerId, ProducerState)>,
}
