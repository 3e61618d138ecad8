//! Epoch history and the divergence rule: KIP-279's, counted in entry indexes.

use serde::{Deserialize, Serialize};

use crate::types::{Epoch, Index};

/// Epoch boundaries of one replica's log: `(epoch, index of its first entry)`.
///
/// Every epoch starts with a [`Begin`](super::EntryKind::Begin) entry, so a boundary is a real
/// entry, and a replica that holds an epoch's boundary holds the entries of that epoch's
/// leader up to its own log end.
///
/// Invariants: epochs strictly increase; start indexes strictly increase.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochHistory {
    entries: Vec<(Epoch, Index)>,
}

impl EpochHistory {
    pub fn new(entries: Vec<(Epoch, Index)>) -> Self {
        debug_assert!(entries.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1), "{entries:?}");
        Self { entries }
    }

    pub fn entries(&self) -> &[(Epoch, Index)] {
        &self.entries
    }

    /// The epoch of the newest entry (0 for an empty history).
    pub fn last_epoch(&self) -> Epoch {
        self.entries.last().map_or(0, |e| e.0)
    }

    /// Epoch of the entry at `index` (0 if before every boundary).
    pub fn epoch_at(&self, index: Index) -> Epoch {
        self.entries.iter().rev().find(|(_, start)| *start <= index).map_or(0, |e| e.0)
    }

    /// The largest epoch not above `epoch`, and where it ends in this log (the next
    /// boundary's start, or `log_end`). `(0, first start)` when every epoch is above it.
    pub fn end_index_for(&self, epoch: Epoch, log_end: Index) -> (Epoch, Index) {
        match self.entries.iter().rposition(|(e, _)| *e <= epoch) {
            None => (0, self.entries.first().map_or(log_end, |e| e.1).min(log_end)),
            Some(i) => (self.entries[i].0, self.entries.get(i + 1).map_or(log_end, |e| e.1)),
        }
    }

    /// Records that the entry at `start` opens `epoch`; ignored unless `epoch` is newer than
    /// the last one (entries of one epoch after its first add nothing).
    pub fn assign(&mut self, epoch: Epoch, start: Index) -> bool {
        if epoch <= self.last_epoch() {
            return false;
        }
        debug_assert!(self.entries.last().is_none_or(|e| e.1 < start), "{:?} then {start}", self.entries);
        self.entries.push((epoch, start));
        true
    }

    /// Drops boundaries at or past `index` (after the log was truncated to `index`).
    pub fn truncate(&mut self, index: Index) {
        self.entries.retain(|(_, start)| *start < index);
    }

    /// The boundaries of entries before `index` (what a replica restarted at `index` needs).
    pub fn prefix(&self, index: Index) -> Vec<(Epoch, Index)> {
        self.entries.iter().copied().filter(|(_, start)| *start < index).collect()
    }
}

/// The shape of a replica's log the rules look at.
#[derive(Debug, Clone, Copy)]
pub struct LogView<'a> {
    /// The first entry still stored (entries before it were applied and compacted).
    pub start_index: Index,
    /// One past the last entry.
    pub end_index: Index,
    pub history: &'a EpochHistory,
}

/// Where a follower truncates after a [`Diverging`](super::FetchDecision::Diverging) answer:
/// the smaller of the leader's end for `end_epoch` and the follower's own end for that
/// epoch, never below its log start. What it drops was never committed (the leader holds
/// every committed entry, with the same epochs).
pub fn truncation_point(own: &LogView, end_epoch: Epoch, end_index: Index) -> Index {
    let (_, own_end) = own.history.end_index_for(end_epoch, own.end_index);
    end_index.min(own_end).min(own.end_index).max(own.start_index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_history_answers_divergence_questions() {
        let h = EpochHistory::new(vec![(1, 0), (2, 4), (4, 6)]);
        assert_eq!(h.end_index_for(1, 10), (1, 4));
        assert_eq!(h.end_index_for(3, 10), (2, 6), "largest epoch not above 3 is 2, ending at 6");
        assert_eq!(h.end_index_for(4, 10), (4, 10));
        assert_eq!(h.end_index_for(0, 10), (0, 0));
        assert_eq!(h.epoch_at(5), 2);
        assert_eq!(h.prefix(6), vec![(1, 0), (2, 4)]);
        // A follower with (1,0),(3,5) and end 8 against this leader converges to 4 in rounds.
        let mut f = EpochHistory::new(vec![(1, 0), (3, 5)]);
        let mut end = 8;
        for _ in 0..5 {
            let (e, leader_end) = h.end_index_for(f.last_epoch(), 10);
            if e == f.last_epoch() && leader_end >= end {
                break;
            }
            end = truncation_point(&LogView { start_index: 0, end_index: end, history: &f }, e, leader_end);
            f.truncate(end);
        }
        assert_eq!((f.last_epoch(), end), (1, 4));
    }
}
