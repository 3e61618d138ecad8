//! Producer dedup state (G4): the outcomes of each producer's recent batches. It is rebuilt by
//! every replica from the batches in its log, so a new leader answers a retry as the old one
//! would have.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::types::{Epoch, Index, Offset, Sequence};

/// Batches a producer may have unacknowledged and still be deduplicated on retry. The client
/// keeps its in-flight window below this (`client::MAX_INFLIGHT`).
pub const PRODUCER_DEDUP_WINDOW: usize = 128;

/// Recent batches of one producer, for deduplicating retries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    pub last_sequence: Sequence,
    /// Oldest first, at most [`PRODUCER_DEDUP_WINDOW`] entries.
    pub recent: VecDeque<BatchOutcome>,
    /// When its last batch was appended (the batch's timestamp, so replicas agree).
    pub last_ms: u64,
}

/// How one batch of a producer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOutcome {
    pub sequence: Sequence,
    pub base: Offset,
    pub count: u32,
    /// The entry that recorded the batch (or its refusal): an ack of a retry waits for
    /// this very entry to commit.
    pub index: Index,
    pub epoch: Epoch,
    /// The batch was refused (e.g. a record over the size limit); it still used its sequence
    /// number so the batches after it are not out of order.
    pub rejected: bool,
}

impl ProducerState {
    pub fn record(&mut self, outcome: BatchOutcome, at_ms: u64) {
        self.last_ms = self.last_ms.max(at_ms);
        self.last_sequence = outcome.sequence;
        self.recent.push_back(outcome);
        while self.recent.len() > PRODUCER_DEDUP_WINDOW {
            self.recent.pop_front();
        }
    }

    /// The outcome of batch `sequence`, if it is in the window.
    pub fn find(&self, sequence: Sequence) -> Option<&BatchOutcome> {
        self.recent.iter().find(|b| b.sequence == sequence)
    }

    /// Forgets the batches whose entries are at or after `index` (the log was truncated
    /// there, or a replica restarts there from a leader's state); returns whether anything
    /// changed.
    pub fn truncate(&mut self, index: Index) -> bool {
        let before = self.recent.len();
        self.recent.retain(|b| b.index < index);
        if self.recent.len() == before {
            return false;
        }
        self.last_sequence = self.recent.back().map_or(0, |b| b.sequence);
        true
    }
}
