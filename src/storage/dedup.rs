//! A topic's producer dedup state (G4) as the writer keeps it, and how it is made durable.
//!
//! The state is a function of the log: every batch entry (or refusal) records its producer's
//! outcome. So a produce writes only its entry and its records, not its producer's window
//! (up to [`PRODUCER_DEDUP_WINDOW`](crate::replication::PRODUCER_DEDUP_WINDOW) outcomes, a
//! few KiB, rewritten with every batch until storage format 5). The `producers` table is a
//! **checkpoint**: the state the entries below `TopicMeta::producers_index` built. Loading
//! reads it and replays the entries from there on; they are stored anyway (load reads them
//! for the log's shape). A checkpoint is written when that would no longer hold otherwise:
//! before compaction drops entries it still needs, when a producer is forgotten (a replay
//! must not bring it back), and when a truncation cuts below it.

use std::collections::{BTreeMap, BTreeSet};

use redb::ReadableTable;

use super::producers::MAX_PRODUCERS_PER_TOPIC;
use super::tables::{decode, encode, ENTRIES, PRODUCERS};
use super::topic::corrupt;
use super::writer::{StorageResult, Tx};
use crate::replication::{BatchOutcome, Entry, EntryKind, ProducerState};
use crate::types::{Index, ProducerId, TopicId};

/// The dedup state of one topic's producers, and what changed since its checkpoint.
#[derive(Debug, Default)]
pub(super) struct Dedup {
    pub states: BTreeMap<ProducerId, ProducerState>,
    /// Changed since the checkpoint (at most one per producer kept, so bounded by
    /// [`MAX_PRODUCERS_PER_TOPIC`]).
    changed: BTreeSet<ProducerId>,
    /// Forgotten since the checkpoint; a checkpoint is due before the group commits.
    forgotten: BTreeSet<ProducerId>,
}

impl Dedup {
    /// The state as of entry `to` (`Index::MAX`: the log end): the checkpoint of topic `id`
    /// (taken at entry `from`) with the outcomes of the stored entries `from..to` replayed
    /// over it.
    pub fn load(
        checkpoint: &impl ReadableTable<(u64, u64), &'static [u8]>,
        entries: &impl ReadableTable<(u64, u64), &'static [u8]>,
        id: TopicId,
        from: Index,
        to: Index,
    ) -> StorageResult<Self> {
        let mut dedup = Self::default();
        for row in checkpoint.range((id, 0)..=(id, u64::MAX))? {
            let (k, v) = row?;
            dedup.states.insert(k.value().1, decode(v.value()).map_err(corrupt)?);
        }
        dedup.replay(entries, id, from, to)?;
        Ok(dedup)
    }

    /// Records the outcomes of the stored entries `from..to`.
    fn replay(
        &mut self,
        entries: &impl ReadableTable<(u64, u64), &'static [u8]>,
        id: TopicId,
        from: Index,
        to: Index,
    ) -> StorageResult<()> {
        if from >= to {
            return Ok(());
        }
        for row in entries.range((id, from)..(id, to))? {
            let (k, v) = row?;
            self.record(k.value().1, &decode(v.value()).map_err(corrupt)?);
        }
        Ok(())
    }

    /// Records the outcome of the batch (or refusal) entry `index` holds; returns its
    /// producer, `None` for other entries.
    pub fn record(&mut self, index: Index, entry: &Entry) -> Option<ProducerId> {
        let (producer, outcome, at_ms) = match entry.kind {
            EntryKind::Batch { count, timestamp_ms, producer: Some((producer, sequence)) } => {
                let outcome = BatchOutcome {
                    sequence,
                    base: entry.base(),
                    count,
                    index,
                    epoch: entry.epoch,
                    rejected: false,
                };
                (producer, outcome, Some(timestamp_ms))
            }
            EntryKind::Refused { producer, sequence } => {
                let outcome = BatchOutcome {
                    sequence,
                    base: entry.end,
                    count: 0,
                    index,
                    epoch: entry.epoch,
                    rejected: true,
                };
                (producer, outcome, None)
            }
            _ => return None,
        };
        let state = self.states.entry(producer).or_default();
        let at_ms = at_ms.unwrap_or(state.last_ms);
        state.record(outcome, at_ms);
        self.changed.insert(producer);
        Some(producer)
    }

    /// Over [`MAX_PRODUCERS_PER_TOPIC`] (after `added` joined), forgets the producer silent
    /// the longest. Every replica does so as it applies the same entries (silence is measured
    /// in entry timestamps), and a leader admits a new producer only when that one has been
    /// silent for [`PRODUCER_EVICT_IDLE_MS`](super::producers::PRODUCER_EVICT_IDLE_MS).
    pub fn keep_within_limit(&mut self, added: ProducerId) {
        if self.states.len() <= MAX_PRODUCERS_PER_TOPIC {
            return;
        }
        let oldest = self
            .states
            .iter()
            .filter(|(id, _)| **id != added)
            .min_by_key(|(id, p)| (p.last_ms, **id))
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            self.forget(id);
        }
    }

    /// Forgets the producers whose last batch is older than `cutoff_ms`; returns how many.
    pub fn expire(&mut self, cutoff_ms: u64) -> usize {
        let expired: Vec<ProducerId> =
            self.states.iter().filter(|(_, p)| p.last_ms < cutoff_ms).map(|(id, _)| *id).collect();
        for id in &expired {
            self.forget(*id);
        }
        expired.len()
    }

    fn forget(&mut self, id: ProducerId) {
        self.states.remove(&id);
        self.changed.remove(&id);
        self.forgotten.insert(id);
    }

    /// A producer was forgotten since the checkpoint: replaying the entries after it could
    /// bring that producer back, so a checkpoint must be written at the log end.
    pub fn checkpoint_due(&self) -> bool {
        !self.forgotten.is_empty()
    }

    /// Writes the state as the checkpoint of topic `id` (the caller records the index it is
    /// taken at).
    pub fn checkpoint(&mut self, txn: &Tx, id: TopicId) -> StorageResult<()> {
        if self.changed.is_empty() && self.forgotten.is_empty() {
            return Ok(());
        }
        let mut table = txn.open(PRODUCERS)?;
        for producer in std::mem::take(&mut self.forgotten) {
            table.remove((id, producer))?;
        }
        for producer in std::mem::take(&mut self.changed) {
            if let Some(state) = self.states.get(&producer) {
                table.insert((id, producer), encode(state).as_slice())?;
            }
        }
        Ok(())
    }

    /// The log was truncated to `to` entries. From a checkpoint at or below `to` the state is
    /// rebuilt exactly (the checkpoint and the entries kept); from a later one (it counted
    /// entries now gone) each producer forgets the outcomes at or after `to`, and the caller
    /// takes a checkpoint at `to`.
    pub fn truncate(&mut self, txn: &Tx, id: TopicId, checkpoint_at: Index, to: Index) -> StorageResult<()> {
        debug_assert!(self.forgotten.is_empty(), "a forgotten producer is checkpointed at once");
        if checkpoint_at <= to {
            // Producers the replay does not touch are as the checkpoint stored them.
            *self = Self::load(&txn.open(PRODUCERS)?, &txn.open(ENTRIES)?, id, checkpoint_at, to)?;
            return Ok(());
        }
        for (producer, state) in self.states.iter_mut() {
            if state.truncate(to) {
                self.changed.insert(*producer);
            }
        }
        Ok(())
    }

    /// A follower restarts from the leader's state at entry `start`: the states the entries
    /// before it built (the entries from `start` on come again and record the rest). The
    /// caller empties the stored checkpoint; the next one writes every state.
    pub fn reset(&mut self, states: Vec<(ProducerId, ProducerState)>, start: Index) {
        *self = Self::default();
        for (producer, mut state) in states {
            state.truncate(start);
            if !state.recent.is_empty() {
                self.changed.insert(producer);
                self.states.insert(producer, state);
            }
        }
    }
}
