//! Parked fetches over QUIC (the rules are [`crate::replication::park`]'s): a follower server
//! runs one session task per leader server while any topic is parked on it; a leader server
//! holds each follower server's latest poll until one of its parked topics has news.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;
use tracing::debug;

use super::{Node, Replica};
use crate::error::Error;
use crate::replication::{Next, ParkBook, ParkLot, ParkedFetch};
use crate::storage::LogState;
use crate::types::{ServerId, TopicId};
use crate::wire::{Request, Response};

/// How long a leader holds a poll when none of its parked topics has news: an idle server
/// pair exchanges one poll per this, however many topics it shares.
pub const PARK_WAIT: Duration = Duration::from_secs(30);

/// How long past [`PARK_WAIT`] a follower waits for a poll's answer before it takes the poll
/// for lost and wakes every topic parked on it (a leader that stopped without closing its
/// connection).
const PARK_ANSWER_GRACE: Duration = Duration::from_secs(5);

/// Both sides of parking on one server.
pub struct Parking {
    /// Leader side: who is parked here.
    book: Mutex<ParkBook>,
    /// Follower side: what this server parked, by leader; each topic waits on its sender.
    lot: Mutex<ParkLot<oneshot::Sender<()>>>,
    /// Leader side: wakes held polls (a follower was woken, or a newer poll arrived).
    polls: Notify,
    /// Follower side: wakes session tasks (a topic parked).
    parked: Notify,
}

impl Default for Parking {
    fn default() -> Self {
        Self {
            book: Mutex::default(),
            lot: Mutex::new(ParkLot::numbered_from(fastrand::u64(..))),
            polls: Notify::new(),
            parked: Notify::new(),
        }
    }
}

impl Parking {
    /// Follower: parks `fetch` on `leader` (at `addr`) and waits until it is woken (news, a
    /// failed session, or [`unpark`](Self::unpark)).
    pub async fn park(node: &Arc<Node>, leader: ServerId, addr: SocketAddr, fetch: ParkedFetch) {
        let (tx, rx) = oneshot::channel();
        let start = node.parking.lot.lock().expect("lot lock").park(leader, fetch, tx);
        if start {
            tokio::spawn(session(node.clone(), leader, addr));
        } else {
            node.parking.parked.notify_waiters();
        }
        let _ = rx.await;
    }

    /// Follower: `topic`'s fetch loop ends (a new assignment); what it parked is forgotten.
    pub fn unpark(&self, topic: TopicId) {
        self.lot.lock().expect("lot lock").unpark(topic);
    }

    /// Leader: whether `state` is news for a follower parked at `fetch`.
    pub fn news(state: &LogState, fetch: &ParkedFetch) -> bool {
        state.leading != Some(fetch.epoch) || Replica::has_news(state, fetch.from, fetch.known_commit)
    }

    /// Leader: starts `follower`'s poll number `sent`, which supersedes the one held before,
    /// and registers what it parked (`state_of`: each topic's state here, `None` if not
    /// hosted). `None` for a second delivery of its last poll (refuse it: see
    /// [`ParkBook::hold`]).
    pub fn hold(
        &self,
        follower: ServerId,
        sent: u64,
        fetches: Vec<ParkedFetch>,
        state_of: impl Fn(TopicId) -> Option<LogState>,
    ) -> Option<u64> {
        let poll = {
            let mut book = self.book.lock().expect("book lock");
            let poll = book.hold(follower, sent)?;
            for f in fetches {
                let news = state_of(f.topic).is_none_or(|s| Self::news(&s, &f));
                book.park(follower, f, news);
            }
            poll
        };
        self.polls.notify_waiters();
        Some(poll)
    }

    /// Leader: the refusal of a second delivery of poll number `sent`.
    pub fn repeated(sent: u64) -> Error {
        Error::invalid(format!("park poll {sent} came twice; its follower should wake its parked topics"))
    }

    /// Leader: waits for poll `poll` of `follower` to answer: the topics woken for it, or
    /// none once superseded or after `max_wait` (at most [`PARK_WAIT`]).
    pub async fn answer(&self, follower: ServerId, poll: u64, max_wait: Duration) -> Vec<TopicId> {
        let deadline = tokio::time::Instant::now() + max_wait.min(PARK_WAIT);
        loop {
            let notified = self.polls.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(woken) = self.book.lock().expect("book lock").answer(follower, poll, false) {
                return woken;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let mut book = self.book.lock().expect("book lock");
                return book.answer(follower, poll, true).unwrap_or_default();
            }
        }
    }

    /// Leader: `topic`'s state changed; wakes the followers it is news for.
    pub fn on_change(&self, topic: TopicId, state: &LogState) {
        let woken = self.book.lock().expect("book lock").on_change(topic, |f| Self::news(state, f));
        if !woken.is_empty() {
            self.polls.notify_waiters();
        }
    }

    /// Leader: wakes every follower parked on `topic` (its assignment changed, or it left).
    pub fn wake_topic(&self, topic: TopicId) {
        if !self.book.lock().expect("book lock").wake_topic(topic).is_empty() {
            self.polls.notify_waiters();
        }
    }

    /// Leader: how many fetches are parked here (a metric).
    pub fn parked_here(&self) -> usize {
        self.book.lock().expect("book lock").len()
    }
}

/// Follower: keeps a poll held at `leader` while anything is parked on it, sends new
/// registrations at once, and wakes what the answers name (everything, when a poll fails).
async fn session(node: Arc<Node>, leader: ServerId, addr: SocketAddr) {
    let mut polls = JoinSet::new();
    loop {
        let parked = node.parking.parked.notified();
        tokio::pin!(parked);
        parked.as_mut().enable();
        let next = node.parking.lot.lock().expect("lot lock").next(leader);
        match next {
            Next::Send { poll: number, parked } => {
                polls.spawn(poll(node.clone(), addr, number, parked));
                continue;
            }
            Next::Done => return,
            Next::Wait => {}
        }
        tokio::select! {
            Some(answer) = polls.join_next() => {
                let answer = answer.unwrap_or_else(|e| Err(Error::internal(e)));
                let mut lot = node.parking.lot.lock().expect("lot lock");
                let wakers = match answer {
                    Ok(woken) => lot.answered(leader, &woken),
                    Err(e) => {
                        debug!(leader, error = %e, "park poll failed; waking its topics");
                        lot.failed(leader)
                    }
                };
                drop(lot);
                for w in wakers {
                    let _ = w.send(());
                }
            }
            _ = &mut parked => {}
        }
    }
}

/// Poll number `number`: registers `fetches` and waits for the leader to name woken topics.
async fn poll(
    node: Arc<Node>,
    addr: SocketAddr,
    number: u64,
    fetches: Vec<ParkedFetch>,
) -> Result<Vec<TopicId>, Error> {
    let req = Request::Park {
        replica: node.id,
        poll: number,
        parked: fetches,
        max_wait_ms: PARK_WAIT.as_millis() as u32,
    };
    let call = node.call_peer(addr, &req);
    match tokio::time::timeout(PARK_WAIT + PARK_ANSWER_GRACE, call).await {
        Ok(Ok(Response::Woken(woken))) => Ok(woken),
        Ok(Ok(other)) => Err(Error::internal(format!("unexpected answer to Park: {other:?}"))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Unavailable { detail: "no answer to a park poll".into() }),
    }
}
