//! Which topics changed at which book version, so a heartbeat answer carries what changed
//! since the version a server knows rather than every topic it hosts.
//!
//! The log lives in the naming leader's core and starts empty whenever a core starts: a
//! server that knows a version older than the log's floor (or newer than the
//! book: a leader that has not applied everything yet) gets all its topics, as before. So
//! the log needs no durability and no agreement between naming members.
//!
//! A server's topics at the book's version are exactly its topics at the version it knows,
//! minus `dropped`, with `changed` put in place (a property test below checks this against
//! the full answer for random histories).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::book::{Book, BookChange};
use crate::types::{ServerId, TopicId};

/// Departures (a server leaving a topic's replica set, or a topic deleted) the log keeps.
/// Each is 24 bytes, so the log stays about 1 MB; a server that falls behind further gets
/// its full assignment list, which is always correct.
pub const MAX_DEPARTURES: usize = 40_000;

/// A server that stopped holding a topic at a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Departure {
    version: u64,
    server: ServerId,
    topic: TopicId,
}

/// What changed for one server since a version it knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Topics whose replica set holds the server and that changed (or are new to it).
    pub changed: Vec<String>,
    /// Topics the server does not hold now and left since the version it knows (it may
    /// never have taken one on, if it came and went in between: dropping that is a no-op).
    pub dropped: Vec<TopicId>,
}

/// Topics changed and servers departed since the core started.
#[derive(Debug, Clone, Default)]
pub struct ChangeLog {
    /// The oldest version deltas are exact from; `None` until the first change is recorded.
    floor: Option<u64>,
    /// The version at which each topic (by name) last changed, since the floor.
    stamp: BTreeMap<String, u64>,
    /// The same stamps in version order, to find what changed since a version without
    /// scanning every topic.
    by_version: BTreeSet<(u64, String)>,
    departures: VecDeque<Departure>,
    /// The version of the last change to the grants, since the floor.
    acl_at: Option<u64>,
}

impl ChangeLog {
    /// The oldest version a delta can start from, if any.
    #[cfg(test)]
    pub fn floor(&self) -> Option<u64> {
        self.floor
    }

    /// Records `change`, about to be applied to `book` (which is still at the version before).
    pub fn record(&mut self, book: &Book, change: &BookChange) {
        let version = book.version + 1;
        self.floor.get_or_insert(book.version);
        if change.acl.is_some() {
            self.acl_at = Some(version);
        }
        // A new address for a server changes what every topic holding it tells its replicas.
        for s in &change.servers {
            if book.servers.get(&s.id).is_some_and(|old| old.addr == s.addr) {
                continue;
            }
            let holding: Vec<String> = book
                .topics
                .values()
                .filter(|t| t.members().any(|r| r == s.id))
                .map(|t| t.name.to_string())
                .collect();
            for name in holding {
                self.touch(name, version);
            }
        }
        for t in &change.topics {
            let name = t.name.to_string();
            if let Some(old) = book.topics.get(&name) {
                if old.id != t.id {
                    self.depart_all(old.members(), old.id, version);
                } else {
                    let stays: Vec<ServerId> = t.members().collect();
                    self.depart_all(old.members().filter(|r| !stays.contains(r)), old.id, version);
                }
            }
            self.touch(name, version);
        }
        for name in &change.removed {
            if let Some(old) = book.topics.get(name) {
                self.depart_all(old.members(), old.id, version);
            }
            if let Some(v) = self.stamp.remove(name) {
                self.by_version.remove(&(v, name.clone()));
            }
        }
    }

    fn touch(&mut self, name: String, version: u64) {
        if let Some(v) = self.stamp.insert(name.clone(), version) {
            self.by_version.remove(&(v, name.clone()));
        }
        self.by_version.insert((version, name));
    }

    fn depart_all(&mut self, servers: impl Iterator<Item = ServerId>, topic: TopicId, version: u64) {
        for server in servers {
            self.departures.push_back(Departure { version, server, topic });
        }
        while self.departures.len() > MAX_DEPARTURES {
            let gone = self.departures.pop_front().expect("over the bound");
            // A server at a version before `gone` might miss it: deltas start after it now.
            let floor = self.floor.get_or_insert(gone.version);
            *floor = (*floor).max(gone.version);
        }
    }

    /// Whether the grants changed between version `known` and `book` (`true` when the log
    /// cannot tell).
    pub fn acl_changed_since(&self, book: &Book, known: u64) -> bool {
        match self.floor {
            Some(floor) if floor <= known && known <= book.version => {
                self.acl_at.is_some_and(|at| at > known)
            }
            _ => true,
        }
    }

    /// What changed for `server` between version `known` and `book` (the book this log
    /// recorded every change into), or `None` when only a full list is right: the log does
    /// not reach back to `known`, or `known` is newer than the book.
    pub fn since(&self, book: &Book, server: ServerId, known: u64) -> Option<Delta> {
        let floor = self.floor?;
        if known < floor || known > book.version {
            return None;
        }
        let holds = |name: &str| {
            book.topics.get(name).is_some_and(|t| t.members().any(|r| r == server)).then_some(())
        };
        let changed: Vec<String> = self
            .by_version
            .range((known + 1, String::new())..)
            .filter_map(|(_, name)| holds(name).map(|()| name.clone()))
            .collect();
        let still: BTreeSet<TopicId> =
            changed.iter().filter_map(|n| book.topics.get(n)).map(|t| t.id).collect();
        let mut dropped: Vec<TopicId> = self
            .departures
            .iter()
            .rev()
            .take_while(|d| d.version > known)
            .filter(|d| d.server == server && !still.contains(&d.topic))
            .map(|d| d.topic)
            .collect();
        // A departure and a return without a change in between cannot happen (a return
        // rewrites the record), but a topic may leave twice between two of its versions.
        dropped.sort_unstable();
        dropped.dedup();
        Some(Delta { changed, dropped })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::naming::book::{ServerRecord, TopicRecord};
    use crate::types::TopicName;
    use crate::wire::TopicConfig;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn topic(name: &str, id: TopicId, voters: &[ServerId], learners: &[ServerId], epoch: u64) -> TopicRecord {
        TopicRecord {
            id,
            name: TopicName::new(name).unwrap(),
            config: TopicConfig::default(),
            factor: voters.len() as u32,
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            leader: voters[0],
            epoch,
            election_epoch: epoch,
            created_ms: 0,
            replacing: None,
        }
    }

    /// What a server holds at a book: topic id to (record, addresses of its members), the
    /// full answer's content.
    fn held(book: &Book, server: ServerId) -> BTreeMap<TopicId, (TopicRecord, Vec<Option<SocketAddr>>)> {
        book.topics
            .values()
            .filter(|t| t.members().any(|r| r == server))
            .map(|t| {
                let addrs = t.members().map(|r| book.servers.get(&r).map(|s| s.addr)).collect();
                (t.id, (t.clone(), addrs))
            })
            .collect()
    }

    /// One step of a random history over 4 servers and 5 topic names.
    #[derive(Debug, Clone)]
    enum Op {
        Put { name: u8, voters: Vec<ServerId>, learner: Option<ServerId>, new_id: bool },
        Remove { name: u8 },
        Move { server: ServerId, port: u16 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..5, proptest::sample::subsequence(vec![1u64, 2, 3, 4], 1..=3), proptest::option::of(1u64..=4), any::<bool>())
                .prop_map(|(name, voters, learner, new_id)| Op::Put { name, voters, learner, new_id }),
            1 => (0u8..5).prop_map(|name| Op::Remove { name }),
            1 => (1u64..=4, 1u16..4).prop_map(|(server, port)| Op::Move { server, port }),
        ]
    }

    proptest! {
        /// From every version the log covers, the delta turns what a server held then into
        /// exactly what it holds now.
        #[test]
        fn deltas_rebuild_the_full_answer(ops in proptest::collection::vec(op(), 1..40)) {
            let mut book = Book::default();
            let mut log = ChangeLog::default();
            let mut history = vec![book.clone()];
            let mut next_id = 1;
            let mut epoch = 1;
            for op in ops {
                let change = match op {
                    Op::Put { name, voters, learner, new_id } => {
                        let name = format!("t{name}");
                        let id = match book.topics.get(&name) {
                            Some(t) if !new_id => t.id,
                            _ => { next_id += 1; next_id }
                        };
                        epoch += 1;
                        let learners: Vec<ServerId> = learner.filter(|l| !voters.contains(l)).into_iter().collect();
                        BookChange::topic(topic(&name, id, &voters, &learners, epoch))
                    }
                    Op::Remove { name } => BookChange { removed: vec![format!("t{name}")], ..BookChange::default() },
                    Op::Move { server, port } => BookChange {
                        servers: vec![ServerRecord { id: server, addr: addr(port) }],
                        ..BookChange::default()
                    },
                };
                log.record(&book, &change);
                book.apply(&change);
                history.push(book.clone());
            }
            for known in log.floor().unwrap()..=book.version {
                for server in 1..=4 {
                    let delta = log.since(&book, server, known).expect("within the log");
                    let mut rebuilt = held(&history[known as usize], server);
                    let now = held(&book, server);
                    for id in &delta.dropped {
                        prop_assert!(!now.contains_key(id), "dropped {} it holds", id);
                        rebuilt.remove(id);
                    }
                    for name in &delta.changed {
                        let t = &book.topics[name];
                        rebuilt.insert(t.id, now[&t.id].clone());
                    }
                    prop_assert_eq!(&rebuilt, &now, "server {} from version {}", server, known);
                }
            }
        }
    }

    #[test]
    fn a_server_outside_the_log_gets_a_full_list() {
        let mut book = Book { version: 7, ..Book::default() };
        let mut log = ChangeLog::default();
        assert_eq!(log.since(&book, 1, 7), None, "nothing recorded yet");
        let change = BookChange::topic(topic("a", 1, &[1, 2], &[], 1));
        log.record(&book, &change);
        book.apply(&change);
        assert_eq!(log.floor(), Some(7));
        assert_eq!(log.since(&book, 1, 6), None, "before the floor");
        assert_eq!(log.since(&book, 1, 9), None, "newer than the book");
        assert_eq!(log.since(&book, 1, 7).unwrap().changed, vec!["a".to_string()]);
        assert_eq!(log.since(&book, 3, 7).unwrap(), Delta::default(), "not a replica");
        assert_eq!(log.since(&book, 1, 8).unwrap(), Delta::default(), "up to date");
    }

    #[test]
    fn grant_changes_are_told_once_past_them() {
        let mut book = Book { version: 3, ..Book::default() };
        let mut log = ChangeLog::default();
        assert!(log.acl_changed_since(&book, 3), "nothing recorded: cannot tell");
        let change = BookChange::topic(topic("a", 1, &[1], &[], 1));
        log.record(&book, &change);
        book.apply(&change);
        assert!(!log.acl_changed_since(&book, 3));
        let change = BookChange { acl: Some(Default::default()), ..BookChange::default() };
        log.record(&book, &change);
        book.apply(&change);
        assert!(log.acl_changed_since(&book, 4));
        assert!(!log.acl_changed_since(&book, 5));
        assert!(log.acl_changed_since(&book, 2), "before the floor");
    }

    #[test]
    fn departures_beyond_the_bound_raise_the_floor() {
        let mut book = Book::default();
        let mut log = ChangeLog::default();
        let servers: Vec<ServerId> = (1..=16).collect();
        let mut i = 0;
        while log.departures.len() < MAX_DEPARTURES {
            i += 1;
            for change in [
                BookChange::topic(topic("a", i, &servers, &[], i)),
                BookChange { removed: vec!["a".into()], ..BookChange::default() },
            ] {
                log.record(&book, &change);
                book.apply(&change);
            }
        }
        assert_eq!(log.floor(), Some(0));
        let change = BookChange::topic(topic("a", i + 1, &servers, &[], i + 1));
        log.record(&book, &change);
        book.apply(&change);
        let change = BookChange { removed: vec!["a".into()], ..BookChange::default() };
        log.record(&book, &change);
        book.apply(&change);
        assert_eq!(log.departures.len(), MAX_DEPARTURES);
        let floor = log.floor().unwrap();
        assert!(floor > 0, "the oldest departures were let go");
        assert_eq!(log.since(&book, 1, floor - 1), None);
        assert_eq!(log.since(&book, 1, book.version - 1).unwrap().dropped, vec![i + 1]);
    }
}
