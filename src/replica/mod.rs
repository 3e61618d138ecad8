//! The replication driver: carries the [`crate::replication`] rules over QUIC.
//!
//! Every hosted topic is a [`Replica`]. Its role follows the naming server's assignment:
//! - **Leader**: answers followers' `ReplicaFetch` requests with entries read from redb (so
//!   a follower far behind costs no memory), and after every fetch (an acknowledgement) and
//!   every local commit recomputes the commit point; it asks storage to apply committed
//!   cursor entries. A producer's ack waits for its batch's entry to commit; a consumer's
//!   cursor move for its entry to be applied.
//! - **Follower**: one task keeps one long-lived stream to the leader and fetches in a loop:
//!   it writes what it gets durably (one group commit), then fetches again, which tells the
//!   leader what it now holds. Divergence and resets are applied as the rules say.
//! - **Deposed**: a leader that learned of a newer epoch (from a follower's fetch or the
//!   naming server's promise request) acknowledges nothing until it gets a new assignment.
//!
//! The decisions are synchronous methods ([`Replica::judge_fetch`], [`Replica::advance`],
//! [`Replica::follower_step`], [`Replica::ack_state`]) that the async tasks here and the
//! simulator (`crate::sim`) both call; the tasks only carry messages and wait.
//!
//! All topics of a pair of servers share one QUIC connection; each (topic, follower) has its
//! own stream on it. A topic with nothing new parks its fetch on the pair's one long poll
//! (`replica::park`, rules in [`crate::replication::ParkBook`]), so idle topics cost no round trips.

mod park;

pub use park::{Parking, PARK_WAIT};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::Endpoint;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::replication::{
    committed, truncation_point, AliveBook, FetchDecision, FetchRequest, Leader, LogView, ParkedFetch,
    ReplicaChunk, ReplicaReset, ShippedEntry,
};
use crate::storage::{LogState, Pending, Store, TopicLog};
use crate::transport::Pool;
use crate::types::{mono_ms, Epoch, Index, ServerId};
use crate::wire::{ReplicaAnswer, ReplicaInfo, ReplicaStatus, Request, Response, Role};

/// Most bytes of records one replica fetch carries.
pub const REPLICA_FETCH_BYTES: u32 = 4 * 1024 * 1024;
/// How long a leader holds a follower's fetch when there is nothing new; a fetch that comes
/// back with nothing then parks (see [`Parking`]), so an idle topic costs nothing after this.
/// News (entries, a commit point that moved, a new epoch) answers a held fetch at once. The
/// leader's contact with its followers comes from [`FOLLOWER_ALIVE_PER_LEASE`] meanwhile. A
/// fetch lost with its connection is asked again once QUIC gives the connection up
/// ([`IDLE_TIMEOUT`](crate::transport::IDLE_TIMEOUT)), not after the wait.
pub const REPLICA_FETCH_WAIT: Duration = Duration::from_secs(5);
/// Longest fetch wait a leader grants.
pub const MAX_REPLICA_FETCH_WAIT: Duration = Duration::from_secs(30);
/// How often, in leases, a follower tells each leader it follows topics from that it still
/// does, in one message for all of them: every half lease, so a leader hears from each
/// follower four times within its contact window (two leases; see
/// `server::LEADER_CONTACT_LEASES`) and one lost message costs nothing.
pub const FOLLOWER_ALIVE_PER_LEASE: u64 = 2;
/// The longest interval between them, whatever the lease (half the default lease).
pub const FOLLOWER_ALIVE_EVERY: Duration = Duration::from_millis(500);
/// How long a produce or an ack waits for its commit before answering `Unavailable`.
pub const COMMIT_WAIT: Duration = Duration::from_secs(15);
/// How long a consumer's request waits for a new leader to become ready (its epoch's first
/// entry committed: one round trip to a follower, normally).
pub const READY_WAIT: Duration = Duration::from_secs(5);
/// Committed entries a leader lets pile up before it applies them even without cursor
/// changes among them (which it applies at once): applying persists the applied index (the
/// commit point a restart starts from) and lets storage compact.
const APPLY_EVERY: Index = 256;

/// The naming server's word on one topic, as this server last applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub leader: ServerId,
    pub epoch: Epoch,
    pub voters: Vec<ReplicaInfo>,
    pub learners: Vec<ReplicaInfo>,
}

impl Assignment {
    /// What the naming server assigned in `info`.
    pub fn of(info: &crate::wire::TopicInfo) -> Self {
        Self {
            leader: info.leader,
            epoch: info.epoch,
            voters: info.replicas.clone(),
            learners: info.learners.clone(),
        }
    }

    /// The stored meta of a topic first hosted with this assignment.
    pub fn new_meta(&self, info: &crate::wire::TopicInfo) -> crate::storage::TopicMeta {
        crate::storage::TopicMeta::new(
            info.id,
            info.name.clone(),
            info.config.clone(),
            self.voter_ids(),
            self.learner_ids(),
            info.leader,
            info.epoch,
        )
    }

    pub fn voter_ids(&self) -> Vec<ServerId> {
        self.voters.iter().map(|r| r.server).collect()
    }

    pub fn learner_ids(&self) -> Vec<ServerId> {
        self.learners.iter().map(|r| r.server).collect()
    }

    pub fn leader_addr(&self) -> Option<SocketAddr> {
        self.voters.iter().find(|r| r.server == self.leader).map(|r| r.addr)
    }

    /// A topic that is its own majority.
    pub fn is_solo(&self) -> bool {
        self.voters.len() <= 1 && self.learners.is_empty()
    }
}

/// What this server is for one topic right now.
enum Part {
    Leader(Box<Leader>),
    Follower,
    Deposed,
}

/// What every replica of this server shares: identity, storage, connections to peers.
pub struct Node {
    pub id: ServerId,
    pub store: Store,
    /// Connections to the other servers (mutual TLS with the node certificate), one per
    /// server pair, shared by all topics.
    peers: Pool,
    /// What follower servers said of the topics this one leads (`FollowerAlive`).
    pub alive: Mutex<AliveBook>,
    /// Idle topics' fetches, parked here as leader or by this server as follower.
    pub parking: Parking,
}

impl Node {
    /// One request to another server, on the connection this server keeps to it.
    pub async fn call_peer(&self, addr: SocketAddr, req: &Request) -> Result<Response, Error> {
        self.peers.get(addr).await?.call(req).await?.into_result()
    }

    pub fn new(id: ServerId, store: Store, endpoint: Endpoint) -> Self {
        Self { id, store, peers: Pool::new(endpoint), alive: Mutex::default(), parking: Parking::default() }
    }
}

/// What a leader makes of a follower's fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    pub decision: FetchDecision,
    /// The leader's epoch.
    pub epoch: Epoch,
    /// Committed entries below this index wait to be applied ([`Store::commit`]).
    pub apply: Option<Index>,
}

/// What a follower does with the leader's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowerStep {
    /// Nothing new (an idle fetch's wait ran out): park the fetch (see [`Parking`]), with no write.
    Idle,
    Append(ReplicaChunk),
    Truncate(Index),
    Reset(ReplicaReset),
    /// The leader is deposed: wait for the naming server's next assignment.
    Fenced(Epoch),
}

/// How an acknowledgement stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckState {
    Done,
    Waiting,
    /// The entry was truncated: it will never commit here (the client retries at the leader).
    Failed,
}

fn view(state: &LogState) -> LogView<'_> {
    LogView { start_index: state.start_index, end_index: state.end_index, history: &state.history }
}

/// A leader's log as followers see it: including the group commit under way.
fn staged_view(state: &LogState) -> LogView<'_> {
    LogView { end_index: state.staged_end, ..view(state) }
}

/// One hosted topic and its replication role.
pub struct Replica {
    pub log: Arc<TopicLog>,
    me: ServerId,
    part: Mutex<Part>,
    assignment: watch::Sender<Assignment>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().expect("tasks lock").drain(..) {
            t.abort();
        }
    }
}

impl Replica {
    /// A replica that follows until [`apply`](Self::apply) gives it an assignment.
    pub fn new(log: Arc<TopicLog>, me: ServerId, assignment: Assignment) -> Arc<Self> {
        Arc::new(Self {
            log,
            me,
            part: Mutex::new(Part::Follower),
            assignment: watch::Sender::new(assignment),
            tasks: Mutex::new(Vec::new()),
        })
    }

    pub fn assignment(&self) -> Assignment {
        self.assignment.borrow().clone()
    }

    pub fn role(&self) -> Role {
        match &*self.part.lock().expect("part lock") {
            Part::Leader(_) => Role::Leader,
            Part::Follower | Part::Deposed => Role::Follower,
        }
    }

    /// The epoch this replica leads, if it does.
    pub fn leading(&self) -> Option<Epoch> {
        match &*self.part.lock().expect("part lock") {
            Part::Leader(l) => Some(l.epoch),
            _ => None,
        }
    }

    /// Leads, and its epoch's first entry is committed: it knows every committed entry.
    pub fn ready(&self) -> bool {
        matches!(&*self.part.lock().expect("part lock"), Part::Leader(l) if l.ready())
    }

    fn not_leader(&self) -> Error {
        let a = self.assignment();
        let leader = (a.leader != self.me).then_some(a.leader);
        Error::NotLeader { topic: self.log.name.to_string(), server: self.me, leader }
    }

    /// `NotLeader` unless this replica leads (and has not been deposed).
    pub fn check_leader(&self) -> Result<(), Error> {
        match self.role() {
            Role::Leader => Ok(()),
            Role::Follower => Err(self.not_leader()),
        }
    }

    /// `NotLeader` unless this replica leads, `Unavailable` until it is ready (a new leader
    /// serves cursors once it applied every committed one), and unless it heard from a
    /// majority of its voters within `contact_ms` of `now_ms`: past that a newer leader may
    /// exist without this one knowing, and its consumers should look again.
    /// `alive`: what the followers said outside fetches (`FollowerAlive`).
    pub fn check_serving(&self, now_ms: u64, contact_ms: u64, alive: &AliveBook) -> Result<(), Error> {
        // Ready once every entry before its epoch's first is applied, not only committed:
        // consumers resume from the applied cursors.
        let applied = self.log.state().applied;
        match &*self.part.lock().expect("part lock") {
            Part::Leader(l) if !l.ready() || applied <= l.epoch_start => Err(Error::Unavailable {
                detail: format!("{} has a new leader that is not ready yet", self.log.name),
            }),
            Part::Leader(l)
                if now_ms.saturating_sub(
                    l.majority_heard_at(now_ms, |v| alive.heard_at(v, self.log.id, l.epoch)),
                ) > contact_ms =>
            {
                Err(Error::Unavailable {
                    detail: format!(
                        "the leader of {} has not heard from a majority of its replicas for {contact_ms} ms",
                        self.log.name
                    ),
                })
            }
            Part::Leader(_) => Ok(()),
            _ => Err(self.not_leader()),
        }
    }

    /// Waits (up to [`READY_WAIT`]) until [`check_serving`](Self::check_serving) passes: a
    /// new leader becomes ready within a round trip to its followers.
    pub async fn wait_serving(&self, contact_ms: u64, alive: &Mutex<AliveBook>) -> Result<(), Error> {
        let mut state = self.log.watch();
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        let check = || self.check_serving(mono_ms(), contact_ms, &alive.lock().expect("alive lock"));
        loop {
            state.borrow_and_update();
            match check() {
                Ok(()) => return Ok(()),
                Err(e @ Error::NotLeader { .. }) => return Err(e),
                Err(_) => {
                    if tokio::time::timeout_at(deadline, state.changed()).await.is_err() {
                        // Contact may have come back without a state change (a follower's
                        // `FollowerAlive`): the answer is what holds now.
                        return check();
                    }
                }
            }
        }
    }

    /// What an assignment makes of this replica: leader (true) or follower.
    pub fn leads(&self, assignment: &Assignment) -> bool {
        assignment.leader == self.me
    }

    /// Serves nothing while storage starts a new epoch as its leader.
    pub fn await_lead(&self) {
        *self.part.lock().expect("part lock") = Part::Deposed;
        self.log.mark_changed();
    }

    /// Takes the leader's role for the epoch storage just started (`state` is what
    /// `become_leader` answered).
    pub fn take_lead(&self, assignment: &Assignment, state: &LogState) {
        let epoch_start = state.history.entries().last().map_or(0, |e| e.1);
        let commit = (state.commit_index, state.commit);
        let leader = Leader::new(
            self.me,
            assignment.epoch,
            epoch_start,
            assignment.voter_ids(),
            assignment.learner_ids(),
            commit,
        );
        *self.part.lock().expect("part lock") = Part::Leader(Box::new(leader));
        self.assignment.send_replace(assignment.clone());
        self.log.poke();
    }

    /// Takes the follower's role.
    pub fn take_follow(&self, assignment: &Assignment) {
        *self.part.lock().expect("part lock") = Part::Follower;
        self.assignment.send_replace(assignment.clone());
        self.log.poke();
    }

    /// Takes on `assignment`: persists it, becomes leader or follower, and (re)starts the
    /// task that role needs.
    pub async fn apply(self: &Arc<Self>, node: &Arc<Node>, assignment: Assignment) -> Result<(), Error> {
        let id = self.log.id;
        let (voters, learners) = (assignment.voter_ids(), assignment.learner_ids());
        node.store.assign(id, voters, learners, assignment.leader, assignment.epoch).await?;
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
        // Followers parked on this replica fetch again and learn of the change; what this
        // replica parked as a follower is forgotten.
        node.parking.wake_topic(id);
        node.parking.unpark(id);
        if self.leads(&assignment) {
            self.await_lead();
            let state = node.store.become_leader(id, assignment.epoch).await?;
            self.take_lead(&assignment, &state);
            if !assignment.is_solo() {
                let span = tracing::info_span!("lead", topic = %self.log.name, epoch = assignment.epoch);
                let task = tokio::spawn(leader_loop(self.clone(), node.clone()).instrument(span));
                self.tasks.lock().expect("tasks lock").push(task);
            }
        } else {
            self.take_follow(&assignment);
            let span = tracing::info_span!(
                "follow",
                topic = %self.log.name,
                epoch = assignment.epoch,
                leader = assignment.leader
            );
            let task = tokio::spawn(follow(self.clone(), node.clone(), assignment).instrument(span));
            self.tasks.lock().expect("tasks lock").push(task);
        }
        Ok(())
    }

    /// Steps down after learning of a newer epoch.
    pub fn depose(&self, epoch: Epoch) {
        let mut part = self.part.lock().expect("part lock");
        if let Part::Leader(l) = &*part {
            if epoch > l.epoch {
                warn!(topic = %self.log.name, epoch = l.epoch, newer = epoch, "deposed: a newer epoch exists");
                *part = Part::Deposed;
                drop(part);
                // Wake everything waiting for a commit this leader can no longer make.
                self.log.poke();
            }
        }
    }

    /// The naming server's election: promise `epoch` durably and report for the vote.
    pub async fn promise(&self, node: &Node, epoch: Epoch) -> Result<(Epoch, Index), Error> {
        self.depose(epoch);
        node.store.promise(self.log.id, epoch).await
    }

    /// How the entry a client waits for stands: committed (and, with `applied`, applied,
    /// as a cursor change must be before its ack), truncated, or still pending.
    pub fn ack_state(state: &LogState, at: Pending, applied: bool) -> AckState {
        match committed(&state.history, state.end_index, state.commit_index, at.index, at.epoch) {
            Some(false) => AckState::Failed,
            Some(true) if !applied || state.applied > at.index => AckState::Done,
            _ => AckState::Waiting,
        }
    }

    /// Waits until the entry `at` is committed (and applied, with `applied`): a producer's
    /// or a consumer's ack. Fails if it never will be (truncated), or after [`COMMIT_WAIT`].
    pub async fn wait_for(&self, at: Pending, applied: bool) -> Result<(), Error> {
        let mut state = self.log.watch();
        let deadline = tokio::time::Instant::now() + COMMIT_WAIT;
        loop {
            match Self::ack_state(&state.borrow_and_update(), at, applied) {
                AckState::Done => return Ok(()),
                AckState::Failed => return Err(self.not_leader()),
                AckState::Waiting => {}
            }
            match tokio::time::timeout_at(deadline, state.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::Unavailable { detail: "topic closed".into() }),
                Err(_) => {
                    self.check_leader()?;
                    return Err(Error::Unavailable {
                        detail: format!("no majority of {}'s replicas acknowledged in time", self.log.name),
                    });
                }
            }
        }
    }

    /// Leader: recomputes the commit point from the durable log end and publishes it.
    /// Returns the index below which committed entries should now be applied, if any.
    pub fn advance(&self) -> Option<Index> {
        let state = self.log.state();
        let (commit, epoch_start) = {
            let mut part = self.part.lock().expect("part lock");
            let Part::Leader(l) = &mut *part else { return None };
            if l.advance_commit((state.end_index, state.log_end)).is_some() {
                self.log.mark_changed(); // the leader may have become ready
            }
            (l.commit(), l.epoch_start)
        };
        self.log.set_commit(commit.0, commit.1);
        let pending_cursor = state.first_pending_cursor.is_some_and(|i| i < commit.0);
        // A new leader serves once it applied its epoch's first entry: at once, then.
        let new_epoch = state.applied <= epoch_start;
        let due = pending_cursor || new_epoch || commit.0 - state.applied >= APPLY_EVERY;
        (commit.0 > state.applied && due).then_some(commit.0)
    }

    /// Leader: judges a follower's fetch, and on a consistent one recomputes the commit
    /// point (the fetch acknowledged what the follower holds).
    pub fn judge_fetch(&self, follower: ServerId, req: &FetchRequest, now_ms: u64) -> Result<Judged, Error> {
        let state = self.log.state();
        let (decision, epoch) = {
            let mut part = self.part.lock().expect("part lock");
            match &mut *part {
                Part::Leader(l) => (l.on_fetch(follower, req, &staged_view(&state), now_ms), l.epoch),
                _ => {
                    drop(part);
                    return Err(self.not_leader());
                }
            }
        };
        if let FetchDecision::Fenced { epoch } = decision {
            self.depose(epoch);
        }
        // Who holds everything may have changed (see `leader_report`).
        self.log.mark_changed();
        let apply = matches!(decision, FetchDecision::Serve { .. }).then(|| self.advance()).flatten();
        Ok(Judged { decision, epoch, apply })
    }

    /// Leader: a follower said it follows this topic in `epoch` (see [`Leader::on_alive`]).
    pub fn follower_alive(&self, follower: ServerId, epoch: Epoch, now_ms: u64) {
        let deposed = match &mut *self.part.lock().expect("part lock") {
            Part::Leader(l) => l.on_alive(follower, epoch, now_ms),
            _ => false,
        };
        if deposed {
            self.depose(epoch);
        }
    }

    /// Follower: its leader and the epoch it follows in, as its fetches and
    /// [`Request::FollowerAlive`] carry it; `None` unless it follows.
    pub fn following_epoch(&self) -> Option<(ServerId, Option<SocketAddr>, Epoch)> {
        if !matches!(*self.part.lock().expect("part lock"), Part::Follower) {
            return None;
        }
        let promised = self.log.state().promised;
        let a = self.assignment.borrow();
        Some((a.leader, a.leader_addr(), promised.max(a.epoch)))
    }

    /// Leader: whether a follower at `from` that knows commit point `known_commit` has
    /// anything new to hear.
    pub fn has_news(state: &LogState, from: Index, known_commit: Index) -> bool {
        state.staged_end > from || state.commit_index > known_commit
    }

    /// Leader: the entries a follower gets from `from` on, with the commit point: durable ones
    /// from storage, then those of the group commit under way (their fsyncs overlap; commit
    /// still counts durable copies only).
    ///
    /// Only while this replica still leads `epoch`, the epoch it judged the fetch in: a
    /// leader deposed while it held the fetch may have truncated its log and taken another
    /// leader's entries since, which do not follow the entries the fetch was judged against.
    /// A leader's log only grows while it leads, so leading before and after the read means
    /// what was read is its own.
    pub fn chunk(
        store: &Store,
        log: &TopicLog,
        epoch: Epoch,
        from: Index,
        max_bytes: usize,
    ) -> Result<ReplicaChunk, Error> {
        let deposed = || Error::StaleEpoch {
            topic: log.name.to_string(),
            server: 0,
            epoch,
            current: log.state().promised,
        };
        let state = log.state();
        if state.leading != Some(epoch) {
            return Err(deposed());
        }
        let mut entries = if from < state.end_index {
            store.read_entries(log.id, from, state.end_index, max_bytes)?
        } else {
            Vec::new()
        };
        let read_end = entries.last().map_or(from, |e| e.index + 1);
        if read_end >= state.end_index && state.staged_end > read_end {
            let read: usize = entries.iter().map(ShippedEntry::encoded_size).sum();
            if read < max_bytes || entries.is_empty() {
                entries.extend(log.staged(read_end, max_bytes.saturating_sub(read)));
            }
        }
        if log.state().leading != Some(epoch) {
            return Err(deposed());
        }
        Ok(ReplicaChunk { epoch, entries, commit_index: state.commit_index, commit: state.commit })
    }

    /// Follower: what to ask the leader next.
    pub fn fetch_request(state: &LogState, assignment: &Assignment) -> FetchRequest {
        FetchRequest {
            epoch: state.promised.max(assignment.epoch),
            fetch_index: state.end_index,
            fetch_offset: state.log_end,
            last_epoch: state.epoch,
        }
    }

    /// Follower: what the leader's answer asks of this replica.
    pub fn follower_step(state: &LogState, answer: ReplicaAnswer) -> FollowerStep {
        match answer {
            ReplicaAnswer::Chunk(chunk)
                if chunk.entries.is_empty()
                    && chunk.epoch <= state.promised
                    && chunk.commit_index <= state.commit_index =>
            {
                // What a write of it would store is stored already: the epoch is promised and
                // the commit point known. Skipping it keeps an idle topic off the writer.
                FollowerStep::Idle
            }
            ReplicaAnswer::Chunk(chunk) => FollowerStep::Append(chunk),
            ReplicaAnswer::Diverging { end_epoch, end_index } => {
                FollowerStep::Truncate(truncation_point(&view(state), end_epoch, end_index))
            }
            ReplicaAnswer::Reset(reset) => FollowerStep::Reset(reset),
            ReplicaAnswer::Fenced { epoch } => FollowerStep::Fenced(epoch),
        }
    }

    /// Leader: answers a follower's fetch, holding it up to `max_wait` until there is news.
    pub async fn serve_fetch(
        &self,
        node: &Node,
        follower: ServerId,
        req: FetchRequest,
        known_commit: Index,
        max_bytes: u32,
        max_wait: Duration,
    ) -> Result<ReplicaAnswer, Error> {
        let judged = self.judge_fetch(follower, &req, mono_ms())?;
        if let Some(index) = judged.apply {
            node.store.commit(self.log.id, index).await?;
        }
        match judged.decision {
            FetchDecision::Fenced { epoch } => Ok(ReplicaAnswer::Fenced { epoch }),
            FetchDecision::NotReplica => Err(Error::Unauthorized {
                detail: format!("server {follower} is not a replica of {}", self.log.name),
            }),
            FetchDecision::Diverging { end_epoch, end_index } => {
                Ok(ReplicaAnswer::Diverging { end_epoch, end_index })
            }
            FetchDecision::Reset { .. } => Ok(ReplicaAnswer::Reset(node.store.reset_snapshot(self.log.id)?)),
            FetchDecision::Serve { from } => {
                let mut watch = self.log.watch();
                let deadline = tokio::time::Instant::now() + max_wait;
                loop {
                    if Self::has_news(&watch.borrow_and_update(), from, known_commit)
                        || tokio::time::timeout_at(deadline, watch.changed()).await.is_err()
                    {
                        break;
                    }
                }
                Ok(ReplicaAnswer::Chunk(Self::chunk(
                    &node.store,
                    &self.log,
                    judged.epoch,
                    from,
                    max_bytes as usize,
                )?))
            }
        }
    }

    /// Leader: every replica's position, for `topic describe`.
    pub fn replica_statuses(&self) -> Vec<ReplicaStatus> {
        let state = self.log.state();
        let assignment = self.assignment();
        let part = self.part.lock().expect("part lock");
        let Part::Leader(l) = &*part else { return Vec::new() };
        assignment
            .voters
            .iter()
            .chain(&assignment.learners)
            .map(|r| {
                if r.server == self.me {
                    ReplicaStatus {
                        server: r.server,
                        role: Role::Leader,
                        log_end: Some(state.log_end),
                        caught_up: true,
                    }
                } else {
                    let p = l.progress(r.server);
                    let caught_up =
                        p.is_some_and(|p| p.last_epoch == l.epoch && p.fetch_index >= state.end_index);
                    ReplicaStatus {
                        server: r.server,
                        role: Role::Follower,
                        log_end: p.map(|p| p.fetch_offset),
                        caught_up,
                    }
                }
            })
            .collect()
    }

    /// Leader: its epoch, whether the epoch is committed (for the naming server, which
    /// changes replica sets only then), the replicas holding every entry it has, and whether
    /// its storage gave the epoch up (a group followers may have seen could not be written,
    /// e.g. the disk is full).
    pub fn leader_report(&self) -> Option<LeaderReport> {
        let state = self.log.state();
        let part = self.part.lock().expect("part lock");
        let Part::Leader(l) = &*part else { return None };
        let holders = l.caught_up(state.end_index);
        let voters_holding = holders.iter().filter(|h| l.voters().contains(h)).count();
        Some(LeaderReport {
            epoch: l.epoch,
            ready: l.ready(),
            holders,
            voters_holding,
            voters: l.voters().len(),
            given_up: state.leading != Some(l.epoch),
        })
    }
}

/// What a leader tells the naming server of its topic (see [`Replica::leader_report`]).
pub struct LeaderReport {
    pub epoch: Epoch,
    pub ready: bool,
    pub holders: Vec<ServerId>,
    /// How many of `holders` are voters, of how many voters.
    pub voters_holding: usize,
    pub voters: usize,
    pub given_up: bool,
}

/// Leader: recomputes the commit point whenever the leader's own log moves (its group commit
/// may land after the followers acknowledged), and applies committed cursor entries.
async fn leader_loop(replica: Arc<Replica>, node: Arc<Node>) {
    let mut state = replica.log.watch();
    loop {
        node.parking.on_change(replica.log.id, &replica.log.state());
        if let Some(index) = replica.advance() {
            if let Err(e) = node.store.commit(replica.log.id, index).await {
                debug!(topic = %replica.log.name, error = %e, "applying committed entries failed");
            }
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Follower: fetches from the leader of `assignment` until the assignment changes.
async fn follow(replica: Arc<Replica>, node: Arc<Node>, assignment: Assignment) {
    let Some(leader_addr) = assignment.leader_addr() else {
        warn!(topic = %replica.log.name, leader = assignment.leader, "the leader's address is unknown");
        return;
    };
    let id = replica.log.id;
    let mut backoff = Duration::from_millis(20);
    loop {
        let session = async {
            let conn = node.peers.get(leader_addr).await?;
            let mut stream = conn.open().await?;
            loop {
                let s = replica.log.state();
                let fetch = Replica::fetch_request(&s, &assignment);
                let req_epoch = fetch.epoch;
                let req = Request::ReplicaFetch {
                    topic: replica.log.name.clone(),
                    topic_id: id,
                    replica: node.id,
                    fetch,
                    known_commit: s.commit_index,
                    max_bytes: REPLICA_FETCH_BYTES,
                    max_wait_ms: REPLICA_FETCH_WAIT.as_millis() as u32,
                };
                let answer = match stream.call(&req).await? {
                    Response::Replica(a) => a,
                    other => {
                        return Err(Error::internal(format!("unexpected answer to ReplicaFetch: {other:?}")))
                    }
                };
                backoff = Duration::from_millis(20);
                match Replica::follower_step(&s, answer) {
                    FollowerStep::Idle => {
                        let fetch = ParkedFetch {
                            topic: id,
                            epoch: req_epoch,
                            from: s.end_index,
                            known_commit: s.commit_index,
                        };
                        Parking::park(&node, assignment.leader, leader_addr, fetch).await;
                    }
                    FollowerStep::Append(chunk) => {
                        node.store.replica_append(id, chunk).await?;
                    }
                    FollowerStep::Truncate(to) => {
                        info!(topic = %replica.log.name, to, "log diverges from the leader's; truncating");
                        node.store.truncate(id, to).await?;
                    }
                    FollowerStep::Reset(reset) => {
                        node.store.reset(id, reset).await?;
                    }
                    FollowerStep::Fenced(epoch) => {
                        return Err(Error::StaleEpoch {
                            topic: replica.log.name.to_string(),
                            server: assignment.leader,
                            epoch: assignment.epoch,
                            current: epoch,
                        });
                    }
                }
            }
        };
        let result: Result<(), Error> = session.await;
        if let Err(e) = result {
            debug!(topic = %replica.log.name, leader = %leader_addr, error = %e, "replication stream ended; retrying");
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}
