//! Idle topics park their fetches on one long poll per server pair.
//!
//! A follower holds one long-poll fetch per topic at its leader (`ReplicaFetch`), answered
//! at once when there is news and otherwise after `REPLICA_FETCH_WAIT`. With thousands of
//! idle topics, renewing those polls was most of an idle cluster's work. So a topic whose
//! fetch came back with nothing new parks instead of asking again: its follower server
//! registers the position with the leader server on one `Park` long poll per server pair
//! (like Kafka's incremental fetch sessions, KIP-227, a request carries only what changed),
//! and the leader names the topic in an answer as soon as it has news for that position or
//! is no longer led in the parked epoch. A woken topic fetches as before.
//!
//! Nothing here is needed for safety: a fetch decides everything, parking only decides when
//! to send it. A poll that fails or times out wakes every topic parked on its session, so a
//! lost answer or a restarted leader costs one fetch per topic, never a stuck topic; a stale
//! registration or a late answer costs at most a fetch with nothing new. Woken topics are
//! told only to a follower's newest poll: a superseded poll answers with nothing, and a
//! second delivery of a poll (each is numbered; the simulator's network duplicates messages)
//! is refused, which wakes everything parked on the session, because its follower may take
//! the refusal for the first delivery's answer and never see the one that names the topics.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::types::{Epoch, Index, ServerId, TopicId};

/// Where a parked follower stands in one topic: it is woken once the leader has entries past
/// `from` or a commit point past `known_commit`, or no longer leads `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedFetch {
    pub topic: TopicId,
    pub epoch: Epoch,
    pub from: Index,
    pub known_commit: Index,
}

/// One follower server's woken topics not yet told, and its latest poll.
#[derive(Debug, Default)]
struct Waiting {
    woken: BTreeSet<TopicId>,
    /// The held poll (this book's number for it).
    poll: u64,
    /// The follower's number of the last poll it sent here, to know a second delivery.
    last_sent: Option<u64>,
}

/// The leader server's side: who is parked on which topic, and who was woken.
#[derive(Debug, Default)]
pub struct ParkBook {
    parked: HashMap<TopicId, HashMap<ServerId, ParkedFetch>>,
    followers: HashMap<ServerId, Waiting>,
    polls: u64,
}

impl ParkBook {
    /// Follower `from` parks `fetch`; `news`: whether the topic has news for it already (or
    /// is not led here in its epoch), which wakes it at once. True when it woke.
    pub fn park(&mut self, from: ServerId, fetch: ParkedFetch, news: bool) -> bool {
        if news {
            self.followers.entry(from).or_default().woken.insert(fetch.topic);
        } else {
            self.parked.entry(fetch.topic).or_default().insert(from, fetch);
        }
        news
    }

    /// `topic` changed here: wakes the followers parked on it that `news` says have news.
    /// Returns them (their polls should look).
    pub fn on_change(&mut self, topic: TopicId, news: impl Fn(&ParkedFetch) -> bool) -> Vec<ServerId> {
        let Some(parked) = self.parked.get_mut(&topic) else { return Vec::new() };
        let woken: Vec<ServerId> = parked.iter().filter(|(_, p)| news(p)).map(|(s, _)| *s).collect();
        for s in &woken {
            parked.remove(s);
            self.followers.entry(*s).or_default().woken.insert(topic);
        }
        if parked.is_empty() {
            self.parked.remove(&topic);
        }
        woken
    }

    /// Wakes every follower parked on `topic` (its assignment here changed, or it is gone).
    pub fn wake_topic(&mut self, topic: TopicId) -> Vec<ServerId> {
        self.on_change(topic, |_| true)
    }

    /// A new poll of `from`, its number `sent` (the follower's): it supersedes the one held
    /// before (which answers at once, with nothing). `None` when it is a second delivery of
    /// the last poll: refuse it (an error, so its follower wakes everything parked here) and
    /// park nothing it carries (the first delivery did).
    pub fn hold(&mut self, from: ServerId, sent: u64) -> Option<u64> {
        let w = self.followers.entry(from).or_default();
        if w.last_sent == Some(sent) {
            return None;
        }
        w.last_sent = Some(sent);
        self.polls += 1;
        w.poll = self.polls;
        Some(self.polls)
    }

    /// Whether poll `poll` of `from` answers now, and with which topics: those woken (taken),
    /// or none once it is `expired`; a superseded poll answers at once with none (the woken
    /// topics wait for the newest poll).
    pub fn answer(&mut self, from: ServerId, poll: u64, expired: bool) -> Option<Vec<TopicId>> {
        let w = self.followers.entry(from).or_default();
        if w.poll != poll {
            return Some(Vec::new());
        }
        if !w.woken.is_empty() {
            return Some(std::mem::take(&mut w.woken).into_iter().collect());
        }
        expired.then(Vec::new)
    }

    /// How many fetches are parked here, over all topics and followers.
    pub fn len(&self) -> usize {
        self.parked.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }
}

/// Polls a follower keeps out per leader: the one held and one carrying new registrations
/// (which supersedes it).
pub const MAX_POLLS_IN_FLIGHT: usize = 2;

/// One leader server's session, on the follower's side.
#[derive(Debug)]
struct Session<W> {
    /// Each parked topic's waker (what its fetch loop waits on).
    parked: HashMap<TopicId, W>,
    /// Parked since the last poll was sent.
    unsent: Vec<ParkedFetch>,
    in_flight: usize,
}

/// What a session does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Send poll number `poll` with these new registrations (maybe none: a poll must be held
    /// while anything is parked).
    Send { poll: u64, parked: Vec<ParkedFetch> },
    /// A poll is held and nothing new is parked.
    Wait,
    /// Nothing is parked or in flight: the session ends.
    Done,
}

/// The follower server's side: its parked topics, by leader server.
#[derive(Debug)]
pub struct ParkLot<W> {
    sessions: HashMap<ServerId, Session<W>>,
    leader_of: HashMap<TopicId, ServerId>,
    /// The number of the last poll sent.
    polls: u64,
}

impl<W> ParkLot<W> {
    /// A lot whose polls are numbered after `first` (a random start, so that a restarted
    /// follower's first poll is not taken for a second delivery of its predecessor's last).
    pub fn numbered_from(first: u64) -> Self {
        Self { sessions: HashMap::new(), leader_of: HashMap::new(), polls: first }
    }

    /// Parks `fetch` on `leader`'s session, to be woken through `waker`. True when that
    /// session was not running (the caller starts it).
    pub fn park(&mut self, leader: ServerId, fetch: ParkedFetch, waker: W) -> bool {
        self.unpark(fetch.topic);
        self.leader_of.insert(fetch.topic, leader);
        let started = self.sessions.contains_key(&leader);
        let s = self.sessions.entry(leader).or_insert_with(|| Session {
            parked: HashMap::new(),
            unsent: Vec::new(),
            in_flight: 0,
        });
        s.parked.insert(fetch.topic, waker);
        s.unsent.push(fetch);
        !started
    }

    /// Forgets `topic` (its fetch loop ended); its waker, if it was parked.
    pub fn unpark(&mut self, topic: TopicId) -> Option<W> {
        let leader = self.leader_of.remove(&topic)?;
        self.sessions.get_mut(&leader)?.parked.remove(&topic)
    }

    /// What `leader`'s session does next; `Send` counts a poll in flight. New registrations
    /// go at once while fewer than `MAX_POLLS_IN_FLIGHT` polls are out, else with the next
    /// (thousands of topics parking together make a few polls, not one each).
    pub fn next(&mut self, leader: ServerId) -> Next {
        let Some(s) = self.sessions.get_mut(&leader) else { return Next::Done };
        let room = s.in_flight < MAX_POLLS_IN_FLIGHT;
        if (room && !s.unsent.is_empty()) || (s.in_flight == 0 && !s.parked.is_empty()) {
            s.in_flight += 1;
            self.polls = self.polls.wrapping_add(1);
            return Next::Send { poll: self.polls, parked: std::mem::take(&mut s.unsent) };
        }
        if s.in_flight > 0 {
            return Next::Wait;
        }
        self.sessions.remove(&leader);
        Next::Done
    }

    /// A poll to `leader` answered with `woken`: the wakers of those still parked.
    pub fn answered(&mut self, leader: ServerId, woken: &[TopicId]) -> Vec<W> {
        let Some(s) = self.sessions.get_mut(&leader) else { return Vec::new() };
        s.in_flight = s.in_flight.saturating_sub(1);
        let wakers: Vec<W> = woken.iter().filter_map(|t| s.parked.remove(t)).collect();
        for t in woken {
            if self.leader_of.get(t) == Some(&leader) {
                self.leader_of.remove(t);
            }
        }
        wakers
    }

    /// A poll to `leader` failed (or timed out): every topic parked on it wakes, since the
    /// leader may have lost their registrations or an answer naming them.
    pub fn failed(&mut self, leader: ServerId) -> Vec<W> {
        let Some(s) = self.sessions.get_mut(&leader) else { return Vec::new() };
        s.in_flight = s.in_flight.saturating_sub(1);
        s.unsent.clear();
        let woken: Vec<(TopicId, W)> = s.parked.drain().collect();
        for (t, _) in &woken {
            self.leader_of.remove(t);
        }
        woken.into_iter().map(|(_, w)| w).collect()
    }

    /// The leaders with a session.
    pub fn leaders(&self) -> Vec<ServerId> {
        self.sessions.keys().copied().collect()
    }

    /// Whether `topic` is parked.
    #[cfg(test)]
    pub fn is_parked(&self, topic: TopicId) -> bool {
        self.leader_of.contains_key(&topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(topic: TopicId, from: Index) -> ParkedFetch {
        ParkedFetch { topic, epoch: 1, from, known_commit: from }
    }

    #[test]
    fn a_leader_wakes_only_followers_with_news_and_tells_each_once() {
        let mut book = ParkBook::default();
        assert!(!book.park(2, at(7, 10), false));
        assert!(!book.park(3, at(7, 12), false));
        let poll = book.hold(2, 40).unwrap();
        assert_eq!(book.answer(2, poll, false), None, "held while nothing happened");
        // Entries up to 12 exist now: news for the follower at 10 only.
        assert_eq!(book.on_change(7, |p| p.from < 12), vec![2]);
        assert_eq!(book.answer(2, poll, false), Some(vec![7]));
        assert_eq!(book.answer(2, poll, true), Some(vec![]), "told once");
        assert_eq!(book.len(), 1);
        assert_eq!(book.wake_topic(7), vec![3]);
        assert!(book.is_empty());
    }

    #[test]
    fn a_new_poll_supersedes_the_held_one_and_news_at_parking_wakes_at_once() {
        let mut book = ParkBook::default();
        let first = book.hold(2, 40).unwrap();
        let second = book.hold(2, 41).unwrap();
        assert_eq!(book.answer(2, first, false), Some(vec![]), "superseded");
        assert_eq!(book.answer(2, second, false), None);
        assert!(book.park(2, at(9, 4), true));
        assert_eq!(book.answer(2, second, false), Some(vec![9]));
        assert!(book.is_empty(), "a woken fetch is not kept");
    }

    #[test]
    fn woken_topics_go_only_to_the_newest_poll_and_a_second_delivery_holds_nothing() {
        let mut book = ParkBook::default();
        book.park(2, at(7, 10), false);
        let first = book.hold(2, 40).unwrap();
        // The same poll delivered again (simulator seed 995402): held once, the copy refused.
        assert_eq!(book.hold(2, 40), None, "a second delivery is refused");
        assert_eq!(book.answer(2, first, false), None, "the first delivery is still held");
        // The follower took the refusal for its poll's answer, woke its topics, parked again.
        let second = book.hold(2, 41).unwrap();
        assert_eq!(book.on_change(7, |_| true), vec![2]);
        assert_eq!(book.answer(2, first, false), Some(vec![]), "superseded: nothing is taken");
        assert_eq!(book.answer(2, second, false), Some(vec![7]), "the newest poll is told");
    }

    #[test]
    fn a_follower_keeps_one_poll_while_anything_is_parked_and_ends_the_session_after() {
        let mut lot = ParkLot::numbered_from(0);
        assert!(lot.park(1, at(5, 0), "five"), "the first parked topic starts the session");
        assert!(!lot.park(1, at(6, 0), "six"));
        assert_eq!(lot.next(1), Next::Send { poll: 1, parked: vec![at(5, 0), at(6, 0)] });
        assert_eq!(lot.next(1), Next::Wait);
        assert!(!lot.park(1, at(8, 0), "eight"));
        assert_eq!(
            lot.next(1),
            Next::Send { poll: 2, parked: vec![at(8, 0)] },
            "new registrations go at once"
        );
        lot.park(1, at(9, 0), "nine");
        assert_eq!(lot.next(1), Next::Wait, "two polls out: the next registrations wait");
        assert_eq!(lot.answered(1, &[]), Vec::<&str>::new(), "the superseded poll");
        assert_eq!(lot.next(1), Next::Send { poll: 3, parked: vec![at(9, 0)] }, "and go with the next poll");
        assert_eq!(lot.answered(1, &[]), Vec::<&str>::new());
        assert_eq!(lot.answered(1, &[6, 99]), vec!["six"], "unknown topics are ignored");
        assert!(!lot.is_parked(6) && lot.is_parked(5));
        assert_eq!(lot.next(1), Next::Send { poll: 4, parked: vec![] }, "a poll is held again");
        let mut woken = lot.failed(1);
        woken.sort();
        assert_eq!(woken, vec!["eight", "five", "nine"], "a failed poll wakes everything parked");
        assert_eq!(lot.next(1), Next::Done);
        assert_eq!(lot.next(1), Next::Done);
    }

    #[test]
    fn a_topic_parks_on_one_leader_at_a_time_and_unparking_forgets_it() {
        let mut lot = ParkLot::numbered_from(0);
        lot.park(1, at(5, 0), 'a');
        assert!(lot.park(2, at(5, 3), 'b'), "its new leader's session starts");
        assert_eq!(lot.next(1), Next::Send { poll: 1, parked: vec![at(5, 0)] });
        assert_eq!(lot.answered(1, &[5]), vec![], "no longer parked on leader 1");
        assert!(lot.is_parked(5));
        assert_eq!(lot.unpark(5), Some('b'));
        assert_eq!(lot.unpark(5), None);
        assert_eq!(lot.next(1), Next::Done);
    }
}
