//! The replication driver: carries the [`crate::replication`] rules over QUIC.
//!
//! Every hosted topic is a [`Replica`]. Its role follows the naming server's assignment:
//! - **Leader**: answers followers' `ReplicaFetch` requests with whole batches read from redb
//!   (so a follower far behind costs no memory), and after every fetch (an acknowledgement)
//!   and every local commit recomputes the commit offset and the committed cursor version. A
//!   producer's ack and a consumer's cursor move wait for those.
//! - **Follower**: one task keeps one long-lived stream to the leader and fetches in a loop:
//!   it writes what it gets durably (one group commit), then fetches again, which tells the
//!   leader what it now holds. Divergence and resets are applied as the rules say.
//! - **Deposed**: a leader that learned of a newer epoch (from a follower's fetch or the
//!   naming server's promise request) acknowledges nothing until it gets a new assignment.
//!
//! All topics of a pair of servers share one QUIC connection; each (topic, follower) has its
//! own stream on it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::Endpoint;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::replication::{truncation_point, FetchDecision, FetchRequest, Leader, LogView};
use crate::storage::{LogState, ReplicaReset, Store, TopicLog};
use crate::transport::Pool;
use crate::types::{Epoch, Offset, ServerId};
use crate::wire::{ReplicaAnswer, ReplicaInfo, ReplicaStatus, Request, Response, Role};

/// Most bytes of records one replica fetch carries.
pub const REPLICA_FETCH_BYTES: u32 = 4 * 1024 * 1024;
/// How long a leader holds a follower's fetch when there is nothing new.
const REPLICA_FETCH_WAIT: Duration = Duration::from_millis(500);
/// How long a produce or an ack waits for its commit before answering `Unavailable`.
const COMMIT_WAIT: Duration = Duration::from_secs(15);

/// The naming server's word on one topic, as this server last applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub leader: ServerId,
    pub epoch: Epoch,
    pub replicas: Vec<ReplicaInfo>,
}

impl Assignment {
    fn servers(&self) -> Vec<ServerId> {
        self.replicas.iter().map(|r| r.server).collect()
    }

    fn leader_addr(&self) -> Option<SocketAddr> {
        self.replicas.iter().find(|r| r.server == self.leader).map(|r| r.addr)
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
}

impl Node {
    pub fn new(id: ServerId, store: Store, endpoint: Endpoint) -> Self {
        Self { id, store, peers: Pool::new(endpoint) }
    }
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

fn view(state: &LogState) -> LogView<'_> {
    LogView { log_start: state.log_start, log_end: state.log_end, history: &state.history }
}

/// A leader's log as followers see it: including the group commit under way.
fn staged_view(state: &LogState) -> LogView<'_> {
    LogView { log_end: state.staged_end, ..view(state) }
}

impl Replica {
    /// A replica that does nothing until [`apply`](Self::apply) gives it an assignment.
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

    /// `NotLeader` unless this replica leads (and has not been deposed).
    pub fn check_leader(&self) -> Result<(), Error> {
        match self.role() {
            Role::Leader => Ok(()),
            Role::Follower => {
                let a = self.assignment();
                let leader = (a.leader != self.me).then_some(a.leader);
                Err(Error::NotLeader { topic: self.log.name.to_string(), server: self.me, leader })
            }
        }
    }

    /// Takes on `assignment`: persists it, becomes leader or follower, and (re)starts the
    /// task that role needs.
    pub async fn apply(self: &Arc<Self>, node: &Arc<Node>, assignment: Assignment) -> Result<(), Error> {
        let id = self.log.id;
        node.store.assign(id, assignment.servers(), assignment.leader, assignment.epoch).await?;
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
        if assignment.leader == self.me {
            let state = node.store.become_leader(id, assignment.epoch).await?;
            let leader =
                Leader::new(self.me, assignment.epoch, assignment.servers(), &view(&state), state.commit);
            *self.part.lock().expect("part lock") = Part::Leader(Box::new(leader));
            self.assignment.send_replace(assignment.clone());
            if assignment.replicas.len() > 1 {
                let span = tracing::info_span!("lead", topic = %self.log.name, epoch = assignment.epoch);
                let task = tokio::spawn(leader_loop(self.clone(), node.clone()).instrument(span));
                self.tasks.lock().expect("tasks lock").push(task);
            }
        } else {
            *self.part.lock().expect("part lock") = Part::Follower;
            self.assignment.send_replace(assignment.clone());
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
    fn depose(&self, epoch: Epoch) {
        let mut part = self.part.lock().expect("part lock");
        if let Part::Leader(l) = &*part {
            if epoch > l.epoch {
                warn!(topic = %self.log.name, epoch = l.epoch, newer = epoch, "deposed: a newer epoch exists");
                *part = Part::Deposed;
                // Wake everything waiting for a commit this leader can no longer make.
                self.assignment.send_modify(|_| {});
            }
        }
    }

    /// The naming server's election: promise `epoch` durably and report for the vote.
    pub async fn promise(&self, node: &Node, epoch: Epoch) -> Result<(Epoch, Offset), Error> {
        self.depose(epoch);
        node.store.promise(self.log.id, epoch).await
    }

    /// Waits until `target` is committed (a producer's ack), while this replica leads.
    pub async fn wait_commit(&self, target: Offset) -> Result<(), Error> {
        self.wait(|s| s.commit >= target).await
    }

    /// Waits until cursor change `version` is on a majority (a consumer's ack).
    pub async fn wait_cursor_commit(&self, version: u64) -> Result<(), Error> {
        self.wait(|s| s.cursor_commit >= version).await
    }

    async fn wait(&self, done: impl Fn(&LogState) -> bool) -> Result<(), Error> {
        let mut state = self.log.watch();
        let mut assignment = self.assignment.subscribe();
        let deadline = tokio::time::Instant::now() + COMMIT_WAIT;
        loop {
            if done(&state.borrow_and_update()) {
                return Ok(());
            }
            self.check_leader()?;
            // Wake on progress, and on a new assignment (which may depose this leader).
            let changed = async {
                tokio::select! {
                    r = state.changed() => r.is_ok(),
                    r = assignment.changed() => r.is_ok(),
                }
            };
            match tokio::time::timeout_at(deadline, changed).await {
                Ok(true) => {}
                Ok(false) => return Err(Error::Unavailable { detail: "topic closed".into() }),
                Err(_) => {
                    // Check leadership at least every deadline; a deposed leader says so.
                    self.check_leader()?;
                    return Err(Error::Unavailable {
                        detail: format!("no majority of {}'s replicas acknowledged in time", self.log.name),
                    });
                }
            }
        }
    }

    /// Recomputes the commit offset and the committed cursor version after progress.
    async fn advance(&self, node: &Node) -> Result<(), Error> {
        let state = self.log.state();
        let (commit, cursor_commit) = {
            let mut part = self.part.lock().expect("part lock");
            let Part::Leader(l) = &mut *part else { return Ok(()) };
            (l.advance_commit(state.log_end), l.committed_cursor_version(state.cursor_version))
        };
        if let Some(c) = commit {
            self.log.set_commit(c);
        }
        if cursor_commit > state.cursor_commit {
            node.store.commit_cursors(self.log.id, cursor_commit).await?;
        }
        Ok(())
    }

    /// Leader: answers a follower's fetch.
    #[allow(clippy::too_many_arguments)]
    pub async fn serve_fetch(
        &self,
        node: &Node,
        follower: ServerId,
        req: FetchRequest,
        known_commit: Offset,
        known_cursor_commit: u64,
        max_bytes: u32,
        max_wait: Duration,
    ) -> Result<ReplicaAnswer, Error> {
        let state = self.log.state();
        let (decision, epoch) = {
            let mut part = self.part.lock().expect("part lock");
            match &mut *part {
                Part::Leader(l) => (l.on_fetch(follower, &req, &staged_view(&state)), l.epoch),
                _ => {
                    drop(part);
                    return Err(self.check_leader().expect_err("not leading"));
                }
            }
        };
        match decision {
            FetchDecision::Fenced { epoch } => {
                self.depose(epoch);
                Ok(ReplicaAnswer::Fenced { epoch })
            }
            FetchDecision::NotReplica => Err(Error::Unauthorized {
                detail: format!("server {follower} is not a replica of {}", self.log.name),
            }),
            FetchDecision::Diverging { end_epoch, end_offset } => {
                Ok(ReplicaAnswer::Diverging { end_epoch, end_offset })
            }
            FetchDecision::Reset { log_start } => Ok(ReplicaAnswer::Reset(ReplicaReset {
                log_start,
                history: state.history.entries().to_vec(),
                producers: node.store.producer_states(self.log.id)?,
            })),
            FetchDecision::Serve { from } => {
                // The fetch acknowledged what the follower holds.
                self.advance(node).await?;
                let mut watch = self.log.watch();
                let deadline = tokio::time::Instant::now() + max_wait;
                let state = loop {
                    let s = watch.borrow_and_update().clone();
                    let news = s.staged_end > from
                        || s.cursor_version > req.cursor_version
                        || s.commit > known_commit
                        || s.cursor_commit > known_cursor_commit;
                    if news || tokio::time::timeout_at(deadline, watch.changed()).await.is_err() {
                        break s;
                    }
                };
                let mut batches = if from < state.log_end {
                    node.store.read_batches(self.log.id, from, state.log_end, max_bytes as usize)?
                } else {
                    Vec::new()
                };
                let read_end = batches.last().map_or(from, |b| b.base + b.records.len() as u64);
                if read_end >= state.log_end && state.staged_end > read_end {
                    // The leader's group commit is under way: its fsync and the followers'
                    // overlap. Commit still counts durable copies only.
                    let read: usize = batches.iter().flat_map(|b| &b.records).map(|r| r.size()).sum();
                    let rest = (max_bytes as usize).saturating_sub(read);
                    batches.extend(self.log.staged(read_end, rest));
                }
                Ok(ReplicaAnswer::Chunk(crate::storage::ReplicaChunk {
                    epoch,
                    batches,
                    history: state.history.entries().to_vec(),
                    log_start: state.log_start,
                    commit: state.commit,
                    cursors: node.store.cursor_changes(self.log.id, req.cursor_version)?,
                    cursor_commit: state.cursor_commit,
                }))
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
            .replicas
            .iter()
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
                        p.is_some_and(|p| p.last_epoch == l.epoch && p.fetch_offset >= state.log_end);
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
}

/// Leader: recomputes the commit offset whenever the leader's own log moves (its group
/// commit may land after the followers acknowledged).
async fn leader_loop(replica: Arc<Replica>, node: Arc<Node>) {
    let mut state = replica.log.watch();
    loop {
        if let Err(e) = replica.advance(&node).await {
            debug!(topic = %replica.log.name, error = %e, "advancing the commit offset failed");
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
                let req = Request::ReplicaFetch {
                    topic: replica.log.name.clone(),
                    topic_id: id,
                    replica: node.id,
                    fetch: FetchRequest {
                        epoch: s.promised.max(assignment.epoch),
                        fetch_offset: s.log_end,
                        last_epoch: s.epoch,
                        cursor_version: s.cursor_version,
                    },
                    known_commit: s.commit,
                    known_cursor_commit: s.cursor_commit,
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
                match answer {
                    ReplicaAnswer::Chunk(chunk) => {
                        node.store.replica_append(id, chunk).await?;
                    }
                    ReplicaAnswer::Diverging { end_epoch, end_offset } => {
                        let to = truncation_point(&view(&s), end_epoch, end_offset);
                        info!(topic = %replica.log.name, to, "log diverges from the leader's; truncating");
                        node.store.truncate(id, to).await?;
                    }
                    ReplicaAnswer::Reset(reset) => {
                        node.store.reset(id, reset).await?;
                    }
                    ReplicaAnswer::Fenced { epoch } => {
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
