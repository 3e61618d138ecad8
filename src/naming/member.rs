//! One member of the naming group, without I/O: its Raft node, the book as committed, and,
//! while it leads, the naming core that decides.
//!
//! Only the leader decides, and it decides one change at a time: a change is proposed,
//! and the next decision waits until it committed and was applied, so every decision sees
//! every earlier one (two `topic create t` cannot both succeed, an election cannot start
//! twice). Nobody hears of a change before it committed: answers, promise requests and the
//! assignments in heartbeat answers all come from the committed book. A leader that loses
//! its term drops its core (elections under way, leases heard) and fails what waited; the
//! next leader builds a new core from the book, with the restart grace of
//! [`Settings::grace_ms`], and finishes or redoes any election the book shows unfinished.
//! Epochs stay strictly increasing across leaders because the book records every epoch an
//! election used before any voter is asked to promise it.
//!
//! The driver (`naming::run`) and the simulator feed it ticks, Raft messages, requests,
//! heartbeats and promise answers, and carry what comes out ([`Effects`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use raft::eraftpb::Message;

use super::book::{AclChange, Book, BookChange};
use super::core::{NamingCore, PromiseAsk, Settings, Step};
use super::raft::{BookNode, Committed, GroupError, GroupSettings, RaftLog};
use crate::error::Error;
use crate::types::{Epoch, Index, ServerId, TopicId, TopicName};
use crate::wire::{LeaderMove, MemberRole, MemberStatus, Reports, TopicChanges, TopicConfig};

/// Applied changes between two snapshots of the book: the log stays small, and a member
/// that was away catches up from a snapshot and at most this many entries.
pub const COMPACT_EVERY: u64 = 1_000;

/// Topic servers whose pings a member keeps at most (only registered servers count with
/// the core; this bounds what unregistered ids can make a follower keep).
pub const MAX_HEARD: usize = 4_096;

/// Requests waiting for the leader's decision at most; beyond, new ones are refused as
/// unavailable (retried by clients) rather than held without bound.
pub const MAX_QUEUED: usize = 1_024;

/// A request that changes the book.
#[derive(Debug, Clone)]
pub enum Admin {
    Register {
        server: ServerId,
        addr: SocketAddr,
    },
    /// New topics, all or none, in one change.
    CreateTopics {
        names: Vec<TopicName>,
        replicas: u32,
        config: TopicConfig,
        wall_ms: u64,
    },
    AlterTopic {
        name: TopicName,
        changes: TopicChanges,
    },
    /// Topics deleted, all or none, in one change.
    DeleteTopics {
        names: Vec<TopicName>,
    },
    /// Hands topics back to their preferred leaders now.
    Rebalance,
    ChangeAcl {
        change: AclChange,
    },
    RetireServer {
        server: ServerId,
    },
}

/// How an [`Admin`] request ended, once its change (if any) committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Registered {
        cluster: u64,
    },
    /// The topics' change is in the committed book from `version` on.
    TopicsChanged {
        names: Vec<TopicName>,
        version: u64,
    },
    Deleted,
    AclChanged,
    /// The elections of these moves (those not skipped) are started.
    Rebalanced(Vec<LeaderMove>),
}

/// What one call produced, for the driver to carry.
#[derive(Debug)]
pub struct Effects<R> {
    /// Raft messages for the other members.
    pub messages: Vec<Message>,
    /// Answers to [`Admin`] requests.
    pub replies: Vec<(R, Result<Done, Error>)>,
    /// Promise requests of elections whose epoch committed.
    pub asks: Vec<PromiseAsk>,
    /// Lines for the log.
    pub notes: Vec<String>,
    /// Topic leaders elected.
    pub elected: u64,
}

impl<R> Default for Effects<R> {
    fn default() -> Self {
        Self { messages: Vec::new(), replies: Vec::new(), asks: Vec::new(), notes: Vec::new(), elected: 0 }
    }
}

/// The one change proposed and not yet applied.
struct InFlight<R> {
    index: u64,
    term: u64,
    reply: Option<(R, Done)>,
    asks: Vec<PromiseAsk>,
    notes: Vec<String>,
    elected: u64,
}

/// One member of the naming group.
pub struct NamingMember<R> {
    node: BookNode,
    /// Every member's address, for redirects.
    peers: BTreeMap<u64, SocketAddr>,
    book: Book,
    settings: Settings,
    /// The leader's decisions; `None` on followers and on a leader not caught up yet.
    core: Option<NamingCore>,
    queue: VecDeque<(Admin, R)>,
    in_flight: Option<InFlight<R>>,
    /// The core's periodic decisions are due (they wait while a change is in flight).
    decide_due: bool,
    /// A cluster id for the book, if this member is the first to lead it.
    cluster_candidate: u64,
    /// When each topic server was last heard from, whatever this member's role: a member
    /// that becomes leader starts its core with it.
    heard: BTreeMap<ServerId, u64>,
    applied_since_compact: u64,
    /// [`GroupSettings::compact_every`].
    compact_every: u64,
}

impl<R> NamingMember<R> {
    /// Opens member `id` of the group `peers` on `log`; its book is the log's snapshot (the
    /// entries after it come back from the first [`tick`](Self::tick) as committed).
    /// `cluster_candidate` (non-zero) names the cluster if this member is the first leader.
    pub fn open(
        id: u64,
        peers: BTreeMap<u64, SocketAddr>,
        log: RaftLog,
        group: GroupSettings,
        settings: Settings,
        cluster_candidate: u64,
    ) -> Result<Self, GroupError> {
        let snapshot = log.snapshot_now();
        let book = if snapshot.data.is_empty() {
            empty_book()
        } else {
            Book::decode(&snapshot.data).map_err(|e| GroupError::Corrupt(e.to_string()))?
        };
        let ids: Vec<u64> = peers.keys().copied().collect();
        let mut node = BookNode::open(id, &ids, log, group)?;
        if ids == [id] {
            node.campaign()?; // alone: no one to wait for
        }
        Ok(Self {
            node,
            peers,
            book,
            settings,
            core: None,
            queue: VecDeque::new(),
            in_flight: None,
            decide_due: false,
            cluster_candidate: cluster_candidate.max(1),
            heard: BTreeMap::new(),
            applied_since_compact: 0,
            compact_every: group.compact_every.max(1),
        })
    }

    pub fn id(&self) -> u64 {
        self.node.id()
    }

    /// The committed book.
    pub fn book(&self) -> &Book {
        &self.book
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The core, while this member leads and is caught up.
    pub fn core(&self) -> Option<&NamingCore> {
        self.core.as_ref()
    }

    /// The core, or the redirect to give a client.
    pub fn serving(&self) -> Result<&NamingCore, Error> {
        self.core.as_ref().ok_or_else(|| self.not_leader())
    }

    fn not_leader(&self) -> Error {
        let leader = self.node.leader().filter(|l| *l != self.id());
        Error::NamingNotLeader { member: self.id(), leader: leader.and_then(|l| self.peers.get(&l).copied()) }
    }

    /// What `herald naming status` shows of this member.
    pub fn status(&self) -> MemberStatus {
        let (last_index, applied) = self.node.indexes();
        let role = if self.core.is_some() {
            MemberRole::Leader
        } else if self.node.is_leader() {
            MemberRole::Candidate
        } else if self.node.leader().is_some() {
            MemberRole::Follower
        } else {
            MemberRole::Candidate
        };
        MemberStatus {
            id: self.id(),
            role,
            term: self.node.term(),
            last_index,
            applied,
            leader: self.node.leader(),
            book_version: self.book.version,
            rebuilding: self.node.rebuilding(),
        }
    }

    /// One tick of the group's clock ([`super::raft::TICK_MS`]), and the core's periodic
    /// decisions.
    pub fn tick(&mut self, now_ms: u64) -> Result<Effects<R>, GroupError> {
        self.node.tick();
        self.decide_due = true;
        self.pump(now_ms)
    }

    /// Whether this member's Raft log is empty; sent along with its messages so a leader
    /// can tell a member whose data directory was lost.
    pub fn log_is_empty(&self) -> bool {
        self.node.log_is_empty()
    }

    /// A Raft message from another member (`sender_empty`: its log is empty).
    pub fn step(
        &mut self,
        now_ms: u64,
        message: Message,
        sender_empty: bool,
    ) -> Result<Effects<R>, GroupError> {
        if sender_empty {
            self.node.rebuild(message.from);
        }
        if let Err(e) = self.node.step(message) {
            tracing::debug!(error = %e, "raft message dropped");
        }
        self.pump(now_ms)
    }

    /// The driver could not deliver Raft messages to member `to` (`snapshot`: one of them
    /// was a snapshot); see [`BookNode::undelivered`].
    pub fn undelivered(&mut self, now_ms: u64, to: u64, snapshot: bool) -> Result<Effects<R>, GroupError> {
        self.node.undelivered(to, snapshot);
        self.pump(now_ms)
    }

    /// A request that changes the book; its answer comes back in some later [`Effects`].
    pub fn submit(&mut self, now_ms: u64, admin: Admin, reply: R) -> Result<Effects<R>, GroupError> {
        if self.core.is_none() {
            let mut fx = Effects::default();
            fx.replies.push((reply, Err(self.not_leader())));
            return Ok(fx);
        }
        if self.queue.len() >= MAX_QUEUED {
            let mut fx = Effects::default();
            let detail = format!("{MAX_QUEUED} book changes are waiting already; try again");
            fx.replies.push((reply, Err(Error::Unavailable { detail })));
            return Ok(fx);
        }
        self.queue.push_back((admin, reply));
        self.pump(now_ms)
    }

    /// A topic server's liveness ping (any member).
    pub fn alive(&mut self, now_ms: u64, server: ServerId) {
        self.heard_from(now_ms, server);
        if let Some(core) = self.core.as_mut() {
            core.alive(now_ms, server);
        }
    }

    fn heard_from(&mut self, now_ms: u64, server: ServerId) {
        if self.heard.len() < MAX_HEARD || self.heard.contains_key(&server) {
            self.heard.insert(server, now_ms);
        }
    }

    /// A topic server's heartbeat (leader only).
    pub fn heartbeat(
        &mut self,
        now_ms: u64,
        server: ServerId,
        applied_version: u64,
        reports: Reports,
    ) -> Result<(), Error> {
        self.heard_from(now_ms, server); // the core's own heartbeat renews its lease
        let not_leader = self.not_leader();
        self.core.as_mut().ok_or(not_leader)?.heartbeat(now_ms, server, applied_version, reports)
    }

    /// A voter's answer to a promise request (`None`: it failed or timed out).
    pub fn on_promise(
        &mut self,
        now_ms: u64,
        topic: TopicId,
        epoch: Epoch,
        server: ServerId,
        answer: Option<(Epoch, Index)>,
    ) {
        if let Some(core) = self.core.as_mut() {
            core.on_promise(now_ms, topic, epoch, server, answer);
        }
    }

    /// Advances Raft, applies what committed and proposes the next decision, until nothing
    /// is left to do.
    fn pump(&mut self, now_ms: u64) -> Result<Effects<R>, GroupError> {
        let mut fx = Effects::default();
        loop {
            let out = self.node.advance()?;
            fx.messages.extend(out.messages);
            if let Some((_, data)) = out.snapshot {
                self.book = Book::decode(&data).map_err(|e| GroupError::Corrupt(e.to_string()))?;
                self.core = None;
            }
            for c in out.committed {
                self.apply(c, &mut fx)?;
            }
            self.follow_role(now_ms, &mut fx);
            if self.in_flight.is_some() || self.core.is_none() || !self.propose_next(now_ms, &mut fx)? {
                return Ok(fx);
            }
        }
    }

    fn apply(&mut self, c: Committed, fx: &mut Effects<R>) -> Result<(), GroupError> {
        self.book.apply(&c.change);
        if let Some(core) = self.core.as_mut() {
            core.apply(&c.change);
        }
        if self.in_flight.as_ref().is_some_and(|f| f.index == c.index) {
            let f = self.in_flight.take().expect("in flight");
            if f.term == c.term {
                fx.replies.extend(f.reply.map(|(r, done)| (r, Ok(done))));
                fx.asks.extend(f.asks);
                fx.notes.extend(f.notes);
                fx.elected += f.elected;
            } else {
                self.fail_in_flight(Some(f), fx);
            }
        }
        self.applied_since_compact += 1;
        if self.applied_since_compact >= self.compact_every {
            self.node.compact(postcard::to_stdvec(&self.book).expect("the book encodes"))?;
            self.applied_since_compact = 0;
        }
        Ok(())
    }

    /// Builds the core when this member becomes a caught-up leader, drops it when it stops
    /// leading.
    fn follow_role(&mut self, now_ms: u64, fx: &mut Effects<R>) {
        let ready = self.node.leader_ready();
        if ready && self.core.is_none() {
            self.core = Some(NamingCore::with_heard(self.book.clone(), self.settings, now_ms, &self.heard));
            fx.notes.push(format!(
                "naming member {} leads the group in term {} (book version {})",
                self.id(),
                self.node.term(),
                self.book.version
            ));
        } else if !ready && self.core.is_some() {
            self.core = None;
            fx.notes.push(format!("naming member {} no longer leads", self.id()));
            let lost = self.in_flight.take();
            self.fail_in_flight(lost, fx);
            let error = self.not_leader();
            fx.replies.extend(self.queue.drain(..).map(|(_, r)| (r, Err(error.clone()))));
        }
    }

    /// A proposal that did not commit in its term: whether it took effect is unknown to the
    /// caller (a later leader may still commit it).
    fn fail_in_flight(&self, lost: Option<InFlight<R>>, fx: &mut Effects<R>) {
        if let Some((reply, _)) = lost.and_then(|f| f.reply) {
            let detail = "the naming leader changed while this change was being committed; it may or may not have been made: look before trying again".to_string();
            fx.replies.push((reply, Err(Error::Unavailable { detail })));
        }
    }

    /// Decides and proposes the next change, if any; returns whether it proposed one.
    fn propose_next(&mut self, now_ms: u64, fx: &mut Effects<R>) -> Result<bool, GroupError> {
        if self.book.cluster_id == 0 {
            let change = BookChange { cluster_id: Some(self.cluster_candidate), ..BookChange::default() };
            return self.propose(fx, change, None, Vec::new(), Vec::new(), 0);
        }
        if self.decide_due {
            self.decide_due = false;
            let steps = self.core.as_mut().expect("leading").tick(now_ms);
            let (change, asks, notes, elected) = merge(steps, &mut fx.notes);
            if change != BookChange::default() {
                return self.propose(fx, change, None, asks, notes, elected);
            }
        }
        while let Some((admin, reply)) = self.queue.pop_front() {
            let core = self.core.as_mut().expect("leading");
            let decided = match admin {
                Admin::Register { server, addr } => match core.register(now_ms, server, addr) {
                    Some(change) => Ok((change, Done::Registered { cluster: self.book.cluster_id })),
                    None => {
                        fx.replies.push((reply, Ok(Done::Registered { cluster: self.book.cluster_id })));
                        continue;
                    }
                },
                Admin::CreateTopics { names, replicas, config, wall_ms } => core
                    .create_topics(now_ms, wall_ms, names.clone(), replicas, config)
                    .map(|c| (c, Done::TopicsChanged { names, version: self.book.version + 1 })),
                Admin::AlterTopic { name, changes } => core
                    .alter_topic(&name, changes)
                    .map(|c| (c, Done::TopicsChanged { names: vec![name], version: self.book.version + 1 })),
                Admin::DeleteTopics { names } => core.delete_topics(&names).map(|c| (c, Done::Deleted)),
                Admin::Rebalance => {
                    let (steps, moves) = core.rebalance(now_ms);
                    let (change, asks, notes, elected) = merge(steps, &mut fx.notes);
                    if change == BookChange::default() {
                        fx.replies.push((reply, Ok(Done::Rebalanced(moves))));
                        continue;
                    }
                    return self.propose(
                        fx,
                        change,
                        Some((reply, Done::Rebalanced(moves))),
                        asks,
                        notes,
                        elected,
                    );
                }
                Admin::ChangeAcl { change } => core.change_acl(change).map(|c| (c, Done::AclChanged)),
                Admin::RetireServer { server } => {
                    core.retire_server(now_ms, server).map(|c| (c, Done::Deleted))
                }
            };
            match decided {
                Ok((change, done)) => {
                    return self.propose(fx, change, Some((reply, done)), vec![], vec![], 0)
                }
                Err(e) => fx.replies.push((reply, Err(e))),
            }
        }
        Ok(false)
    }

    fn propose(
        &mut self,
        fx: &mut Effects<R>,
        change: BookChange,
        reply: Option<(R, Done)>,
        asks: Vec<PromiseAsk>,
        notes: Vec<String>,
        elected: u64,
    ) -> Result<bool, GroupError> {
        match self.node.propose_at(&change) {
            Ok((index, term)) => {
                self.in_flight = Some(InFlight { index, term, reply, asks, notes, elected });
                Ok(true)
            }
            Err(GroupError::NotLeader { .. }) => {
                // Stepped down since the last advance: the next `follow_role` drops the core.
                fx.replies.extend(reply.map(|(r, _)| (r, Err(self.not_leader()))));
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// The core's steps as one change, with their promise requests, notes and elections; the
/// notes of steps that change nothing go to `notes_now`.
fn merge(steps: Vec<Step>, notes_now: &mut Vec<String>) -> (BookChange, Vec<PromiseAsk>, Vec<String>, u64) {
    let mut change = BookChange::default();
    let (mut asks, mut notes, mut elected) = (Vec::new(), Vec::new(), 0);
    for step in steps {
        match step.change {
            Some(c) => {
                change.topics.extend(c.topics);
                change.servers.extend(c.servers);
                change.removed.extend(c.removed);
                asks.extend(step.asks);
                notes.push(step.note);
                elected += u64::from(step.elected);
            }
            None => notes_now.push(step.note),
        }
    }
    (change, asks, notes, elected)
}

/// The book of a group that never committed anything.
pub fn empty_book() -> Book {
    Book { next_topic_id: 1, ..Book::default() }
}

#[cfg(test)]
mod tests;
