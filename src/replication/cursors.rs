//! Subscription cursors as the replicated log builds them.
//!
//! Cursor changes are entries of the log ([`EntryKind::Cursor`](super::EntryKind::Cursor)),
//! so they obey the record rules: one order, committed at a majority in the leader's epoch,
//! truncated by epoch when uncommitted and divergent, and held by every replica an election
//! may pick. A replica keeps two views:
//! - **applied**: the cursors built by the committed entries it applied (stored, and what
//!   consumers resume from), with the log start they allow;
//! - **latest**: applied plus the entries not yet applied, in order. The leader checks new
//!   changes against it (a cursor never moves back, a new subscription starts at or after
//!   the log start any earlier entry set), because those entries commit before the new one.

use std::collections::BTreeMap;

use super::entry::Cursor;
use crate::types::{Index, Offset};

/// A cursor entry not yet applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCursor {
    pub subscription: String,
    pub cursor: Option<Cursor>,
    pub log_start: Offset,
}

/// One replica's cursors: applied, and pending in log order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CursorState {
    applied: BTreeMap<String, Cursor>,
    /// Entries below this index are applied.
    applied_index: Index,
    /// Records below this offset may be deleted: every subscription passed them.
    applied_log_start: Offset,
    pending: BTreeMap<Index, PendingCursor>,
}

impl CursorState {
    /// The state entries below `applied_index` built.
    pub fn new(applied: BTreeMap<String, Cursor>, applied_index: Index, log_start: Offset) -> Self {
        Self { applied, applied_index, applied_log_start: log_start, pending: BTreeMap::new() }
    }

    pub fn applied_index(&self) -> Index {
        self.applied_index
    }

    pub fn applied_log_start(&self) -> Offset {
        self.applied_log_start
    }

    /// The applied cursor of a subscription.
    pub fn applied(&self, subscription: &str) -> Option<Cursor> {
        self.applied.get(subscription).copied()
    }

    /// Every applied cursor.
    pub fn applied_all(&self) -> &BTreeMap<String, Cursor> {
        &self.applied
    }

    /// Index of the first cursor entry not yet applied.
    pub fn first_pending(&self) -> Option<Index> {
        self.pending.keys().next().copied()
    }

    /// The latest cursor of a subscription (`None`: it does not exist, or its deletion is
    /// pending).
    pub fn latest(&self, subscription: &str) -> Option<Cursor> {
        match self.pending.values().rev().find(|p| p.subscription == subscription) {
            Some(p) => p.cursor,
            None => self.applied(subscription),
        }
    }

    /// The index of the newest pending entry about a subscription.
    pub fn pending_index(&self, subscription: &str) -> Option<Index> {
        self.pending.iter().rev().find(|(_, p)| p.subscription == subscription).map(|(i, _)| *i)
    }

    /// Every live subscription's latest cursor.
    pub fn latest_all(&self) -> BTreeMap<String, Cursor> {
        let mut out = self.applied.clone();
        for p in self.pending.values() {
            match p.cursor {
                Some(c) => out.insert(p.subscription.clone(), c),
                None => out.remove(&p.subscription),
            };
        }
        out
    }

    /// The log start once every entry held is applied.
    pub fn latest_log_start(&self) -> Offset {
        self.pending.values().map(|p| p.log_start).max().unwrap_or(0).max(self.applied_log_start)
    }

    /// The log start a change leading to the `latest` cursors allows: their lowest (records
    /// of a topic without subscriptions are kept), never below the log start before it.
    pub fn log_start_after(&self, latest: &BTreeMap<String, Cursor>) -> Offset {
        let before = self.latest_log_start();
        latest.values().map(|c| c.next).min().map_or(before, |lowest| lowest.max(before))
    }

    /// Notes a cursor entry at `index` (written by this replica as leader, or received).
    pub fn push(&mut self, index: Index, pending: PendingCursor) {
        debug_assert!(index >= self.applied_index, "entry {index} is already applied");
        self.pending.insert(index, pending);
    }

    /// Forgets pending entries at or after `index` (the log was truncated there).
    pub fn truncate(&mut self, index: Index) {
        debug_assert!(index >= self.applied_index, "truncating applied entries at {index}");
        self.pending.split_off(&index);
    }

    /// Applies every entry below `upto` (committed ones); returns the cursor changes to
    /// store, in order, and the log start if it moved.
    pub fn apply(&mut self, upto: Index) -> (Vec<(String, Option<Cursor>)>, Option<Offset>) {
        if upto <= self.applied_index {
            return (Vec::new(), None);
        }
        let rest = self.pending.split_off(&upto);
        let done = std::mem::replace(&mut self.pending, rest);
        let mut changes = Vec::with_capacity(done.len());
        let before = self.applied_log_start;
        for (_, p) in done {
            match p.cursor {
                Some(c) => self.applied.insert(p.subscription.clone(), c),
                None => self.applied.remove(&p.subscription),
            };
            self.applied_log_start = self.applied_log_start.max(p.log_start);
            changes.push((p.subscription, p.cursor));
        }
        self.applied_index = upto;
        let moved = (self.applied_log_start > before).then_some(self.applied_log_start);
        (changes, moved)
    }

    /// Skips ahead to a leader's applied state (a follower reset to the leader's log start);
    /// entries up to `applied_index` it receives again are not applied again.
    pub fn reset(&mut self, applied: BTreeMap<String, Cursor>, applied_index: Index, log_start: Offset) {
        *self = Self::new(applied, applied_index, log_start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(sub: &str, next: Option<Offset>, log_start: Offset) -> PendingCursor {
        PendingCursor { subscription: sub.into(), cursor: next.map(Cursor::at), log_start }
    }

    #[test]
    fn latest_sees_pending_changes_and_apply_makes_them_durable_in_order() {
        let mut s = CursorState::default();
        s.push(1, set("a", Some(0), 0));
        s.push(2, set("b", Some(0), 0));
        s.push(3, set("a", Some(10), 0));
        assert_eq!(s.latest("a"), Some(Cursor::at(10)));
        assert_eq!(s.applied("a"), None);
        let (changes, start) = s.apply(3);
        assert_eq!(changes.len(), 2);
        assert_eq!(start, None);
        assert_eq!(s.applied("a"), Some(Cursor::at(0)));
        assert_eq!(s.first_pending(), Some(3));
        // b reads to 7: the lowest cursor is now 7.
        let latest = {
            let mut l = s.latest_all();
            l.insert("b".into(), Cursor::at(7));
            l
        };
        assert_eq!(s.log_start_after(&latest), 7);
        s.push(4, set("b", Some(7), 7));
        let (_, start) = s.apply(5);
        assert_eq!(start, Some(7));
        assert_eq!(s.applied_log_start(), 7);
    }

    #[test]
    fn truncation_forgets_only_pending_entries_and_deletion_keeps_the_log_start() {
        let mut s = CursorState::new(BTreeMap::from([("a".into(), Cursor::at(5))]), 10, 5);
        s.push(10, set("a", Some(9), 9));
        s.push(11, set("t", Some(9), 9));
        assert_eq!(s.latest_log_start(), 9);
        s.truncate(11);
        assert_eq!(s.latest("t"), None);
        assert_eq!(s.latest("a"), Some(Cursor::at(9)));
        s.truncate(10);
        assert_eq!(s.latest("a"), Some(Cursor::at(5)), "the applied cursor stays");
        // Deleting the only subscription keeps the records: the log start stays.
        s.push(10, set("a", None, 5));
        assert_eq!(s.log_start_after(&s.latest_all()), 5);
        // A new subscription never starts below the latest log start.
        assert_eq!(s.latest_log_start(), 5);
    }
}
