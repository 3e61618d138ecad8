//! The replication rules, as plain structs without I/O.
//!
//! The QUIC driver carries the messages; everything that decides (what a follower must
//! truncate, when a record is committed, who may lead, when a cursor move counts) lives here,
//! so tests drive it message by message through crashes, partitions and failovers.
//!
//! # Model
//! A topic has a replica set of N servers. The naming server names one leader per **epoch**
//! (strictly increasing). Followers **pull**: each keeps one long-lived stream to the leader
//! per topic and sends [`FetchRequest`]s. A fetch is also the follower's acknowledgement:
//! everything below `fetch_offset` is durable on it, `last_epoch` is the newest epoch
//! boundary it has durably adopted, and `cursor_version` the newest cursor change it holds.
//! Pulling keeps the leader's memory bounded however far a follower is behind: the leader
//! reads what a fetch asks for from storage.
//!
//! # Epoch history and divergence
//! Every replica keeps an [`EpochHistory`]: for each epoch, the offset its leader started
//! writing at (its log end when it was elected). A boundary `(epoch, start)` counts as a
//! virtual entry at `start`: a follower adopts it only once its log reaches `start`, exactly
//! like Raft's no-op entry, but without taking an offset (offsets stay dense for consumers).
//!
//! On each fetch the leader checks the follower's `(last_epoch, fetch_offset)` against its own
//! history. If its largest epoch not above `last_epoch` is a different epoch, or ends before
//! `fetch_offset`, the follower's tail diverges: the leader answers
//! [`FetchDecision::Diverging`] with that epoch and its end, and the follower truncates to the
//! smaller of that end and its own end for that epoch ([`truncation_point`]), then fetches
//! again. This converges in a few rounds (KIP-279's rule) and truncates only what was never
//! committed: by epoch, never by the follower's own guess.
//!
//! # Commit
//! The leader's commit offset is the largest offset that a majority of the replica set
//! (the leader included) holds durably **and** whose holders have adopted the leader's
//! current epoch. The second condition is Raft's "only count replicas for the current term":
//! without it, entries of an older epoch copied to a majority could still be overwritten by a
//! replica that saw a newer (uncommitted) epoch (Raft paper, figure 8).
//!
//! # Elections and fencing
//! When a leader's lease expires, the naming server bumps the epoch and asks the replicas to
//! **promise** the new epoch: a replica that promised rejects anything from an older epoch.
//! Each reports `(last_epoch, log_end)`; once a majority answered, the naming server picks
//! the most up-to-date ([`choose_leader`]). A deposed leader cannot commit: every majority
//! holds a replica that promised the new epoch and no longer acknowledges it; when a follower
//! fetches with a newer epoch, the old leader learns it is [`FetchDecision::Fenced`].
//!
//! # Cursors and deletion
//! Subscription cursors change only at the leader and are replicated in version order
//! ([`CursorLog`]). A consumer's ack is answered once a majority holds the cursor change. The
//! leader moves the log start to the lowest **committed** cursor, and followers delete below
//! the log start the leader reports. A follower that was down while the leader deleted gets
//! [`FetchDecision::Reset`]: it drops what it has and restarts at the leader's log start, so
//! deleted records never come back.
//!
//! # Left out
//! Changing a topic's replica set (re-replication) is the naming server's job: it names a new
//! replica set in a new epoch, and the new replica catches up through ordinary fetches from
//! an empty log. Joint consensus for changing the replica count is not needed because the
//! naming server, not the replicas, decides membership.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::types::{Epoch, Offset, ServerId};

/// Size of a majority of `n` replicas.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// Epoch boundaries of one replica's log: `(epoch, first offset written in it)`.
///
/// Invariants: epochs strictly increase; start offsets never decrease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochHistory {
    entries: Vec<(Epoch, Offset)>,
}

impl EpochHistory {
    pub fn new(entries: Vec<(Epoch, Offset)>) -> Self {
        debug_assert!(entries.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        Self { entries }
    }

    pub fn entries(&self) -> &[(Epoch, Offset)] {
        &self.entries
    }

    /// The newest adopted epoch (0 for an empty history).
    pub fn last_epoch(&self) -> Epoch {
        self.entries.last().map_or(0, |e| e.0)
    }

    /// Epoch of the record at `offset` (0 if before every boundary).
    pub fn epoch_at(&self, offset: Offset) -> Epoch {
        self.entries.iter().rev().find(|(_, start)| *start <= offset).map_or(0, |e| e.0)
    }

    /// The largest epoch not above `epoch`, and where it ends in this log (the next
    /// boundary's start, or `log_end`). `(0, first start)` when every epoch is above it.
    pub fn end_offset_for(&self, epoch: Epoch, log_end: Offset) -> (Epoch, Offset) {
        match self.entries.iter().rposition(|(e, _)| *e <= epoch) {
            None => (0, self.entries.first().map_or(log_end, |e| e.1).min(log_end)),
            Some(i) => (self.entries[i].0, self.entries.get(i + 1).map_or(log_end, |e| e.1)),
        }
    }

    /// Records that `epoch` starts at `start`; ignored if not newer than the last epoch.
    pub fn assign(&mut self, epoch: Epoch, start: Offset) -> bool {
        if epoch <= self.last_epoch() {
            return false;
        }
        let start = start.max(self.entries.last().map_or(0, |e| e.1));
        self.entries.push((epoch, start));
        true
    }

    /// Drops boundaries at or past `offset` (after the log was truncated to `offset`).
    pub fn truncate(&mut self, offset: Offset) {
        self.entries.retain(|(_, start)| *start < offset);
    }

    /// The leader's boundaries a follower whose log now ends at `log_end` should adopt.
    pub fn to_adopt(&self, leader: &[(Epoch, Offset)], log_end: Offset) -> Vec<(Epoch, Offset)> {
        let last = self.last_epoch();
        leader.iter().copied().filter(|(e, start)| *e > last && *start <= log_end).collect()
    }
}

/// A follower's fetch: a request for records and an acknowledgement in one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    /// The newest epoch the follower has promised or followed.
    pub epoch: Epoch,
    /// Everything below is durable on the follower; records are wanted from here.
    pub fetch_offset: Offset,
    /// The newest epoch boundary the follower has durably adopted.
    pub last_epoch: Epoch,
    /// The newest cursor change the follower holds durably.
    pub cursor_version: u64,
}

/// What the leader does with a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchDecision {
    /// The follower knows a newer epoch: this leader is deposed and must step down.
    Fenced { epoch: Epoch },
    /// The follower's tail diverges: it truncates with [`truncation_point`] and asks again.
    Diverging { end_epoch: Epoch, end_offset: Offset },
    /// The follower is behind the log start: it drops its log and restarts at `log_start`.
    Reset { log_start: Offset },
    /// Send records from `from` (or wait for some if the follower is at the end).
    Serve { from: Offset },
    /// The fetching server is not in this topic's replica set: close its stream.
    NotReplica,
}

/// The shape of a replica's log the rules look at.
#[derive(Debug, Clone, Copy)]
pub struct LogView<'a> {
    pub log_start: Offset,
    pub log_end: Offset,
    pub history: &'a EpochHistory,
}

/// Where a follower truncates after [`FetchDecision::Diverging`]: the smaller of the leader's
/// end for `end_epoch` and the follower's own end for that epoch, never below its log start.
pub fn truncation_point(own: &LogView, end_epoch: Epoch, end_offset: Offset) -> Offset {
    let (_, own_end) = own.history.end_offset_for(end_epoch, own.log_end);
    end_offset.min(own_end).min(own.log_end).max(own.log_start)
}

/// What the leader knows of one follower from its last consistent fetch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub fetch_offset: Offset,
    pub last_epoch: Epoch,
    pub cursor_version: u64,
}

/// The leader's side of the rules for one topic in one epoch.
#[derive(Debug, Clone)]
pub struct Leader {
    pub me: ServerId,
    pub epoch: Epoch,
    /// Where this epoch starts: the leader's log end when it took over.
    pub epoch_start: Offset,
    replicas: Vec<ServerId>,
    progress: HashMap<ServerId, Progress>,
    commit: Offset,
}

impl Leader {
    /// Takes over `epoch`. The caller has durably added `(epoch, log.log_end)` to the history.
    /// `commit` is the commit offset this replica knew (it only grows from there).
    pub fn new(me: ServerId, epoch: Epoch, replicas: Vec<ServerId>, log: &LogView, commit: Offset) -> Self {
        Self {
            me,
            epoch,
            epoch_start: log.log_end,
            replicas,
            progress: HashMap::new(),
            commit: commit.min(log.log_end),
        }
    }

    pub fn commit(&self) -> Offset {
        self.commit
    }

    /// A follower's last consistent fetch, if any in this epoch.
    pub fn progress(&self, follower: ServerId) -> Option<Progress> {
        self.progress.get(&follower).copied()
    }

    /// Judges a fetch from `follower` against the leader's log.
    pub fn on_fetch(&mut self, follower: ServerId, req: &FetchRequest, log: &LogView) -> FetchDecision {
        if req.epoch > self.epoch {
            return FetchDecision::Fenced { epoch: req.epoch };
        }
        if !self.replicas.contains(&follower) || follower == self.me {
            return FetchDecision::NotReplica;
        }
        if req.fetch_offset < log.log_start {
            self.progress.remove(&follower);
            return FetchDecision::Reset { log_start: log.log_start };
        }
        let (end_epoch, end_offset) = log.history.end_offset_for(req.last_epoch, log.log_end);
        if end_epoch != req.last_epoch || end_offset < req.fetch_offset {
            self.progress.remove(&follower);
            return FetchDecision::Diverging { end_epoch, end_offset };
        }
        self.progress.insert(
            follower,
            Progress {
                fetch_offset: req.fetch_offset,
                last_epoch: req.last_epoch,
                cursor_version: req.cursor_version,
            },
        );
        FetchDecision::Serve { from: req.fetch_offset }
    }

    /// The `k`-th largest of the values the majority rule counts: the leader's own value and
    /// those of followers that adopted this epoch.
    fn quorum_value(&self, own: u64, value: impl Fn(&Progress) -> u64) -> Option<u64> {
        let mut values: Vec<u64> = vec![own];
        values.extend(self.progress.values().filter(|p| p.last_epoch == self.epoch).map(value));
        values.sort_unstable_by(|a, b| b.cmp(a));
        values.get(majority(self.replicas.len()) - 1).copied()
    }

    /// Recomputes the commit offset from the leader's durable log end; returns it if it moved.
    pub fn advance_commit(&mut self, durable_end: Offset) -> Option<Offset> {
        let candidate = self.quorum_value(durable_end, |p| p.fetch_offset.min(durable_end))?;
        if candidate > self.commit && candidate >= self.epoch_start {
            self.commit = candidate;
            Some(candidate)
        } else {
            None
        }
    }

    /// The newest cursor version a majority holds, given the leader's own.
    pub fn committed_cursor_version(&self, own: u64) -> u64 {
        self.quorum_value(own, |p| p.cursor_version.min(own)).unwrap_or(0)
    }
}

/// The naming server's choice: among `reports` (server, last epoch, log end) from a
/// majority of `replicas`, the most up-to-date, ties to the lowest id. `None` without a
/// majority.
pub fn choose_leader(replicas: &[ServerId], reports: &[(ServerId, Epoch, Offset)]) -> Option<ServerId> {
    let members: Vec<_> = reports.iter().filter(|r| replicas.contains(&r.0)).collect();
    if members.len() < majority(replicas.len()) {
        return None;
    }
    members.iter().max_by(|a, b| (a.1, a.2).cmp(&(b.1, b.2)).then(b.0.cmp(&a.0))).map(|r| r.0)
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

/// Subscription cursors in change order, so followers and the leader agree on which moves a
/// majority holds. Only the leader changes cursors; each change gets the next version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorLog {
    version: u64,
    /// Latest value of every subscription (`None`: deleted), with the version that set it.
    latest: BTreeMap<String, (Option<Cursor>, u64)>,
    /// Committed position of every live subscription.
    committed: BTreeMap<String, Offset>,
    committed_version: u64,
    /// Changes not yet known to be on a majority, by version.
    pending: BTreeMap<u64, (String, Option<Cursor>)>,
}

impl CursorLog {
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn committed_version(&self) -> u64 {
        self.committed_version
    }

    /// The latest position of a subscription (committed or not).
    pub fn get(&self, subscription: &str) -> Option<Offset> {
        self.cursor(subscription).map(|c| c.next)
    }

    /// The latest cursor of a subscription (committed or not).
    pub fn cursor(&self, subscription: &str) -> Option<Cursor> {
        self.latest.get(subscription).and_then(|(c, _)| *c)
    }

    /// Every live subscription's latest cursor.
    pub fn live(&self) -> impl Iterator<Item = (&str, Cursor)> {
        self.latest.iter().filter_map(|(name, (c, _))| c.map(|c| (name.as_str(), c)))
    }

    /// Committed cursors of live subscriptions.
    pub fn committed(&self) -> &BTreeMap<String, Offset> {
        &self.committed
    }

    /// Leader: moves a subscription to `next` (`None` deletes it), keeping its eviction
    /// record; returns the change's version.
    pub fn set(&mut self, subscription: &str, next: Option<Offset>) -> u64 {
        let cursor = next.map(|next| Cursor { next, ..self.cursor(subscription).unwrap_or_default() });
        self.set_cursor(subscription, cursor)
    }

    /// Leader: records a change (`None` deletes); returns its version.
    pub fn set_cursor(&mut self, subscription: &str, cursor: Option<Cursor>) -> u64 {
        self.version += 1;
        self.latest.insert(subscription.to_string(), (cursor, self.version));
        self.pending.insert(self.version, (subscription.to_string(), cursor));
        self.version
    }

    /// Follower: applies a change received from the leader (in version order).
    pub fn apply(&mut self, subscription: &str, cursor: Option<Cursor>, version: u64) {
        if version <= self.version {
            return;
        }
        self.version = version;
        self.latest.insert(subscription.to_string(), (cursor, version));
        self.pending.insert(version, (subscription.to_string(), cursor));
    }

    /// Changes newer than `version`, for a follower that holds everything up to it.
    pub fn changes_since(&self, version: u64) -> Vec<(String, Option<Cursor>, u64)> {
        let mut out: Vec<_> = self
            .latest
            .iter()
            .filter(|(_, (_, v))| *v > version)
            .map(|(name, (cursor, v))| (name.clone(), *cursor, *v))
            .collect();
        out.sort_by_key(|c| c.2);
        out
    }

    /// Marks every change up to `version` as committed (held by a majority).
    pub fn commit(&mut self, version: u64) {
        let version = version.min(self.version);
        if version <= self.committed_version {
            return;
        }
        let rest = self.pending.split_off(&(version + 1));
        for (_, (name, cursor)) in std::mem::replace(&mut self.pending, rest) {
            match cursor {
                Some(c) => self.committed.insert(name, c.next),
                None => self.committed.remove(&name),
            };
        }
        self.committed_version = version;
    }

    /// Where the log may start: the lowest cursor, if any subscription exists. Committed
    /// cursors count, and so do changes not yet committed: a reset may move a cursor back,
    /// and records must still be there when it commits.
    pub fn lowest_held(&self) -> Option<Offset> {
        let pending = self.pending.values().filter_map(|(_, c)| c.map(|c| c.next));
        self.committed.values().copied().chain(pending).min()
    }
}

#[cfg(test)]
mod tests {
    //! The rules driven message by message through an in-memory cluster: each replica holds
    //! a log of `(epoch, payload)`, a history, a promised epoch and (when leading) a
    //! [`Leader`]. Durability is immediate; a crash loses the in-memory leader state only.

    use super::*;

    #[derive(Debug, Clone)]
    struct Replica {
        id: ServerId,
        log_start: Offset,
        /// `records[i]` is offset `log_start + i`: (epoch written in, payload).
        records: Vec<(Epoch, String)>,
        history: EpochHistory,
        promised: Epoch,
        commit: Offset,
        leader: Option<Leader>,
        up: bool,
    }

    impl Replica {
        fn log_end(&self) -> Offset {
            self.log_start + self.records.len() as Offset
        }

        fn view(&self) -> LogView<'_> {
            LogView { log_start: self.log_start, log_end: self.log_end(), history: &self.history }
        }

        fn payloads(&self) -> Vec<(Offset, String)> {
            self.records
                .iter()
                .enumerate()
                .map(|(i, (_, p))| (self.log_start + i as Offset, p.clone()))
                .collect()
        }

        fn truncate(&mut self, to: Offset) {
            self.records.truncate((to - self.log_start) as usize);
            self.history.truncate(to);
        }
    }

    struct Sim {
        replicas: Vec<Replica>,
        epoch: Epoch,
        /// Every (offset, payload) any leader reported committed: must never be lost.
        committed: BTreeMap<Offset, String>,
    }

    impl Sim {
        fn new(n: usize) -> Sim {
            let replicas = (1..=n as ServerId)
                .map(|id| Replica {
                    id,
                    log_start: 0,
                    records: Vec::new(),
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

        /// The naming server's election among the replicas that are up; returns the winner.
        fn elect(&mut self) -> Option<ServerId> {
            self.epoch += 1;
            let epoch = self.epoch;
            let mut reports = Vec::new();
            for r in self.replicas.iter_mut().filter(|r| r.up) {
                r.promised = r.promised.max(epoch);
                reports.push((r.id, r.history.last_epoch(), r.log_end()));
            }
            let winner = choose_leader(&self.ids(), &reports)?;
            let ids = self.ids();
            let r = self.r(winner);
            r.history.assign(epoch, r.log_end());
            r.leader = Some(Leader::new(winner, epoch, ids, &r.view(), r.commit));
            Some(winner)
        }

        fn append(&mut self, leader: ServerId, payload: &str) -> Offset {
            let r = self.r(leader);
            let epoch = r.leader.as_ref().expect("leader").epoch;
            r.records.push((epoch, payload.to_string()));
            r.log_end() - 1
        }

        /// One fetch round from `follower` to `leader`. Returns the decision.
        fn fetch(&mut self, follower: ServerId, leader: ServerId) -> FetchDecision {
            let (f, l) = (self.r(follower).clone(), self.r(leader).clone());
            assert!(f.up && l.up);
            let req = FetchRequest {
                epoch: f.promised,
                fetch_offset: f.log_end(),
                last_epoch: f.history.last_epoch(),
                cursor_version: 0,
            };
            let mut ld = l.leader.clone().expect("not a leader");
            let decision = ld.on_fetch(follower, &req, &l.view());
            match decision {
                FetchDecision::Fenced { epoch } => {
                    // The leader learns it was deposed and steps down.
                    let lr = self.r(leader);
                    lr.leader = None;
                    lr.promised = lr.promised.max(epoch);
                    return decision;
                }
                FetchDecision::Diverging { end_epoch, end_offset } => {
                    let fr = self.r(follower);
                    let to = truncation_point(&fr.view(), end_epoch, end_offset);
                    assert!(to >= fr.commit, "truncating below the commit offset {} to {to}", fr.commit);
                    fr.truncate(to);
                }
                FetchDecision::Reset { log_start } => {
                    let fr = self.r(follower);
                    fr.records.clear();
                    fr.log_start = log_start;
                    fr.history = l.history.clone();
                    fr.history.truncate(log_start + 1);
                    fr.commit = fr.commit.max(log_start);
                }
                FetchDecision::NotReplica => panic!("{follower} is a replica"),
                FetchDecision::Serve { from } => {
                    let fr = self.r(follower);
                    if ld.epoch < fr.promised {
                        // A stale leader's data is refused by a follower that promised newer.
                        self.r(leader).leader = Some(ld);
                        return FetchDecision::Fenced { epoch: self.r(follower).promised };
                    }
                    fr.promised = ld.epoch;
                    let start = (from - l.log_start) as usize;
                    fr.records.extend(l.records[start..].iter().cloned());
                    let end = fr.log_end();
                    for (e, s) in fr.history.to_adopt(l.history.entries(), end) {
                        fr.history.assign(e, s);
                    }
                    fr.commit = fr.commit.max(ld.commit().min(end));
                    // Deletion replicates too.
                    if l.log_start > fr.log_start {
                        let drop = (l.log_start.min(end) - fr.log_start) as usize;
                        fr.records.drain(..drop);
                        fr.log_start += drop as Offset;
                    }
                }
            }
            let durable = self.r(leader).log_end();
            if ld.advance_commit(durable).is_some() {
                let commit = ld.commit();
                let lr = self.r(leader);
                lr.commit = commit;
                for (o, p) in lr.payloads() {
                    if o < commit {
                        self.committed.entry(o).or_insert(p);
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

        /// G1/G2: every record ever reported committed is on `leader` at its offset, and every
        /// live replica agrees with the leader up to the leader's commit offset.
        fn check(&mut self, leader: ServerId) {
            let l = self.r(leader).clone();
            let log: BTreeMap<Offset, String> = l.payloads().into_iter().collect();
            for (o, p) in &self.committed {
                if *o >= l.log_start {
                    assert_eq!(
                        log.get(o),
                        Some(p),
                        "committed offset {o} lost or changed on leader {leader}"
                    );
                }
            }
            for r in self.replicas.iter().filter(|r| r.up) {
                for (o, p) in r.payloads() {
                    if o < l.known_commit() && o >= l.log_start {
                        assert_eq!(log.get(&o), Some(&p), "replica {} differs at {o}", r.id);
                    }
                }
            }
        }
    }

    impl Replica {
        /// The commit offset this replica knows (its leader state's, when leading).
        fn known_commit(&self) -> Offset {
            self.leader.as_ref().map_or(self.commit, |l| l.commit())
        }
    }

    #[test]
    fn records_commit_once_a_majority_holds_them() {
        let mut sim = Sim::new(3);
        let a = sim.elect().unwrap();
        sim.append(a, "r0");
        sim.append(a, "r1");
        assert_eq!(sim.r(a).known_commit(), 0, "nothing is committed by the leader alone");
        sim.fetch(2, a); // follower 2 adopts the epoch and fetches the records
        assert_eq!(sim.r(a).known_commit(), 0, "the fetch that brought the records is not yet their ack");
        sim.fetch(2, a); // its next fetch acknowledges them
        assert_eq!(sim.r(a).known_commit(), 2);
        sim.settle(a);
        sim.check(a);
        assert!(sim.replicas.iter().all(|r| r.payloads().len() == 2));
    }

    #[test]
    fn leader_crash_after_append_before_commit_loses_only_uncommitted_records() {
        let mut sim = Sim::new(3);
        let a = sim.elect().unwrap();
        sim.append(a, "c0");
        sim.settle(a);
        sim.append(a, "u1"); // appended on the leader only, never acknowledged
        assert_eq!(sim.r(a).known_commit(), 1);
        sim.crash(a);
        let b = sim.elect().unwrap();
        assert_ne!(b, a);
        sim.append(b, "n1");
        sim.settle(b);
        sim.restart(a);
        sim.settle(b);
        sim.check(b);
        // The old leader truncated its uncommitted record by epoch and took the new one.
        let got: Vec<String> = sim.r(a).payloads().into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, ["c0", "n1"]);
    }

    #[test]
    fn leader_crash_after_commit_before_followers_learn_it_keeps_the_record() {
        let mut sim = Sim::new(3);
        let a = sim.elect().unwrap();
        sim.append(a, "x0");
        sim.fetch(2, a); // 2 gets x0
        sim.fetch(2, a); // and acknowledges it: committed at the leader only
        assert_eq!(sim.r(a).known_commit(), 1);
        assert_eq!(sim.r(2).commit, 0, "follower 2 has not learned the commit");
        sim.crash(a);
        // 3 never saw x0; 2 has it: the election must pick 2.
        let b = sim.elect().unwrap();
        assert_eq!(b, 2);
        sim.settle(b);
        sim.append(b, "x1");
        sim.settle(b);
        sim.check(b);
        assert_eq!(sim.r(3).payloads().len(), 2);
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
        sim.fetch(3, b); // 3 takes b's epoch and records,
        sim.fetch(3, b); // and acknowledges: b1, b2 committed
        assert_eq!(sim.r(b).known_commit(), 3);
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
            let got: Vec<String> = r.payloads().into_iter().map(|(_, p)| p).collect();
            assert_eq!(got, ["a0", "b1", "b2", "c4"], "replica {}", r.id);
        }
    }

    #[test]
    fn an_old_epoch_entry_commits_only_through_the_new_epochs_majority() {
        // Raft's figure 8: a new leader copying an old-epoch entry to a majority must not count
        // it as committed until a majority adopted its own epoch, or a replica holding a newer
        // (uncommitted) entry at that offset could still win an election and overwrite it.
        let mut sim = Sim::new(3);
        assert_eq!(sim.elect(), Some(1)); // epoch 1
        sim.append(1, "base");
        sim.settle(1);
        sim.append(1, "e1"); // offset 1, on 1 only
        sim.crash(1);
        sim.crash(2);
        assert_eq!(sim.elect(), None, "3 alone is no majority (epoch 2 is burnt)");
        sim.restart(2);
        assert_eq!(sim.elect(), Some(2)); // epoch 3 among {2, 3}
        sim.append(2, "e3"); // offset 1, on 2 only
        sim.crash(2);
        sim.restart(1);
        assert_eq!(sim.elect(), Some(1), "epoch 4: 1 has the longer log of epoch 1"); // among {1, 3}
        sim.fetch(3, 1); // 3 gets e1 and adopts epoch 4, but its ack is still for epoch 1
        assert_eq!(sim.r(1).known_commit(), 1, "e1 is on a majority but not committed yet");
        sim.fetch(3, 1); // now 3 acknowledges in epoch 4
        assert_eq!(sim.r(1).known_commit(), 2);
        sim.append(1, "after");
        sim.settle(1);
        sim.restart(2); // 2 truncates its epoch-3 entry by epoch
        sim.settle(1);
        sim.check(1);
        for r in &sim.replicas {
            let got: Vec<String> = r.payloads().into_iter().map(|(_, p)| p).collect();
            assert_eq!(got, ["base", "e1", "after"], "replica {}", r.id);
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
        assert_eq!(sim.r(a).commit, 1, "nothing more was committed by the stale leader");
        // It rejoins as a follower of b and drops its stale record.
        sim.append(b, "new");
        sim.settle(b);
        sim.check(b);
        let got: Vec<String> = sim.r(a).payloads().into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, ["ok", "new"]);
    }

    #[test]
    fn a_follower_down_while_the_leader_deletes_does_not_bring_records_back() {
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
        // Every subscription passed offset 6: the leader deletes below it.
        let l = sim.r(a);
        l.records.drain(..6);
        l.log_start = 6;
        sim.settle(a);
        assert_eq!(sim.r(2).log_start, 6, "the live follower deleted too");
        sim.restart(3);
        let d = sim.fetch(3, a);
        assert_eq!(d, FetchDecision::Reset { log_start: 6 });
        sim.settle(a);
        let r3 = sim.r(3).clone();
        assert_eq!(r3.log_start, 6);
        assert_eq!(r3.payloads(), sim.r(a).payloads(), "3 matches the leader, deleted records stay deleted");
        // And 3 cannot win an election with records the others deleted.
        sim.crash(a);
        let b = sim.elect().unwrap();
        sim.settle(b);
        assert!(sim.replicas.iter().filter(|r| r.up).all(|r| r.log_start == 6));
    }

    #[test]
    fn a_follower_counts_toward_commit_only_once_it_adopted_the_epoch() {
        // Leader of epoch 3 took over at offset 2; follower 2 already holds offsets 0..2 from
        // epoch 1. Its fetch is consistent, but it has not adopted epoch 3: not counted.
        let history = EpochHistory::new(vec![(1, 0), (3, 2)]);
        let log = LogView { log_start: 0, log_end: 2, history: &history };
        let mut leader = Leader::new(1, 3, vec![1, 2, 3], &log, 0);
        let old = FetchRequest { epoch: 3, fetch_offset: 2, last_epoch: 1, cursor_version: 0 };
        assert_eq!(leader.on_fetch(2, &old, &log), FetchDecision::Serve { from: 2 });
        assert_eq!(leader.advance_commit(2), None);
        let adopted = FetchRequest { last_epoch: 3, ..old };
        assert_eq!(leader.on_fetch(2, &adopted, &log), FetchDecision::Serve { from: 2 });
        assert_eq!(leader.advance_commit(2), Some(2));
        // A server outside the replica set is never counted.
        assert_eq!(leader.on_fetch(9, &adopted, &log), FetchDecision::NotReplica);
    }

    #[test]
    fn epoch_history_answers_divergence_questions() {
        let h = EpochHistory::new(vec![(1, 0), (2, 4), (4, 6)]);
        assert_eq!(h.end_offset_for(1, 10), (1, 4));
        assert_eq!(h.end_offset_for(3, 10), (2, 6), "largest epoch not above 3 is 2, ending at 6");
        assert_eq!(h.end_offset_for(4, 10), (4, 10));
        assert_eq!(h.end_offset_for(0, 10), (0, 0));
        assert_eq!(h.epoch_at(5), 2);
        // A follower with (1,0),(3,5) and end 8 against this leader converges to 4 in rounds.
        let mut f = EpochHistory::new(vec![(1, 0), (3, 5)]);
        let mut end = 8;
        for _ in 0..5 {
            let (e, leader_end) = h.end_offset_for(f.last_epoch(), 10);
            if e == f.last_epoch() && leader_end >= end {
                break;
            }
            end = truncation_point(&LogView { log_start: 0, log_end: end, history: &f }, e, leader_end);
            f.truncate(end);
        }
        assert_eq!((f.last_epoch(), end), (1, 4));
    }

    #[test]
    fn elections_need_a_majority_and_pick_the_most_up_to_date() {
        let replicas = [1, 2, 3];
        assert_eq!(choose_leader(&replicas, &[(1, 5, 100)]), None);
        assert_eq!(choose_leader(&replicas, &[(1, 5, 100), (2, 6, 10)]), Some(2));
        assert_eq!(
            choose_leader(&replicas, &[(1, 5, 100), (3, 5, 100)]),
            Some(1),
            "ties go to the lowest id"
        );
        assert_eq!(choose_leader(&replicas, &[(1, 5, 100), (9, 9, 999)]), None, "non-members do not count");
    }

    #[test]
    fn cursor_moves_commit_in_order_and_bound_the_log_start() {
        let mut leader = CursorLog::default();
        let v1 = leader.set("a", Some(10));
        let v2 = leader.set("b", Some(4));
        let v3 = leader.set("a", Some(20));
        assert_eq!(leader.lowest_held(), Some(4), "a cursor not yet committed holds records too");
        leader.commit(v1);
        assert_eq!(leader.committed().get("a"), Some(&10));
        assert_eq!(leader.lowest_held(), Some(4));
        leader.commit(v2);
        assert_eq!(leader.lowest_held(), Some(4));
        leader.commit(v3);
        assert_eq!(leader.committed().get("a"), Some(&20));
        let v4 = leader.set("b", None);
        assert_eq!(leader.lowest_held(), Some(4), "b holds its records until its deletion commits");
        leader.commit(v4);
        assert_eq!(leader.lowest_held(), Some(20), "deleting b frees what only it held");
        // A reset moving a cursor back holds the records it will read again at once.
        let v5 = leader.set("a", Some(15));
        assert_eq!(leader.lowest_held(), Some(15));
        leader.commit(v5);
        assert_eq!(leader.committed().get("a"), Some(&15));

        // A follower fed the changes converges.
        let mut follower = CursorLog::default();
        for (name, cursor, v) in leader.changes_since(0) {
            follower.apply(&name, cursor, v);
        }
        follower.commit(follower.version());
        assert_eq!(follower.committed(), leader.committed());
    }
}
