//! The replication rules, as plain structs without I/O.
//!
//! The QUIC driver carries the messages; everything that decides (what a follower must
//! truncate, when an entry is committed, who may lead, what a cursor is) lives here, so tests
//! and the whole-cluster simulator (`crate::sim`) drive it message by message through
//! crashes, partitions and failovers.
//!
//! # The log
//! Each topic has one replicated log of **entries** ([`Entry`]), indexed densely from 0:
//! producers' batches, cursor changes, and a [`Begin`](EntryKind::Begin) entry at the start
//! of every epoch. Records keep their own dense offsets (a batch entry spans `count` of
//! them), so consumers never see the control entries. Putting cursor changes in the same log
//! as records is what makes them safe: one order, one commit rule, one divergence rule, and
//! an election that picks a replica holding every committed record also picks one holding
//! every committed cursor (Kafka keeps offsets in a log for the same reason).
//!
//! A topic has a replica set: **voters**, which count toward commits and elections, and
//! **learners**, which copy the log without counting (a replacement catching up). The naming
//! server names one leader per **epoch** (strictly increasing). Followers **pull**: each
//! keeps one long-lived stream to the leader and sends [`FetchRequest`]s. A fetch is also the
//! follower's acknowledgement: everything below `fetch_index` is durable on it. Pulling keeps
//! the leader's memory bounded however far a follower is behind: it reads what a fetch asks
//! for from storage.
//!
//! # Epochs and divergence
//! Every replica keeps an [`EpochHistory`]: for each epoch, the index of its first entry.
//! On each fetch the leader checks the follower's `(last_epoch, fetch_index)` against its own
//! history. If its largest epoch not above `last_epoch` is a different epoch, or ends before
//! `fetch_index`, the follower's tail diverges: the leader answers
//! [`FetchDecision::Diverging`] with that epoch and its end, and the follower truncates to the
//! smaller of that end and its own end for that epoch ([`truncation_point`]), then fetches
//! again. This converges in a few rounds (KIP-279's rule) and truncates only what was never
//! committed: by epoch, never by the follower's own guess. Entries with the same index and
//! epoch are the same entry on every replica, because one leader writes each epoch, once:
//! a replica never leads an epoch it held before (a restarted leader, which may have lost
//! unsynced entries its followers hold, waits for a new epoch).
//!
//! # Commit
//! The leader's commit point is the largest index that a majority of voters (the leader
//! included) holds durably **and** whose holders hold this epoch's `Begin` entry: Raft's
//! "only count replicas for the current term" (figure 8 of the Raft paper). It never passes
//! the leader's own durable end. Once the `Begin` entry commits, the leader is **ready**: it
//! holds and knows every committed entry, and only then serves cursors to consumers.
//!
//! # Elections and fencing
//! When a leader's lease expires (or it restarted, or a replica reports a newer epoch), the
//! naming server bumps the epoch and asks the voters to **promise** it: a replica that
//! promised refuses anything from an older epoch. Each reports `(last_epoch, log_end)`; once
//! a majority answered, the naming server picks the most up-to-date ([`choose_leader`]),
//! which holds every committed entry. A deposed leader cannot commit: every majority holds a
//! replica that promised the new epoch and no longer acknowledges it; when such a follower
//! fetches, the old leader learns it is [`FetchDecision::Fenced`].
//!
//! # Cursors and deletion
//! A cursor entry carries the log start it allows: the lowest cursor after the change,
//! never lower than before. Replicas **apply** committed entries in order
//! ([`CursorState`]): the cursor table and the log start move, and records below the log
//! start are deleted, on every replica, only then (G6). Applied entries whose records are
//! all deleted are compacted; a follower behind the compaction gets
//! [`FetchDecision::Reset`]: the leader's applied state instead of the entries.
//!
//! # Membership
//! The naming server changes a topic's voters one server at a time, each change in a new
//! epoch under the same leader, and only after the leader reported the current epoch
//! committed (so every committed entry is on a majority of the current voters): a
//! replacement joins as a learner, becomes a voter once caught up, and only then is the lost
//! replica removed. Any majority of the old voters and any majority of the new ones then
//! share a replica, so no committed entry is ever held by a minority of the voters that
//! elect (Raft's single-server changes).

mod alive;
mod cursors;
mod entry;
mod history;
mod leader;
mod park;
mod producers;

pub use alive::{digest, AliveBook, AliveOutcome};
pub use cursors::{CursorState, PendingCursor};
pub use entry::{Cursor, Entry, EntryKind, ReplicaChunk, ReplicaReset, ShippedEntry, SHIPPED_ENTRY_OVERHEAD};
pub use history::{truncation_point, EpochHistory, LogView};
pub use leader::{FetchDecision, FetchRequest, Leader, Progress};
pub use park::{Next, ParkBook, ParkLot, ParkedFetch};
pub use producers::{BatchOutcome, ProducerState, PRODUCER_DEDUP_WINDOW};

use crate::types::{Epoch, Index, ServerId};

/// Size of a majority of `n` voters.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// The naming server's choice: among `reports` (server, last epoch, log end index) from a
/// majority of `voters`, the most up-to-date. `None` without a majority.
///
/// Any of the equally up-to-date ones is safe; among them the choice follows `order` (the
/// caller's preference: a topic's preferred leader, then the servers leading fewest topics),
/// then the lowest id, and `avoid` (a leader that gave its epoch up, e.g. its disk is full)
/// comes last: it would only refuse again. One that holds more than every other is still
/// chosen, as only it may hold every committed entry.
pub fn choose_leader(
    voters: &[ServerId],
    reports: &[(ServerId, Epoch, Index)],
    order: &[ServerId],
    avoid: Option<ServerId>,
) -> Option<ServerId> {
    let members: Vec<_> = reports.iter().filter(|r| voters.contains(&r.0)).collect();
    if members.len() < majority(voters.len()) {
        return None;
    }
    let place = |id: ServerId| order.iter().position(|o| *o == id).unwrap_or(usize::MAX);
    let rank = |r: &(ServerId, Epoch, Index)| {
        (r.1, r.2, Some(r.0) != avoid, std::cmp::Reverse(place(r.0)), std::cmp::Reverse(r.0))
    };
    members.iter().max_by_key(|r| rank(r)).map(|r| r.0)
}

/// Whether the entry a leader of `epoch` wrote at `index` is committed, as seen by a replica
/// whose log has `history` and whose commit point is `commit_index`: the entry at `index`
/// is still of `epoch` there (same index and epoch: the same entry), and the commit point
/// passed it. A producer's or consumer's ack waits for this, wherever the replica's role went
/// meanwhile; `Some(false)` means it never will (the entry was truncated).
pub fn committed(
    history: &EpochHistory,
    end_index: Index,
    commit_index: Index,
    index: Index,
    epoch: Epoch,
) -> Option<bool> {
    if index >= end_index || history.epoch_at(index) != epoch {
        return Some(false);
    }
    (commit_index > index).then_some(true)
}

#[cfg(test)]
mod tests {
    //! The rules driven message by message through an in-memory cluster: each replica holds
    //! a log of `(epoch, payload)` entries, a history, a promised epoch and (when leading) a
    //! [`Leader`]. Durability is immediate; a crash loses the in-memory leader state only.

    use super::*;

    #[derive(Debug, Clone)]
    struct Replica {
        id: ServerId,
        start_index: Index,
        /// `entries[i]` is index `start_index + i`: (epoch written in, payload).
        entries: Vec<(Epoch, String)>,
        history: EpochHistory,
        promised: Epoch,
        commit: Index,
        leader: Option<Leader>,
        up: bool,
    }

    impl Replica {
        fn end(&self) -> Index {
            self.start_index + self.entries.len() as Index
        }

        fn view(&self) -> LogView<'_> {
            LogView { start_index: self.start_index, end_index: self.end(), history: &self.history }
        }

        fn payloads(&self) -> Vec<(Index, String)> {
            self.entries
                .iter()
                .enumerate()
                .filter(|(_, (_, p))| p != "begin")
                .map(|(i, (_, p))| (self.start_index + i as Index, p.clone()))
                .collect()
        }

        fn records(&self) -> Vec<String> {
            self.payloads().into_iter().map(|(_, p)| p).collect()
        }

        fn truncate(&mut self, to: Index) {
            self.entries.truncate((to - self.start_index) as usize);
            self.history.truncate(to);
        }

        fn push(&mut self, epoch: Epoch, payload: &str) {
            let index = self.end();
            self.history.assign(epoch, index);
            self.entries.push((epoch, payload.to_string()));
        }

        /// The commit point this replica knows (its leader state's, when leading).
        fn known_commit(&self) -> Index {
            self.leader.as_ref().map_or(self.commit, |l| l.commit().0)
        }
    }

    struct Sim {
        replicas: Vec<Replica>,
        epoch: Epoch,
        /// Every (index, payload) any leader reported committed: must never be lost.
        committed: BTreeMap<Index, String>,
    }

    use std::collections::BTreeMap;

    impl Sim {
        fn new(n: usize) -> Sim {
            let replicas = (1..=n as ServerId)
                .map(|id| Replica {
                    id,
                    start_index: 0,
                    entries: Vec::new(),
                    history: EpochHistory::default(),
                    promised: 0,
                    commit: 0,
                    leader: None,
                    up: true,
                })
                .collect();
            Sim { replicas, epoch: 0, committed: BTreeMap::new() }
        }

        fn r(&mut self, id: ServerId) -> &mut Replica {
            &mut self.replicas[id as usize - 1]
        }

        fn ids(&self) -> Vec<ServerId> {
            self.replicas.iter().map(|r| r.id).collect()
        }

        /// The naming server's election among the replicas that are up; returns the winner,
        /// which writes its epoch's `Begin` entry.
        fn elect(&mut self) -> Option<ServerId> {
            self.epoch += 1;
            let epoch = self.epoch;
            let mut reports = Vec::new();
            for r in self.replicas.iter_mut().filter(|r| r.up) {
                r.promised = r.promised.max(epoch);
                reports.push((r.id, r.history.last_epoch(), r.end()));
            }
            let winner = choose_leader(&self.ids(), &reports, &[], None)?;
            let ids = self.ids();
            let r = self.r(winner);
            let start = r.end();
            r.push(epoch, "begin");
            r.leader = Some(Leader::new(winner, epoch, start, ids, Vec::new(), (r.commit, 0)));
            Some(winner)
        }

        fn append(&mut self, leader: ServerId, payload: &str) -> Index {
            let r = self.r(leader);
            let epoch = r.leader.as_ref().expect("leader").epoch;
            r.push(epoch, payload);
            r.end() - 1
        }

        /// One fetch round from `follower` to `leader`. Returns the decision.
        fn fetch(&mut self, follower: ServerId, leader: ServerId) -> FetchDecision {
            let (f, l) = (self.r(follower).clone(), self.r(leader).clone());
            assert!(f.up && l.up);
            let req = FetchRequest {
                epoch: f.promised,
                fetch_index: f.end(),
                fetch_offset: 0,
                last_epoch: f.history.last_epoch(),
            };
            let mut ld = l.leader.clone().expect("not a leader");
            let decision = ld.on_fetch(follower, &req, &l.view(), 0);
            match decision {
                FetchDecision::Fenced { epoch } => {
                    // The leader learns it was deposed and steps down.
                    let lr = self.r(leader);
                    lr.leader = None;
                    lr.promised = lr.promised.max(epoch);
                    return decision;
                }
                FetchDecision::Diverging { end_epoch, end_index } => {
                    let fr = self.r(follower);
                    let to = truncation_point(&fr.view(), end_epoch, end_index);
                    assert!(to >= fr.commit, "truncating below the commit point {} to {to}", fr.commit);
                    fr.truncate(to);
                }
                FetchDecision::Reset { start_index } => {
                    let fr = self.r(follower);
                    fr.entries.clear();
                    fr.start_index = start_index;
                    fr.history = EpochHistory::new(l.history.prefix(start_index));
                    fr.commit = fr.commit.max(start_index);
                }
                FetchDecision::NotReplica => panic!("{follower} is a replica"),
                FetchDecision::Serve { from } => {
                    let fr = self.r(follower);
                    if ld.epoch < fr.promised {
                        // A stale leader's entries are refused by a follower that promised newer.
                        self.r(leader).leader = Some(ld);
                        return FetchDecision::Fenced { epoch: self.r(follower).promised };
                    }
                    fr.promised = ld.epoch;
                    for (e, p) in &l.entries[(from - l.start_index) as usize..] {
                        fr.push(*e, p);
                    }
                    fr.commit = fr.commit.max(ld.commit().0.min(fr.end()));
                }
            }
            let durable = self.r(leader).end();
            if ld.advance_commit((durable, 0)).is_some() {
                let commit = ld.commit().0;
                let lr = self.r(leader);
                lr.commit = commit;
                for (i, p) in lr.payloads() {
                    if i < commit {
                        self.committed.entry(i).or_insert(p);
                    }
                }
            }
            self.r(leader).leader = Some(ld);
            decision
        }

        /// Fetch rounds until every live follower is served and caught up with `leader`.
        fn settle(&mut self, leader: ServerId) {
            for _ in 0..20 {
                let followers: Vec<ServerId> =
                    self.replicas.iter().filter(|r| r.up && r.id != leader).map(|r| r.id).collect();
                for f in followers {
                    self.fetch(f, leader);
                }
            }
        }

        fn crash(&mut self, id: ServerId) {
            let r = self.r(id);
            r.up = false;
            r.leader = None; // in-memory leadership is lost; the log and history are durable
        }

        fn restart(&mut self, id: ServerId) {
            self.r(id).up = true;
        }

        /// G1/G2: every entry ever reported committed is on `leader` at its index, and every
        /// live replica agrees with the leader up to the leader's commit point.
        fn check(&mut self, leader: ServerId) {
            let l = self.r(leader).clone();
            let log: BTreeMap<Index, String> = l.payloads().into_iter().collect();
            for (i, p) in &self.committed {
                if *i >= l.start_index {
                    assert_eq!(log.get(i), Some(p), "committed entry {i} lost or changed on leader {leader}");
                }
            }
            for r in self.replicas.iter().filter(|r| r.up) {
                for (i, p) in r.payloads() {
                    if i < l.known_commit() && i >= l.start_index {
                        assert_eq!(log.get(&i), Some(&p), "replica {} differs at {i}", r.id);
                    }
                }
            }
        }
    }

    #[test]
    fn entries_commit_once_a_majority_holds_them() {
        let mut sim = Sim::new(3);
        let a = sim.elect().unwrap();
        sim.append(a, "r0");
        sim.append(a, "r1");
        assert_eq!(sim.r(a).known_commit(), 0, "nothing is committed by the leader alone");
        sim.fetch(2, a); // follower 2 takes the Begin entry and the records
        assert_eq!(sim.r(a).known_commit(), 0, "the fetch that brought the entries is not yet their ack");
        sim.fetch(2, a); // its next fetch acknowledges them
        assert_eq!(sim.r(a).known_commit(), 3);
        sim.settle(a);
        sim.check(a);
        assert!(sim.replicas.iter().all(|r| r.records() == ["r0", "r1"]));
    }

    #[test]
    fn leader_crash_after_append_before_commit_loses_only_uncommitted_entries() {
        let mut sim = Sim::new(3);
        let a = sim.elect().unwrap();
        sim.append(a, "c0");
        sim.settle(a);
        sim.append(a, "u1"); // appended on the leader only, never acknowledged
        sim.crash(a);
        let b = sim.elect().unwrap();
        assert_ne!(b, a);
        sim.append(b, "n1");
        sim.settle(b);
        sim.restart(a);
        sim.settle(b);
        sim.check(b);
        // The old leader truncated its uncommitted entry by epoch and took the new ones.
        assert_eq!(sim.r(a).records(), ["c0", "n1"]);
    }

    #[test]
    fn leader_crash_after_commit_before_followers_learn_it_keeps_the_entry() {
        let mut sim = Sim::new(3);
        let a = sim.elect().unwrap();
        sim.append(a, "x0");
        sim.fetch(2, a); // 2 gets x0
        sim.fetch(2, a); // and acknowledges it: committed at the leader only
        assert_eq!(sim.r(a).known_commit(), 2);
        assert_eq!(sim.r(2).commit, 0, "follower 2 has not learned the commit");
        sim.crash(a);
        // 3 never saw x0; 2 has it: the election must pick 2.
        let b = sim.elect().unwrap();
        assert_eq!(b, 2);
        sim.settle(b);
        sim.append(b, "x1");
        sim.settle(b);
        sim.check(b);
        assert_eq!(sim.r(3).records(), ["x0", "x1"]);
    }

    #[test]
    fn rapid_double_failover_a_then_b_then_a_again() {
        let mut sim = Sim::new(3);
        let a = sim.elect().unwrap();
        assert_eq!(a, 1);
        sim.append(a, "a0");
        sim.settle(a);
        sim.append(a, "a1-uncommitted");
        sim.crash(a);
        let b = sim.elect().unwrap();
        assert_eq!(b, 2);
        sim.append(b, "b1");
        sim.append(b, "b2");
        sim.fetch(3, b); // 3 takes b's epoch and entries,
        sim.fetch(3, b); // and acknowledges: b1, b2 committed
        assert_eq!(sim.r(b).known_commit(), sim.r(b).end());
        sim.append(b, "b3-uncommitted");
        sim.crash(b);
        sim.restart(a);
        // A returns; with B down, {A, C} elect. C holds B's epoch: C must win, not A.
        let c = sim.elect().unwrap();
        assert_eq!(c, 3, "the replica with the newer epoch wins");
        sim.settle(c);
        sim.append(c, "c4");
        sim.settle(c);
        sim.restart(b);
        sim.settle(c);
        sim.check(c);
        for r in &sim.replicas {
            assert_eq!(r.records(), ["a0", "b1", "b2", "c4"], "replica {}", r.id);
        }
    }

    #[test]
    fn an_old_epoch_entry_commits_only_through_the_new_epochs_majority() {
        // Raft's figure 8: a new leader copying an old-epoch entry to a majority must not count
        // it as committed until a majority holds its own epoch, or a replica holding a newer
        // (uncommitted) entry at that index could still win an election and overwrite it.
        let mut sim = Sim::new(3);
        assert_eq!(sim.elect(), Some(1)); // epoch 1
        sim.append(1, "base");
        sim.settle(1);
        sim.append(1, "e1"); // index 2, on 1 only
        sim.crash(1);
        sim.crash(2);
        assert_eq!(sim.elect(), None, "3 alone is no majority (epoch 2 is burnt)");
        sim.restart(2);
        assert_eq!(sim.elect(), Some(2)); // epoch 3 among {2, 3}: Begin at index 2, on 2 only
        sim.crash(2);
        sim.restart(1);
        assert_eq!(sim.elect(), Some(1), "epoch 4: 1 has the longer log of epoch 1"); // among {1, 3}
        sim.fetch(3, 1); // 3 gets e1 and the epoch-4 Begin, but its ack is still for epoch 1
        assert_eq!(sim.r(1).known_commit(), 2, "e1 (index 2) is on a majority but not committed yet");
        sim.fetch(3, 1); // now 3 acknowledges in epoch 4
        assert_eq!(sim.r(1).known_commit(), 4);
        sim.append(1, "after");
        sim.settle(1);
        sim.restart(2); // 2 truncates its epoch-3 entry by epoch
        sim.settle(1);
        sim.check(1);
        for r in &sim.replicas {
            assert_eq!(r.records(), ["base", "e1", "after"], "replica {}", r.id);
        }
    }

    #[test]
    fn a_stale_leader_cannot_replicate_or_commit() {
        let mut sim = Sim::new(3);
        let a = sim.elect().unwrap();
        sim.append(a, "ok");
        sim.settle(a);
        // A is paused (not crashed: it keeps its leader state) while the others elect.
        sim.r(a).up = false;
        let b = sim.elect().unwrap();
        sim.r(a).up = true;
        // A still thinks it leads and appends; followers that promised the new epoch fence it.
        sim.append(a, "stale");
        let f = if b == 2 { 3 } else { 2 };
        let d = sim.fetch(f, a);
        assert!(matches!(d, FetchDecision::Fenced { .. }), "{d:?}");
        assert!(sim.r(a).leader.is_none(), "the deposed leader stepped down");
        assert_eq!(sim.r(a).commit, 2, "nothing more was committed by the stale leader");
        // It rejoins as a follower of b and drops its stale entry.
        sim.append(b, "new");
        sim.settle(b);
        sim.check(b);
        assert_eq!(sim.r(a).records(), ["ok", "new"]);
    }

    #[test]
    fn a_follower_behind_the_leaders_compaction_restarts_from_its_state() {
        let mut sim = Sim::new(3);
        let a = sim.elect().unwrap();
        for i in 0..5 {
            sim.append(a, &format!("d{i}"));
        }
        sim.settle(a);
        sim.crash(3);
        for i in 5..8 {
            sim.append(a, &format!("d{i}"));
        }
        sim.settle(a);
        // The leader applied and compacted everything below index 7.
        let l = sim.r(a);
        l.entries.drain(..7);
        l.start_index = 7;
        sim.restart(3);
        let d = sim.fetch(3, a);
        assert_eq!(d, FetchDecision::Reset { start_index: 7 });
        sim.settle(a);
        let r3 = sim.r(3).clone();
        assert_eq!(r3.start_index, 7);
        assert_eq!(r3.payloads(), sim.r(a).payloads(), "3 matches the leader from its first stored entry");
        assert_eq!(r3.history.last_epoch(), 1);
    }

    #[test]
    fn elections_need_a_majority_and_pick_the_most_up_to_date() {
        let voters = [1, 2, 3];
        assert_eq!(choose_leader(&voters, &[(1, 5, 100)], &[], None), None);
        assert_eq!(
            choose_leader(&voters, &[(1, 5, 100), (2, 6, 10)], &[1], None),
            Some(2),
            "preference never beats entries"
        );
        let tie = [(1, 5, 100), (3, 5, 100)];
        assert_eq!(choose_leader(&voters, &tie, &[], None), Some(1), "ties go to the lowest id");
        assert_eq!(choose_leader(&voters, &tie, &[3, 1], None), Some(3), "or to the preferred one");
        assert_eq!(choose_leader(&voters, &tie, &[2, 3], None), Some(3), "in the order given");
        assert_eq!(choose_leader(&voters, &tie, &[], Some(1)), Some(3), "unless it gave its epoch up");
        assert_eq!(choose_leader(&voters, &tie, &[1], Some(1)), Some(3), "even when preferred");
        let ahead = [(1, 5, 101), (3, 5, 100)];
        assert_eq!(choose_leader(&voters, &ahead, &[3], Some(1)), Some(1), "the only one with everything");
        assert_eq!(
            choose_leader(&voters, &[(1, 5, 100), (9, 9, 999)], &[9], None),
            None,
            "non-voters do not count"
        );
    }

    #[test]
    fn an_ack_waits_for_its_own_entry_to_commit_never_for_another_at_its_index() {
        let h = EpochHistory::new(vec![(1, 0), (3, 5)]);
        assert_eq!(committed(&h, 10, 3, 3, 1), None, "still pending");
        assert_eq!(committed(&h, 10, 6, 3, 1), Some(true));
        // Index 5 was written in epoch 2 by a deposed leader; epoch 3 replaced it.
        assert_eq!(committed(&h, 10, 9, 5, 2), Some(false));
        assert_eq!(committed(&h, 4, 9, 6, 3), Some(false), "truncated away");
    }
}
