//! Three naming members driven message by message: only the leader decides, nobody hears
//! of a change before it committed, and a naming leader lost mid-election leaves no topic
//! wedged and no epoch reused.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use redb::Database;

use super::*;
use crate::naming::raft::RaftLog;

const LEASE: u64 = 1_000;

fn server_addr(id: ServerId) -> SocketAddr {
    format!("127.0.0.1:{}", 7400 + id).parse().unwrap()
}

fn member_addr(id: u64) -> SocketAddr {
    format!("127.0.0.1:{}", 7300 + id).parse().unwrap()
}

/// A Raft message on its way, due at `at` (ms), sent while the sender's log was `empty`.
struct InFlight {
    at: u64,
    msg: Message,
    empty: bool,
}

/// What the network between members does to messages.
#[derive(Default, Clone, Copy)]
struct Faults {
    /// Chance that a message is lost.
    drop: f64,
    /// Most ticks a message may be held up (so later ones overtake it).
    max_delay: u64,
}

/// Reply tokens: which request (by number) got which answer.
type Replies = Vec<(u32, Result<Done, Error>)>;

struct Group {
    _root: tempfile::TempDir,
    dirs: BTreeMap<u64, PathBuf>,
    members: BTreeMap<u64, Option<NamingMember<u32>>>,
    cut: BTreeSet<u64>,
    queue: VecDeque<InFlight>,
    /// Loss and delay of messages; none unless a test sets them.
    faults: Faults,
    now: u64,
    replies: Replies,
    /// Promise requests the members sent, in order.
    asks: Vec<PromiseAsk>,
    rng: fastrand::Rng,
}

impl Group {
    fn with_seed(seed: u64) -> Self {
        let root = tempfile::tempdir().unwrap();
        let dirs = (1..=3).map(|id| (id, root.path().join(format!("m{id}")))).collect();
        let mut g = Self {
            _root: root,
            dirs,
            members: BTreeMap::new(),
            cut: BTreeSet::new(),
            queue: VecDeque::new(),
            faults: Faults::default(),
            now: 10_000,
            replies: Vec::new(),
            asks: Vec::new(),
            rng: fastrand::Rng::with_seed(seed),
        };
        for id in 1..=3 {
            g.start(id);
        }
        g
    }

    fn start(&mut self, id: u64) {
        let dir = &self.dirs[&id];
        std::fs::create_dir_all(dir).unwrap();
        let db = Arc::new(Database::create(dir.join("naming.redb")).unwrap());
        let log = RaftLog::open(db).unwrap();
        let peers = (1..=3).map(|p| (p, member_addr(p))).collect();
        let group = GroupSettings { randomized: false, ..GroupSettings::default() };
        let m = NamingMember::open(id, peers, log, group, Settings::new(LEASE, 60_000), 77).unwrap();
        self.members.insert(id, Some(m));
    }

    fn stop(&mut self, id: u64) {
        self.members.insert(id, None);
    }

    fn book(&self, id: u64) -> &Book {
        self.members[&id].as_ref().expect("running").book()
    }

    fn member(&mut self, id: u64) -> &mut NamingMember<u32> {
        self.members.get_mut(&id).unwrap().as_mut().expect("running")
    }

    /// Queues what a member produced. Its messages carry whether the sender's log was empty
    /// as they leave (as the driver's do), which may be stale by the time they arrive.
    fn take(&mut self, fx: Effects<u32>) {
        for msg in fx.messages {
            if self.faults.drop > 0.0 && self.rng.f64() < self.faults.drop {
                continue;
            }
            let empty =
                self.members.get(&msg.from).and_then(|m| m.as_ref()).is_some_and(|m| m.log_is_empty());
            let delay = if self.faults.max_delay > 0 { self.rng.u64(0..=self.faults.max_delay) } else { 0 };
            let at = self.now + delay * crate::naming::raft::TICK_MS;
            self.queue.push_back(InFlight { at, msg, empty });
        }
        self.replies.extend(fx.replies);
        self.asks.extend(fx.asks);
    }

    /// Delivers every message due by now, and what they cause, until none is due.
    fn deliver(&mut self) {
        while let Some(i) = self.queue.iter().position(|f| f.at <= self.now) {
            let InFlight { msg, empty, .. } = self.queue.remove(i).expect("found");
            if self.cut.contains(&msg.from) || self.cut.contains(&msg.to) {
                continue;
            }
            let now = self.now;
            if let Some(m) = self.members.get_mut(&msg.to).and_then(|m| m.as_mut()) {
                let fx = m.step(now, msg, empty).unwrap();
                self.take(fx);
            }
        }
    }

    /// One tick of every running member (some skipped at random, as uneven clocks do).
    fn tick(&mut self) {
        self.now += crate::naming::raft::TICK_MS;
        let now = self.now;
        let ids: Vec<u64> = self.members.keys().copied().collect();
        for id in ids {
            if self.rng.f64() < 0.8 {
                if let Some(m) = self.members.get_mut(&id).unwrap().as_mut() {
                    let fx = m.tick(now).unwrap();
                    self.take(fx);
                }
            }
        }
        self.deliver();
    }

    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        for _ in 0..400 {
            if done(self) {
                return;
            }
            self.tick();
        }
        panic!("not within 400 ticks: {what}");
    }

    fn leader(&self) -> Option<u64> {
        self.members.iter().find(|(_, m)| m.as_ref().is_some_and(|m| m.core().is_some())).map(|(id, _)| *id)
    }

    fn elect(&mut self) -> u64 {
        self.until("a naming leader", |g| g.leader().is_some() && !g.cut.contains(&g.leader().unwrap()));
        self.leader().unwrap()
    }

    fn submit(&mut self, to: u64, admin: Admin, token: u32) {
        let now = self.now;
        let fx = self.member(to).submit(now, admin, token).unwrap();
        self.take(fx);
        self.deliver();
    }

    fn reply(&self, token: u32) -> Option<&Result<Done, Error>> {
        self.replies.iter().find(|(t, _)| *t == token).map(|(_, r)| r)
    }

    /// Every running topic server heartbeats to the leader.
    fn beat(&mut self, servers: &[ServerId]) {
        let now = self.now;
        if let Some(leader) = self.leader() {
            for s in servers {
                let _ = self.member(leader).heartbeat(now, *s, 0, Default::default());
            }
        }
    }
}

fn create(name: &str) -> Admin {
    Admin::CreateTopics {
        names: vec![TopicName::new(name).unwrap()],
        replicas: 3,
        config: TopicConfig::default(),
        wall_ms: 0,
    }
}

/// A group with a leader, three registered topic servers and topic `t`.
fn group_with_topic() -> Group {
    group_with_topic_seeded(11)
}

fn group_with_topic_seeded(seed: u64) -> Group {
    let mut g = Group::with_seed(seed);
    let leader = g.elect();
    for s in 1..=3 {
        g.submit(leader, Admin::Register { server: s, addr: server_addr(s) }, s as u32);
    }
    g.until("registrations", |g| (1..=3).all(|t| g.reply(t).is_some()));
    g.submit(leader, create("t"), 10);
    g.until("topic created", |g| g.reply(10).is_some());
    assert!(matches!(g.reply(10), Some(Ok(Done::TopicsChanged { .. }))), "{:?}", g.reply(10));
    g
}

#[test]
fn only_the_leader_decides_and_every_member_applies_the_same_book() {
    let mut g = group_with_topic();
    let leader = g.leader().unwrap();
    g.until("every member applied the topic", |g| {
        g.members.values().all(|m| m.as_ref().unwrap().book().topics.contains_key("t"))
    });
    let books: Vec<Book> = g.members.values().map(|m| m.as_ref().unwrap().book().clone()).collect();
    assert!(books.windows(2).all(|w| w[0] == w[1]), "one book");
    assert_ne!(books[0].cluster_id, 0, "the first leader named the cluster");

    // A follower redirects, with the leader's address.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    g.submit(follower, create("u"), 20);
    match g.reply(20) {
        Some(Err(Error::NamingNotLeader { leader: Some(addr), .. })) => {
            assert_eq!(*addr, member_addr(leader))
        }
        other => panic!("{other:?}"),
    }
    let now = g.now;
    assert!(
        g.member(follower).heartbeat(now, 1, 0, Default::default()).is_err(),
        "followers take no heartbeats"
    );
}

#[test]
fn two_creates_of_one_name_cannot_both_succeed() {
    let mut g = group_with_topic();
    let leader = g.leader().unwrap();
    // Both queued before either committed: the second is decided on a book with the first.
    let now = g.now;
    let fx = g.member(leader).submit(now, create("dup"), 30).unwrap();
    g.take(fx);
    let fx = g.member(leader).submit(now, create("dup"), 31).unwrap();
    g.take(fx);
    g.deliver();
    g.until("both answered", |g| g.reply(30).is_some() && g.reply(31).is_some());
    assert!(matches!(g.reply(30), Some(Ok(_))));
    assert!(matches!(g.reply(31), Some(Err(Error::TopicExists { .. }))), "{:?}", g.reply(31));
}

#[test]
fn a_naming_leader_lost_mid_election_leaves_no_topic_wedged_and_no_epoch_reused() {
    let mut g = group_with_topic();
    let first = g.leader().unwrap();
    let before = g.member(first).book().topics["t"].clone();
    // Topic leader 1 stops heartbeating; 2 and 3 go on. The naming leader starts an election:
    // its epoch commits before any voter is asked.
    g.until("an election's promise requests", |g| {
        g.beat(&[2, 3]);
        !g.asks.is_empty()
    });
    let asked = g.asks[0].epoch;
    assert!(asked > before.epoch);
    for id in 1..=3 {
        let book_epoch = g.member(id).book().topics["t"].election_epoch;
        if book_epoch < asked {
            // Only a member the commit had not reached yet may lag; a majority holds it.
            assert!(id != first, "the leader asked before it applied the epoch");
        }
    }
    // The naming leader dies before it hears any promise.
    g.stop(first);
    g.asks.clear();
    let second = g.elect();
    assert_ne!(second, first);
    // The new leader finishes (or redoes) the election once its restart grace is over.
    g.until("topic t led again", |g| {
        g.beat(&[2, 3]);
        let asks = std::mem::take(&mut g.asks);
        let now = g.now;
        if let Some(leader) = g.leader() {
            for a in asks {
                g.member(leader).on_promise(now, a.topic, a.epoch, a.server, Some((before.epoch, 5)));
            }
        }
        let t = &g.member(second).book().topics["t"];
        t.leader != 1 && t.epoch == t.election_epoch
    });
    let t = g.member(second).book().topics["t"].clone();
    assert!(t.epoch > asked, "epoch {} was used before; the new one is {}", asked, t.epoch);

    // The old naming leader comes back and takes the same book.
    g.start(first);
    g.until("the old leader caught up", |g| g.book(first) == g.book(second));
}

#[test]
fn a_member_cut_off_cannot_change_the_book_and_the_majority_goes_on() {
    let mut g = group_with_topic();
    let old = g.leader().unwrap();
    g.cut.insert(old);
    g.submit(old, create("lost"), 40);
    let new = g.elect();
    assert_ne!(new, old);
    g.beat(&[1, 2, 3]); // a new leader places topics only on servers it heard from
    g.submit(new, create("kept"), 41);
    g.until("kept created", |g| g.reply(41).is_some());
    assert!(matches!(g.reply(41), Some(Ok(_))));
    // The old leader never answers "created" for a change it could not commit.
    g.until("the cut-off leader steps down", |g| g.member(old).core().is_none());
    assert!(!matches!(g.reply(40), Some(Ok(_))), "{:?}", g.reply(40));
    g.cut.clear();
    g.until("healed", |g| g.book(old) == g.book(new));
    assert!(!g.member(old).book().topics.contains_key("lost"));
}

#[test]
fn a_wiped_member_is_rebuilt_from_the_others() {
    let mut g = group_with_topic();
    let leader = g.leader().unwrap();
    let wiped = (1..=3).find(|id| *id != leader).unwrap();
    g.until("all applied", |g| {
        g.members.values().all(|m| m.as_ref().unwrap().book().topics.contains_key("t"))
    });
    g.stop(wiped);
    std::fs::remove_dir_all(&g.dirs[&wiped]).unwrap();
    g.start(wiped);
    g.until("rebuilt", |g| {
        let l = g.leader().unwrap();
        g.book(wiped) == g.book(l)
    });
}

/// Seeds of the lossy-network test below (each a different interleaving of losses, delays
/// and clock skips).
const LOSSY_SEEDS: u64 = 60;

/// Ticks the network stays lossy while the wiped member rebuilds (ten election timeouts).
const FAULTY_TICKS: usize = 160;

/// Submits `admin` to whichever member leads until one commits it; panics if the group
/// does not within `attempts` tries of up to 400 ticks each.
fn commit_again(g: &mut Group, admin: impl Fn() -> Admin, first_token: u32, attempts: u32) {
    for token in first_token..first_token + attempts {
        let leader = g.elect();
        g.submit(leader, admin(), token);
        g.until("an answer", |g| g.reply(token).is_some());
        if matches!(g.reply(token), Some(Ok(_))) {
            return;
        }
    }
    let last = &g.replies[g.replies.len().saturating_sub(3)..];
    panic!("the group committed nothing in {attempts} tries; last answers: {last:?}");
}

/// A member whose data directory was lost is rebuilt while messages are lost, delayed and
/// reordered (some still saying its log is empty after it filled); once the network heals
/// it holds the book, and with another member down the two left still commit.
#[test]
fn a_wiped_member_rebuilt_over_a_lossy_network_counts_toward_the_majority_again() {
    for seed in 0..LOSSY_SEEDS {
        let mut g = group_with_topic_seeded(seed);
        let leader = g.leader().unwrap();
        let wiped = (1..=3).find(|id| *id != leader).unwrap();
        let third = (1..=3).find(|id| *id != leader && *id != wiped).unwrap();
        g.until("all applied", |g| {
            g.members.values().all(|m| m.as_ref().unwrap().book().topics.contains_key("t"))
        });
        // Messages are lost and overtake each other while the wiped member rebuilds, so some
        // arrive saying "my log is empty" after it no longer is.
        g.faults = Faults { drop: 0.3, max_delay: 45 };
        g.stop(wiped);
        std::fs::remove_dir_all(&g.dirs[&wiped]).unwrap();
        g.start(wiped);
        for _ in 0..FAULTY_TICKS {
            g.tick();
        }
        // The network heals: the wiped member catches up; then the third member stops and the
        // wiped one is half the majority.
        g.faults = Faults::default();
        g.until("rebuilt", |g| g.leader().is_some_and(|l| g.book(wiped) == g.book(l)));
        g.stop(third);
        commit_again(&mut g, || Admin::Register { server: 9, addr: server_addr(9) }, 100, 5);
        g.until("the wiped member applied it", |g| g.book(wiped).servers.contains_key(&9));
    }
}
