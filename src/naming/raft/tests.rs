//! A naming group of three driven message by message: elections, commits, a lost leader, a
//! restart from redb, a cut-off leader, a member restored from a snapshot.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use redb::Database;

use super::*;
use crate::naming::book::{Book, ServerRecord};

/// A change that registers server `id` (enough to tell changes and their order apart).
fn register(id: u64) -> BookChange {
    let addr = format!("127.0.0.1:{}", 7400 + id).parse().unwrap();
    BookChange { servers: vec![ServerRecord { id, addr }], ..BookChange::default() }
}

struct Member {
    dir: PathBuf,
    node: Option<BookNode>,
    /// The book as this member applied it.
    book: Book,
    /// Server ids in the order their registrations were applied.
    order: Vec<u64>,
}

struct Group {
    _root: tempfile::TempDir,
    peers: Vec<u64>,
    members: BTreeMap<u64, Member>,
    /// Members whose messages (both ways) are dropped.
    cut: BTreeSet<u64>,
    /// Snapshot messages still to lose (each reported to its sender as undelivered, as the
    /// driver does when a send fails or times out).
    lose_snapshots: usize,
    queue: VecDeque<Message>,
    /// Skips some members' ticks, as uneven clocks do (election timeouts are not randomized
    /// here, so the test stays the same run every time).
    rng: fastrand::Rng,
}

/// Ticks any test may wait for a condition: 20 election timeouts.
const MAX_TICKS: usize = 400;

fn settings() -> GroupSettings {
    GroupSettings { randomized: false, ..GroupSettings::default() }
}

impl Group {
    fn new(n: u64) -> Self {
        let root = tempfile::tempdir().unwrap();
        let peers: Vec<u64> = (1..=n).collect();
        let members = peers
            .iter()
            .map(|&id| {
                let dir = root.path().join(format!("n{id}"));
                std::fs::create_dir_all(&dir).unwrap();
                (id, Member { dir, node: None, book: Book::default(), order: vec![] })
            })
            .collect();
        let mut g = Self {
            _root: root,
            peers,
            members,
            cut: BTreeSet::new(),
            lose_snapshots: 0,
            queue: VecDeque::new(),
            rng: fastrand::Rng::with_seed(7),
        };
        for id in g.peers.clone() {
            g.start(id);
        }
        g
    }

    fn start(&mut self, id: u64) {
        let m = self.members.get_mut(&id).unwrap();
        let db = Arc::new(Database::create(m.dir.join("naming.redb")).unwrap());
        let log = RaftLog::open(db).unwrap();
        let snapshot = log.snapshot_now();
        (m.book, m.order) = if snapshot.data.is_empty() {
            (Book::default(), vec![])
        } else {
            postcard::from_bytes(&snapshot.data).unwrap()
        };
        m.node = Some(BookNode::open(id, &self.peers, log, settings()).unwrap());
    }

    fn stop(&mut self, id: u64) {
        self.members.get_mut(&id).unwrap().node = None;
    }

    fn node(&mut self, id: u64) -> &mut BookNode {
        self.members.get_mut(&id).unwrap().node.as_mut().expect("running")
    }

    /// Advances every member and delivers messages until none are left.
    fn settle(&mut self) {
        loop {
            for m in self.members.values_mut() {
                let Some(node) = m.node.as_mut() else { continue };
                let out = node.advance().unwrap();
                if let Some((_, data)) = out.snapshot {
                    (m.book, m.order) = postcard::from_bytes(&data).unwrap();
                }
                for Committed { change, .. } in out.committed {
                    m.order.extend(change.servers.iter().map(|s| s.id));
                    m.book.apply(&change);
                }
                self.queue.extend(out.messages);
            }
            if self.queue.is_empty() {
                return;
            }
            while let Some(msg) = self.queue.pop_front() {
                if self.cut.contains(&msg.from) || self.cut.contains(&msg.to) {
                    continue;
                }
                if msg.get_msg_type() == MessageType::MsgSnapshot && self.lose_snapshots > 0 {
                    self.lose_snapshots -= 1;
                    if let Some(node) = self.members.get_mut(&msg.from).and_then(|m| m.node.as_mut()) {
                        node.undelivered(msg.to, true);
                    }
                    continue;
                }
                if let Some(node) = self.members.get_mut(&msg.to).and_then(|m| m.node.as_mut()) {
                    node.step(msg).unwrap();
                }
            }
        }
    }

    fn tick(&mut self) {
        for m in self.members.values_mut() {
            if let Some(node) = m.node.as_mut().filter(|_| self.rng.f64() < 0.7) {
                node.tick();
            }
        }
        self.settle();
    }

    /// Ticks until `done` holds; false if it never does within [`MAX_TICKS`].
    fn until(&mut self, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        for _ in 0..MAX_TICKS {
            if done(self) {
                return true;
            }
            self.tick();
        }
        done(self)
    }

    /// The one running member that leads, once all running, uncut members agree on it.
    fn leader(&self) -> Option<u64> {
        let running: Vec<&BookNode> = self
            .members
            .iter()
            .filter(|(id, _)| !self.cut.contains(id))
            .filter_map(|(_, m)| m.node.as_ref())
            .collect();
        let leader = running.iter().find(|n| n.is_leader())?.id();
        running.iter().all(|n| n.leader() == Some(leader)).then_some(leader)
    }

    fn elect(&mut self) -> u64 {
        assert!(self.until(|g| g.leader().is_some()), "no leader within {MAX_TICKS} ticks");
        self.leader().unwrap()
    }

    fn order(&self, id: u64) -> &[u64] {
        &self.members[&id].order
    }
}

#[test]
fn a_group_of_three_elects_a_leader_and_every_member_applies_the_same_changes_in_order() {
    let mut g = Group::new(3);
    let leader = g.elect();
    for s in [10, 11, 12] {
        g.node(leader).propose(&register(s)).unwrap();
    }
    g.settle();
    assert!(g.until(|g| (1..=3).all(|id| g.order(id).len() == 3)));
    for id in 1..=3 {
        assert_eq!(g.order(id), [10, 11, 12], "member {id}");
        assert_eq!(g.members[&id].book, g.members[&leader].book);
    }
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    assert!(matches!(
        g.node(follower).propose(&register(13)),
        Err(GroupError::NotLeader { leader: Some(l) }) if l == leader
    ));
}

#[test]
fn committed_changes_survive_the_leader_and_a_restarted_member_catches_up() {
    let mut g = Group::new(3);
    let first = g.elect();
    let term = g.node(first).term();
    g.node(first).propose(&register(10)).unwrap();
    assert!(g.until(|g| (1..=3).all(|id| g.order(id) == [10])));

    g.stop(first);
    let second = g.elect();
    assert_ne!(second, first);
    assert!(g.node(second).term() > term);
    g.node(second).propose(&register(11)).unwrap();
    let others: Vec<u64> = (1..=3).filter(|id| *id != first).collect();
    assert!(g.until(|g| others.iter().all(|id| g.order(*id) == [10, 11])));

    // The old leader comes back from its redb: it replays what it had committed, learns the
    // rest, and follows.
    g.start(first);
    assert!(g.until(|g| g.order(first) == [10, 11] && g.leader() == Some(second)));
    g.node(second).propose(&register(12)).unwrap();
    assert!(g.until(|g| (1..=3).all(|id| g.order(id) == [10, 11, 12])));
}

#[test]
fn a_leader_cut_off_from_the_majority_commits_nothing_and_the_majority_goes_on() {
    let mut g = Group::new(3);
    let old = g.elect();
    g.cut.insert(old);
    // The cut-off leader still takes a proposal, but can never commit it.
    g.node(old).propose(&register(66)).unwrap();
    let new = g.elect();
    assert_ne!(new, old);
    g.node(new).propose(&register(10)).unwrap();
    let majority: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    assert!(g.until(|g| majority.iter().all(|id| g.order(*id) == [10])));
    // Check quorum: it stepped down on its own.
    assert!(g.until(|g| !g.members[&old].node.as_ref().unwrap().is_leader()));
    assert!(g.order(old).is_empty(), "nothing committed while cut off");

    // Healed, it drops its uncommitted entry and takes the majority's.
    g.cut.clear();
    assert!(g.until(|g| g.order(old) == [10] && g.leader() == Some(new)));
    g.node(new).propose(&register(11)).unwrap();
    assert!(g.until(|g| (1..=3).all(|id| g.order(id) == [10, 11])));
}

#[test]
fn a_member_behind_the_compaction_gets_the_book_as_a_snapshot() {
    a_member_behind_the_compaction_catches_up(0);
}

/// raft-rs sends no more to a member while a snapshot to it is on its way; told the send
/// failed, it sends the snapshot again (before, one lost snapshot left the member behind
/// for good).
#[test]
fn a_lost_snapshot_is_sent_again() {
    a_member_behind_the_compaction_catches_up(2);
}

fn a_member_behind_the_compaction_catches_up(lost_snapshots: usize) {
    let mut g = Group::new(3);
    let leader = g.elect();
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    g.stop(lagging);
    for s in 10..20 {
        g.node(leader).propose(&register(s)).unwrap();
    }
    let running: Vec<u64> = (1..=3).filter(|id| *id != lagging).collect();
    assert!(g.until(|g| running.iter().all(|id| g.order(*id).len() == 10)));
    for id in running.clone() {
        let m = &g.members[&id];
        let data = postcard::to_stdvec(&(&m.book, &m.order)).unwrap();
        g.node(id).compact(data).unwrap();
        assert_eq!(g.members[&id].node.as_ref().unwrap().log.entry_count(), 0, "member {id}");
    }

    g.lose_snapshots = lost_snapshots;
    g.start(lagging);
    let expected: Vec<u64> = (10..20).collect();
    assert!(g.until(|g| g.order(lagging) == expected));
    assert_eq!(g.lose_snapshots, 0, "every snapshot meant to be lost was sent");
    assert_eq!(g.members[&lagging].book.servers, g.members[&leader].book.servers);
    // And it survives a restart: the snapshot is durable.
    g.stop(lagging);
    g.start(lagging);
    assert_eq!(g.order(lagging), expected);
}

/// A member that compacted its log starts again from it, though the commit point it stored
/// is older than the compaction (a leader learns commits outside a hard state and keeps them
/// in memory); raft-rs refuses to start with a commit before the log's first entry. Found by
/// the simulator once it compacted every few changes.
#[test]
fn a_member_restarts_after_compacting_past_its_stored_commit() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("naming.redb");
    let entries: Vec<Entry> = (1..=9).map(|index| Entry { index, term: 1, ..Entry::default() }).collect();
    {
        let log = RaftLog::open(Arc::new(Database::create(&path).unwrap())).unwrap();
        log.set_conf_state(ConfState::from((vec![1, 2, 3], vec![]))).unwrap();
        let hs = raft::eraftpb::HardState { term: 1, vote: 1, commit: 0, ..Default::default() };
        log.persist(Persist { snapshot: None, entries: &entries, hard_state: Some(&hs) }).unwrap();
        log.set_commit(9); // learnt outside a hard state: in memory only
        log.compact(9, postcard::to_stdvec(&(Book::default(), Vec::<u64>::new())).unwrap()).unwrap();
    }
    let log = RaftLog::open(Arc::new(Database::create(&path).unwrap())).unwrap();
    let node = BookNode::open(1, &[1, 2, 3], log, settings()).unwrap();
    assert_eq!(node.indexes(), (9, 9));
}
