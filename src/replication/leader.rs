//! The leader's side of the rules for one topic in one epoch: judging fetches, counting
//! copies, and knowing when it last heard from a majority.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::history::LogView;
use super::majority;
use crate::types::{Epoch, Index, Offset, ServerId};

/// A follower's fetch: a request for entries and an acknowledgement in one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    /// The newest epoch the follower has promised or followed.
    pub epoch: Epoch,
    /// Everything below is durable on the follower; entries are wanted from here.
    pub fetch_index: Index,
    /// The record offset at `fetch_index` (its log's record end).
    pub fetch_offset: Offset,
    /// The epoch of its last entry.
    pub last_epoch: Epoch,
}

/// What the leader does with a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchDecision {
    /// The follower knows a newer epoch: this leader is deposed and must step down.
    Fenced { epoch: Epoch },
    /// The follower's tail diverges: it truncates with
    /// [`truncation_point`](super::truncation_point) and asks again.
    Diverging { end_epoch: Epoch, end_index: Index },
    /// The follower is behind what the leader compacted: it restarts from the leader's
    /// applied state at `start_index` (see [`ReplicaReset`](super::ReplicaReset)).
    Reset { start_index: Index },
    /// Send entries from `from` (or wait for some if the follower is at the end).
    Serve { from: Index },
    /// The fetching server is not in this topic's replica set: close its stream.
    NotReplica,
}

/// What the leader knows of one follower from its last consistent fetch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub fetch_index: Index,
    pub fetch_offset: Offset,
    pub last_epoch: Epoch,
}

/// The leader of one topic in one epoch.
#[derive(Debug, Clone)]
pub struct Leader {
    pub me: ServerId,
    pub epoch: Epoch,
    /// Index of this epoch's [`Begin`](super::EntryKind::Begin) entry.
    pub epoch_start: Index,
    /// Replicas that count toward commits and elections (the leader among them).
    voters: Vec<ServerId>,
    /// Replicas that copy the log without counting yet (a replacement catching up).
    learners: Vec<ServerId>,
    progress: BTreeMap<ServerId, Progress>,
    /// When each voter last fetched (ms on the caller's clock).
    heard: BTreeMap<ServerId, u64>,
    commit: (Index, Offset),
}

impl Leader {
    /// Takes over `epoch`, whose `Begin` entry the caller wrote at `epoch_start`. `commit` is
    /// the commit point this replica knew (it only grows from there).
    pub fn new(
        me: ServerId,
        epoch: Epoch,
        epoch_start: Index,
        voters: Vec<ServerId>,
        learners: Vec<ServerId>,
        commit: (Index, Offset),
    ) -> Self {
        Self {
            me,
            epoch,
            epoch_start,
            voters,
            learners,
            progress: BTreeMap::new(),
            heard: BTreeMap::new(),
            commit,
        }
    }

    /// The commit point: entries below the index, records below the offset.
    pub fn commit(&self) -> (Index, Offset) {
        self.commit
    }

    /// The epoch's first entry is committed: so is everything before it, and this leader
    /// knows the whole committed state (cursors included) and may serve it.
    pub fn ready(&self) -> bool {
        self.commit.0 > self.epoch_start
    }

    pub fn voters(&self) -> &[ServerId] {
        &self.voters
    }

    pub fn learners(&self) -> &[ServerId] {
        &self.learners
    }

    /// A follower's last consistent fetch, if any in this epoch.
    pub fn progress(&self, follower: ServerId) -> Option<Progress> {
        self.progress.get(&follower).copied()
    }

    /// Judges a fetch from `follower` against the leader's log (`log` includes a group
    /// commit under way). `now_ms` dates the contact.
    pub fn on_fetch(
        &mut self,
        follower: ServerId,
        req: &FetchRequest,
        log: &LogView,
        now_ms: u64,
    ) -> FetchDecision {
        if req.epoch > self.epoch {
            return FetchDecision::Fenced { epoch: req.epoch };
        }
        let member = self.voters.contains(&follower) || self.learners.contains(&follower);
        if !member || follower == self.me {
            return FetchDecision::NotReplica;
        }
        if self.voters.contains(&follower) {
            self.heard.insert(follower, now_ms);
        }
        if req.fetch_index < log.start_index {
            self.progress.remove(&follower);
            return FetchDecision::Reset { start_index: log.start_index };
        }
        let (end_epoch, end_index) = log.history.end_index_for(req.last_epoch, log.end_index);
        if end_epoch != req.last_epoch || end_index < req.fetch_index {
            self.progress.remove(&follower);
            return FetchDecision::Diverging { end_epoch, end_index };
        }
        self.progress.insert(
            follower,
            Progress {
                fetch_index: req.fetch_index,
                fetch_offset: req.fetch_offset,
                last_epoch: req.last_epoch,
            },
        );
        FetchDecision::Serve { from: req.fetch_index }
    }

    /// A follower said, in one message for all the topics it follows from this server, that
    /// it follows this topic in `epoch` (its promised epoch, as a fetch carries it). That is
    /// the contact a fetch gives [`majority_heard_at`](Self::majority_heard_at): it had not
    /// promised a newer epoch when it said so. It lets an idle follower's fetch wait long
    /// without the leader losing track of its majority. A newer epoch deposes the leader,
    /// as a fetch would; `true` then.
    pub fn on_alive(&mut self, follower: ServerId, epoch: Epoch, now_ms: u64) -> bool {
        if epoch > self.epoch {
            return true;
        }
        if epoch == self.epoch && follower != self.me && self.voters.contains(&follower) {
            self.heard.insert(follower, now_ms);
        }
        false
    }

    /// Recomputes the commit point from the leader's durable log end `(index, offset)`:
    /// the largest position a majority of voters holds durably, counting only followers
    /// that hold this epoch's first entry (Raft's rule: an older epoch's entries commit only
    /// through the current epoch's majority), and never past the leader's own durable end.
    /// Returns it if it moved.
    pub fn advance_commit(&mut self, durable: (Index, Offset)) -> Option<(Index, Offset)> {
        let mut held: Vec<(Index, Offset)> = vec![durable];
        for (id, p) in &self.progress {
            if p.last_epoch == self.epoch && self.voters.contains(id) {
                held.push(if p.fetch_index >= durable.0 { durable } else { (p.fetch_index, p.fetch_offset) });
            }
        }
        held.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
        let candidate = *held.get(majority(self.voters.len()) - 1)?;
        if candidate.0 > self.commit.0 && candidate.0 > self.epoch_start {
            self.commit = candidate;
            Some(candidate)
        } else {
            None
        }
    }

    /// When this leader last knew a majority of voters followed it (ms on the caller's
    /// clock; itself counts as `now_ms`). After that, a majority may have promised a newer
    /// epoch without this leader hearing of it. `alive_at(v)`: when voter `v` last said it
    /// follows this topic in this epoch outside a fetch (see [`AliveBook`](super::AliveBook)).
    pub fn majority_heard_at(&self, now_ms: u64, alive_at: impl Fn(ServerId) -> Option<u64>) -> u64 {
        let mut times: Vec<u64> = vec![now_ms];
        times.extend(self.voters.iter().filter(|v| **v != self.me).map(|v| {
            let fetched = self.heard.get(v).copied().unwrap_or(0);
            fetched.max(alive_at(*v).unwrap_or(0))
        }));
        times.sort_unstable_by(|a, b| b.cmp(a));
        times[majority(self.voters.len()) - 1]
    }

    /// The replicas (voters and learners, the leader included) that hold every entry up to
    /// `end_index` in this epoch.
    pub fn caught_up(&self, end_index: Index) -> Vec<ServerId> {
        let mut out = vec![self.me];
        for (id, p) in &self.progress {
            if p.last_epoch == self.epoch && p.fetch_index >= end_index {
                out.push(*id);
            }
        }
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::EpochHistory;
    use super::*;

    #[test]
    fn a_follower_counts_toward_commit_only_once_it_holds_the_epochs_first_entry() {
        // The leader of epoch 3 wrote its Begin at index 2; follower 2 holds 0..2 of epoch 1.
        let history = EpochHistory::new(vec![(1, 0), (3, 2)]);
        let log = LogView { start_index: 0, end_index: 3, history: &history };
        let mut leader = Leader::new(1, 3, 2, vec![1, 2, 3], vec![4], (0, 0));
        let old = FetchRequest { epoch: 3, fetch_index: 2, fetch_offset: 2, last_epoch: 1 };
        assert_eq!(leader.on_fetch(2, &old, &log, 0), FetchDecision::Serve { from: 2 });
        assert_eq!(leader.advance_commit((3, 2)), None);
        let adopted = FetchRequest { fetch_index: 3, last_epoch: 3, ..old };
        assert_eq!(leader.on_fetch(2, &adopted, &log, 0), FetchDecision::Serve { from: 3 });
        assert_eq!(leader.advance_commit((3, 2)), Some((3, 2)));
        assert!(leader.ready());
        // A learner is served but never counted; a stranger is refused.
        assert_eq!(leader.on_fetch(4, &adopted, &log, 0), FetchDecision::Serve { from: 3 });
        assert_eq!(leader.on_fetch(9, &adopted, &log, 0), FetchDecision::NotReplica);
        assert_eq!(leader.caught_up(3), vec![1, 2, 4]);
    }

    #[test]
    fn commit_never_passes_the_leaders_durable_end() {
        let history = EpochHistory::new(vec![(1, 0)]);
        let log = LogView { start_index: 0, end_index: 10, history: &history };
        let mut leader = Leader::new(1, 1, 0, vec![1, 2, 3], vec![], (0, 0));
        for f in [2, 3] {
            let req = FetchRequest { epoch: 1, fetch_index: 10, fetch_offset: 90, last_epoch: 1 };
            leader.on_fetch(f, &req, &log, 0);
        }
        assert_eq!(leader.advance_commit((6, 50)), Some((6, 50)), "followers saw the staged group");
        assert_eq!(leader.advance_commit((10, 90)), Some((10, 90)));
    }

    #[test]
    fn the_leader_knows_when_a_majority_last_followed_it() {
        let history = EpochHistory::new(vec![(1, 0)]);
        let log = LogView { start_index: 0, end_index: 1, history: &history };
        let mut leader = Leader::new(1, 1, 0, vec![1, 2, 3, 4, 5], vec![], (0, 0));
        let req = FetchRequest { epoch: 1, fetch_index: 1, fetch_offset: 0, last_epoch: 1 };
        leader.on_fetch(2, &req, &log, 100);
        assert_eq!(leader.majority_heard_at(1000, |_| None), 0, "one follower of four is no majority");
        leader.on_fetch(3, &req, &log, 200);
        assert_eq!(leader.majority_heard_at(1000, |_| None), 100);
    }

    /// A follower's alive message is contact like a fetch, only in the leader's own epoch
    /// and only from a voter; one in a newer epoch deposes the leader.
    #[test]
    fn alive_messages_count_as_contact_in_the_leaders_epoch_only() {
        let mut leader = Leader::new(1, 5, 0, vec![1, 2, 3], vec![4], (0, 0));
        assert!(!leader.on_alive(2, 4, 100), "an older epoch deposes nothing");
        assert!(!leader.on_alive(4, 5, 100), "a learner does not count");
        assert!(!leader.on_alive(9, 5, 100), "a stranger does not count");
        assert_eq!(leader.majority_heard_at(1000, |_| None), 0, "none of those is contact");
        assert!(!leader.on_alive(2, 5, 300));
        assert_eq!(leader.majority_heard_at(1000, |_| None), 300);
        assert!(!leader.on_alive(3, 5, 700));
        assert_eq!(leader.majority_heard_at(1000, |_| None), 700, "the newest majority");
        assert!(leader.on_alive(3, 6, 800), "a follower that promised a newer epoch deposes it");
        assert_eq!(leader.majority_heard_at(1000, |_| None), 700, "and is no contact");
    }
}
