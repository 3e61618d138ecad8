//! A simulated topic server: the real storage (redb on a [`SimDisk`], its writer driven group
//! by group), the real replicas ([`Replica`]) and their rules; this file only carries their
//! messages and waits, as `server.rs` and `replica.rs` do with QUIC and tokio.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::check::Checker;
use super::net::{server_node, Message, NamingTarget, NodeId, Payload};
use crate::error::Error;
use crate::replica::{AckState, Assignment, FollowerStep, Replica, REPLICA_FETCH_BYTES};
use crate::replica::{Parking, PARK_WAIT};
use crate::replication::FetchDecision;
use crate::replication::{AliveBook, AliveOutcome, Next, ParkBook, ParkLot, ParkedFetch};
use crate::server::{read_committed, topic_report, Followed, ReportLedger, Told};
use crate::storage::faults::SimDisk;
use crate::storage::{
    Command, GroupOutcome, LogState, Medium, Pending, Reply, Store, TopicLog, TopicMeta, Writer,
};
use crate::types::{Epoch, Offset, ServerId, TopicId, TopicName};
use crate::wire::{Assignments, Evicted, ReplicaAnswer, ReplicaInfo, Request, Response, TopicInfo};

/// What a component does with the world while it handles something.
pub struct Ctx<'a> {
    pub now: u64,
    pub rng: &'a mut fastrand::Rng,
    pub out: &'a mut Vec<Message>,
    pub checker: &'a mut Checker,
}

thread_local! {
    /// Lines for the run's trace, from inside a server.
    pub static NOTES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Adds a line to the run's trace.
pub fn note(line: String) {
    NOTES.with(|n| n.borrow_mut().push(line));
}

impl Ctx<'_> {
    pub fn send(&mut self, from: NodeId, to: NodeId, payload: Payload) {
        self.out.push(Message { from, to, payload });
    }
}

/// The made-up address of a simulated server (never bound: messages go by node id).
pub fn addr(id: ServerId) -> SocketAddr {
    SocketAddr::from(([10, 0, (id >> 8) as u8, id as u8], 7401))
}

/// The server whose made-up address is `addr`.
fn server_at(addr: SocketAddr) -> ServerId {
    match addr {
        SocketAddr::V4(a) => {
            let [_, _, hi, lo] = a.ip().octets();
            ((hi as u64) << 8) | lo as u64
        }
        SocketAddr::V6(_) => 0,
    }
}

/// Timing of a simulated server, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease_ms: u64,
    /// How long a group commit's fsync takes, at least and at most.
    pub min_fsync_ms: u64,
    pub max_fsync_ms: u64,
    /// Applied entries kept (small in a simulation, so followers restart from snapshots).
    pub retention: crate::storage::Retention,
    /// Members of the naming group.
    pub naming_members: u64,
    /// How long a leader holds an idle follower's fetch (`replica::REPLICA_FETCH_WAIT`).
    pub fetch_wait_ms: u64,
    /// How often every stored chunk is checked (`server::repair::SCRUB_EVERY`).
    pub scrub_every_ms: u64,
}

type Then = Box<dyn FnOnce(&mut Running, &mut Ctx)>;

/// A request this server sent and waits the answer of.
enum Outgoing {
    Register,
    Heartbeat,
    /// A `FollowerAlive` to `leader`; `sent_list`: it carried the list `digest` names.
    Alive {
        leader: ServerId,
        digest: u64,
        sent_list: bool,
    },
    Fetch {
        topic: TopicId,
        epoch: Epoch,
        state: Box<LogState>,
    },
    /// A poll for the topics parked on `leader`.
    Park {
        leader: ServerId,
    },
    /// A `ReadChunk` for the damaged chunk at `base` (`server::repair`).
    Repair {
        topic: TopicId,
        base: Offset,
    },
}

/// Asking for a good copy of one damaged chunk, as `server::repair` does: each other replica
/// in turn, then again after `REPAIR_RETRY`.
struct RepairTry {
    attempt: u64,
    due: u64,
    in_flight: bool,
}

/// A request answered once an entry is committed (and, for cursor changes, applied).
struct Wait {
    to: NodeId,
    id: u64,
    topic: TopicId,
    at: Pending,
    applied: bool,
    deadline: u64,
    answer: Response,
}

/// A follower's fetch the leader holds until there is news.
struct HeldFetch {
    to: NodeId,
    id: u64,
    topic: TopicId,
    epoch: Epoch,
    from: crate::types::Index,
    known_commit: crate::types::Index,
    deadline: u64,
}

/// A follower's poll for its parked topics, held by the leader until one has news.
struct HeldPoll {
    to: NodeId,
    id: u64,
    follower: ServerId,
    poll: u64,
    deadline: u64,
}

/// A follower's loop, as a state machine.
struct Follow {
    assignment: Assignment,
    in_flight: Option<u64>,
    /// Parked on the leader's session (`replication::park`) until woken.
    parked: bool,
    /// A write of the last answer is under way.
    writing: bool,
    next_at: u64,
    backoff: u64,
}

/// One hosted topic.
struct Hosted {
    replica: Arc<Replica>,
    applied: Option<Assignment>,
    refused: Option<Epoch>,
    follow: Option<Follow>,
    /// The highest index a `Commit` was asked for.
    applying: crate::types::Index,
}

/// A running server process.
pub struct Running {
    pub id: ServerId,
    pub store: Store,
    writer: Writer,
    queue: Vec<Command>,
    thens: Vec<Then>,
    /// The group under way: when its fsync ends, and what to do then.
    group: Option<(u64, Vec<Then>)>,
    hosted: BTreeMap<TopicId, Hosted>,
    outgoing: BTreeMap<u64, (u64, Outgoing)>,
    waits: Vec<Wait>,
    held: Vec<HeldFetch>,
    naming: NamingLink,
    /// When to tell every leader this server follows topics from that it does
    /// (`server::tell_leaders_alive`).
    followers_alive_at: u64,
    /// What this server follows, by leader, as those messages carry it.
    followed: Followed<ServerId>,
    /// The digest of the list each leader holds, as far as this server knows.
    told: Told<ServerId>,
    /// What followers said of the topics this server leads.
    alive: AliveBook,
    /// Followers' fetches parked on this server, and their polls.
    park_book: ParkBook,
    held_polls: Vec<HeldPoll>,
    /// This server's parked fetches, by leader (the waker is the topic).
    park_lot: ParkLot<TopicId>,
    /// Damaged chunks being repaired from a peer's copy.
    repairs: BTreeMap<(TopicId, Offset), RepairTry>,
    /// When every stored chunk is checked next.
    scrub_at: u64,
    next_id: Arc<AtomicU64>,
    timing: Timing,
}

struct NamingLink {
    /// The naming member asked.
    target: NamingTarget,
    registered: bool,
    known: u64,
    applied: u64,
    /// Assignment jobs still running from the last heartbeat answer.
    reconciling: usize,
    pending_version: u64,
    next_at: u64,
    backoff: u64,
    /// When to ping every naming member next (`server::ping_naming`).
    alive_at: u64,
    /// The reports this session sent (a new one starts with a new registration).
    ledger: ReportLedger,
}

/// A simulated server: its disk survives crashes; the process does not.
pub struct SimServer {
    pub id: ServerId,
    pub disk: SimDisk,
    pub run: Option<Running>,
    pub paused: bool,
    /// Bumped by every crash, so events of a dead process are ignored.
    pub incarnation: u64,
    /// Chunks the `DamageChunk` fault damaged on this disk (their checksums may fail).
    pub damaged: Vec<(TopicId, Offset)>,
}

impl SimServer {
    pub fn new(id: ServerId) -> Self {
        Self { id, disk: SimDisk::new(), run: None, paused: false, incarnation: 0, damaged: Vec::new() }
    }

    /// Starts the process from its disk (first start, or restart after a crash).
    pub fn start(
        &mut self,
        ctx: &mut Ctx,
        clock: Arc<AtomicU64>,
        next_id: Arc<AtomicU64>,
        timing: Timing,
    ) -> Result<(), String> {
        self.disk.power_on();
        let clock_fn: crate::storage::Clock =
            Arc::new(move || 1_700_000_000_000 + clock.load(Ordering::Relaxed));
        let (store, mut writer, logs) =
            Store::open_driven(Path::new("sim"), Some(self.id), &Medium::Sim(self.disk.clone()), clock_fn)
                .map_err(|e| format!("server {} does not open: {e:#}", self.id))?;
        writer.set_retention(timing.retention);
        store
            .check_consistency_except(&self.damaged)
            .map_err(|e| format!("server {} reopened inconsistent: {e}", self.id))?;
        // The scrub at start (`server::repair::scrub`), all at once here.
        scrub_all(&store);
        let mut run = Running {
            id: self.id,
            store,
            writer,
            queue: Vec::new(),
            thens: Vec::new(),
            group: None,
            hosted: BTreeMap::new(),
            outgoing: BTreeMap::new(),
            waits: Vec::new(),
            held: Vec::new(),
            naming: NamingLink {
                target: NamingTarget::new(timing.naming_members),
                registered: false,
                known: 0,
                applied: 0,
                reconciling: 0,
                pending_version: 0,
                next_at: ctx.now,
                backoff: 50,
                alive_at: ctx.now,
                ledger: ReportLedger::default(),
            },
            followers_alive_at: ctx.now,
            followed: Followed::default(),
            told: Told::default(),
            alive: AliveBook::default(),
            park_book: ParkBook::default(),
            held_polls: Vec::new(),
            // Each start numbers its polls apart from its predecessor's (drawing from the seed's
            // generator here would change every run the seeds name).
            park_lot: ParkLot::numbered_from((self.incarnation + 1) << 32),
            repairs: BTreeMap::new(),
            scrub_at: ctx.now + timing.scrub_every_ms,
            next_id,
            timing,
        };
        for (log, meta) in logs {
            let assignment = assignment_of(&meta);
            let replica = Replica::new(log, self.id, assignment.clone());
            let mut hosted = Hosted { replica, applied: None, refused: None, follow: None, applying: 0 };
            if meta.is_solo() && meta.leader == self.id {
                // A single replica leads again at once, as `server::run_node` does.
                hosted.applied = Some(assignment.clone());
                run.hosted.insert(meta.id, hosted);
                run.apply_assignment(meta.id, assignment);
            } else {
                run.hosted.insert(meta.id, hosted);
            }
        }
        self.run = Some(run);
        self.incarnation += 1;
        Ok(())
    }

    /// Damages the running server's oldest committed chunk of `topic` that no subscription
    /// has read all of (the `DamageChunk` fault); `Err` while a group is being written.
    pub fn damage_chunk(&mut self, topic: TopicId, pick: u64) -> Result<Option<Offset>, ()> {
        let Some(run) = &self.run else { return Ok(None) };
        if run.group.is_some() {
            return Err(());
        }
        let Some(h) = run.hosted.get(&topic) else { return Ok(None) };
        let state = h.replica.log.state();
        let base = run.store.damage_chunk(topic, state.log_start, state.commit, pick).ok().flatten();
        self.damaged.extend(base.map(|b| (topic, b)));
        Ok(base)
    }

    /// The process dies (and the power goes with it: unsynced writes are lost).
    pub fn crash(&mut self) {
        if let Some(mut run) = self.run.take() {
            run.writer.abandon();
            self.disk.power_cut();
            drop(run);
        }
        self.incarnation += 1;
    }
}

fn assignment_of(meta: &TopicMeta) -> Assignment {
    let info = |ids: &[ServerId]| ids.iter().map(|s| ReplicaInfo { server: *s, addr: addr(*s) }).collect();
    Assignment {
        leader: meta.leader,
        epoch: meta.epoch,
        voters: info(&meta.voters),
        learners: info(&meta.learners),
    }
}

impl Running {
    /// Where the producers' dedup state in memory differs from what a restart would load
    /// (the checkpoint and the entries after it), described; `None` while a group is under
    /// way (memory is ahead of disk until it commits).
    pub fn dedup_differs(&self) -> Option<String> {
        if self.group.is_some() {
            return None;
        }
        self.writer.producer_states().into_iter().find_map(|(topic, held)| {
            match self.store.producer_states(topic) {
                Ok(loaded) if loaded == held => None,
                loaded => Some(format!(
                    "topic {topic}: producers' dedup state {held:?} in memory, {loaded:?} loaded"
                )),
            }
        })
    }

    fn node(&self) -> NodeId {
        server_node(self.id)
    }

    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues a command for the next group; `then` runs with its answer once it is durable.
    fn submit<T: 'static>(
        &mut self,
        make: impl FnOnce(Reply<T>) -> Command,
        then: impl FnOnce(&mut Running, &mut Ctx, Result<T, Error>) + 'static,
    ) {
        let (reply, mut rx) = oneshot::channel();
        self.queue.push(make(reply));
        self.thens.push(Box::new(move |run, ctx| {
            let result = rx
                .try_recv()
                .unwrap_or_else(|_| Err(Error::Unavailable { detail: "writer dropped it".into() }));
            then(run, ctx, result)
        }));
    }

    fn respond(&self, ctx: &mut Ctx, to: NodeId, id: u64, resp: Response) {
        ctx.send(self.node(), to, Payload::Response { id, resp: Box::new(resp) });
    }

    fn request(&mut self, ctx: &mut Ctx, to: NodeId, req: Request, timeout: u64, kind: Outgoing) {
        let id = self.new_id();
        self.outgoing.insert(id, (ctx.now + timeout, kind));
        ctx.send(self.node(), to, Payload::Request { id, req: Box::new(req) });
    }

    /// Starts a group commit if commands wait and none is under way; returns when its fsync
    /// ends.
    pub fn start_group(&mut self, ctx: &mut Ctx) -> Option<u64> {
        if self.group.is_some() || self.queue.is_empty() {
            return None;
        }
        let commands = std::mem::take(&mut self.queue);
        let thens = std::mem::take(&mut self.thens);
        self.writer.stage(commands);
        let t = self.timing;
        let done = ctx.now + ctx.rng.u64(t.min_fsync_ms..=t.max_fsync_ms.max(t.min_fsync_ms));
        self.group = Some((done, thens));
        Some(done)
    }

    /// The group's fsync ended: publish and answer. `Err` if the server must stop.
    pub fn finish_group(&mut self, ctx: &mut Ctx) -> Result<(), String> {
        let Some((_, thens)) = self.group.take() else { return Ok(()) };
        if self.writer.finish() == GroupOutcome::Fatal {
            return Err(format!("server {} stops: a group its followers saw failed", self.id));
        }
        for then in thens {
            then(self, ctx);
        }
        self.poll(ctx);
        Ok(())
    }

    /// Re-checks everything waiting on state: commits, applies, held fetches.
    pub fn poll(&mut self, ctx: &mut Ctx) {
        let ids: Vec<TopicId> = self.hosted.keys().copied().collect();
        for id in ids {
            let Some(h) = self.hosted.get_mut(&id) else { continue };
            if let Some(epoch) = h.replica.leading() {
                ctx.checker.leads(id, epoch, self.id);
                if let Some(index) = h.replica.advance() {
                    if index > h.applying {
                        h.applying = index;
                        self.submit(|reply| Command::Commit { topic: id, index, reply }, |_, _, _| {});
                    }
                }
            }
        }
        let now = ctx.now;
        let waits = std::mem::take(&mut self.waits);
        for w in waits {
            let state = self.hosted.get(&w.topic).map(|h| h.replica.log.state());
            let verdict = state.map_or(AckState::Failed, |s| Replica::ack_state(&s, w.at, w.applied));
            match verdict {
                AckState::Done => self.respond(ctx, w.to, w.id, w.answer),
                AckState::Failed => {
                    let e =
                        Error::NotLeader { topic: format!("#{}", w.topic), server: self.id, leader: None };
                    self.respond(ctx, w.to, w.id, Response::Error(e));
                }
                AckState::Waiting if now >= w.deadline => {
                    let e = Error::Unavailable { detail: "no majority acknowledged in time".into() };
                    self.respond(ctx, w.to, w.id, Response::Error(e));
                }
                AckState::Waiting => self.waits.push(w),
            }
        }
        for (id, h) in &self.hosted {
            let state = h.replica.log.state();
            self.park_book.on_change(*id, |f| Parking::news(&state, f));
        }
        let polls = std::mem::take(&mut self.held_polls);
        for p in polls {
            match self.park_book.answer(p.follower, p.poll, now >= p.deadline) {
                Some(woken) => self.respond(ctx, p.to, p.id, Response::Woken(woken)),
                None => self.held_polls.push(p),
            }
        }
        let held = std::mem::take(&mut self.held);
        for f in held {
            let Some(h) = self.hosted.get(&f.topic) else { continue };
            let state = h.replica.log.state();
            if Replica::has_news(&state, f.from, f.known_commit) || now >= f.deadline {
                let answer = Replica::chunk(
                    &self.store,
                    &h.replica.log,
                    f.epoch,
                    f.from,
                    REPLICA_FETCH_BYTES as usize,
                );
                let resp = match answer {
                    Ok(chunk) => Response::Replica(ReplicaAnswer::Chunk(chunk)),
                    Err(e) => Response::Error(e),
                };
                self.respond(ctx, f.to, f.id, resp);
            } else {
                self.held.push(f);
            }
        }
    }

    /// Timers: the naming link, followers' fetches, timeouts.
    pub fn tick(&mut self, ctx: &mut Ctx) {
        let now = ctx.now;
        let expired: Vec<u64> =
            self.outgoing.iter().filter(|(_, (d, _))| *d <= now).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some((_, kind)) = self.outgoing.remove(&id) {
                self.on_answer(ctx, kind, Err(Error::Unavailable { detail: "timed out".into() }));
            }
        }
        if self.timing.naming_members > 1 && self.naming.alive_at <= now {
            self.naming.alive_at = now + self.timing.lease_ms / 3;
            for m in 1..=self.timing.naming_members {
                let req = Request::NamingAlive { server: self.id };
                let id = self.new_id();
                ctx.send(
                    self.node(),
                    super::net::naming_node(m),
                    Payload::Request { id, req: Box::new(req) },
                );
            }
        }
        if self.followers_alive_at <= now {
            self.followers_alive_at = now + self.timing.lease_ms / crate::replica::FOLLOWER_ALIVE_PER_LEASE;
            // As `server::alive` does: only topics whose state changed are read again.
            let changed = self.store.changed_topics().take(crate::storage::ChangeReader::FollowerAlive);
            let mut changed: Vec<TopicId> = changed.into_iter().collect();
            changed.sort_unstable();
            for id in changed {
                let following = self.hosted.get(&id).and_then(|h| h.replica.following_epoch());
                self.followed.update(id, following.map(|(leader, _, epoch)| (leader, epoch)));
            }
            for (leader, digest, topics) in self.followed.messages(&self.told) {
                let sent_list = topics.is_some();
                let req = Request::FollowerAlive { replica: self.id, digest, topics };
                let window = self.timing.lease_ms * 2;
                self.request(
                    ctx,
                    server_node(leader),
                    req,
                    window,
                    Outgoing::Alive { leader, digest, sent_list },
                );
            }
        }
        if self.naming.next_at <= now && !self.naming_busy() {
            if !self.naming.registered {
                let req = Request::Register { server: self.id, addr: addr(self.id) };
                let to = self.naming.target.node();
                self.request(ctx, to, req, 2_000, Outgoing::Register);
            } else if self.naming.reconciling == 0 {
                self.naming.applied = self.naming.applied.max(self.naming.pending_version);
                let hosted = &self.hosted;
                let report = |h: &Hosted| topic_report(&h.replica, h.refused, false);
                let reports = self.naming.ledger.next(
                    false,
                    self.store.changed_topics().take(crate::storage::ChangeReader::Reports),
                    || hosted.values().filter_map(report).collect(),
                    |id| hosted.get(&id).and_then(report),
                );
                let wait_ms = (self.timing.lease_ms / 3) as u32;
                let req = Request::Heartbeat {
                    server: self.id,
                    known_version: self.naming.known,
                    applied_version: self.naming.applied,
                    wait_ms,
                    reports,
                };
                let timeout = wait_ms as u64 + 1_000;
                let to = self.naming.target.node();
                self.request(ctx, to, req, timeout, Outgoing::Heartbeat);
            }
        }
        let ids: Vec<TopicId> = self.hosted.keys().copied().collect();
        for id in ids {
            self.fetch_if_due(ctx, id);
        }
        if self.scrub_at <= now {
            self.scrub_at = now + self.timing.scrub_every_ms;
            scrub_all(&self.store);
        }
        self.repair_due(ctx);
        self.poll(ctx);
    }

    /// Asks a peer for each damaged chunk whose turn it is (`server::repair`).
    fn repair_due(&mut self, ctx: &mut Ctx) {
        let damaged = self.store.damaged().list();
        self.repairs.retain(|k, _| damaged.contains(k));
        for (topic, base) in damaged {
            let entry = self.repairs.entry((topic, base)).or_insert(RepairTry {
                attempt: 0,
                due: ctx.now,
                in_flight: false,
            });
            if entry.in_flight || entry.due > ctx.now {
                continue;
            }
            let Some(h) = self.hosted.get(&topic) else {
                self.store.damaged().forget(topic, base);
                continue;
            };
            // As `server::repair`: the replicas the naming server last said the topic has.
            let peers = h.applied.as_ref().map_or_else(Vec::new, |a| crate::server::repair_peers(a, self.id));
            let log_end = h.replica.log.state().log_end;
            let name = h.replica.log.name.clone();
            let end = match self.store.damaged_chunk_end(topic, base, log_end) {
                Ok(Some(end)) => end,
                Ok(None) => {
                    self.store.damaged().forget(topic, base);
                    continue;
                }
                Err(_) => continue,
            };
            let Some(peer) = peers.get((entry.attempt % peers.len().max(1) as u64) as usize) else {
                continue;
            };
            entry.in_flight = true;
            let req = Request::ReadChunk { topic: name, topic_id: topic, replica: self.id, base, end };
            self.request(ctx, server_node(peer.server), req, 1_000, Outgoing::Repair { topic, base });
        }
    }

    /// A repair attempt failed: the next peer now, or all of them again after a pause.
    fn repair_failed(&mut self, now: u64, topic: TopicId, base: Offset) {
        let peers = self
            .hosted
            .get(&topic)
            .and_then(|h| h.applied.as_ref())
            .map_or(0, |a| crate::server::repair_peers(a, self.id).len())
            .max(1);
        if let Some(t) = self.repairs.get_mut(&(topic, base)) {
            t.in_flight = false;
            t.attempt += 1;
            let retry = crate::server::REPAIR_RETRY.as_millis() as u64;
            t.due = if t.attempt % peers as u64 == 0 { now + retry } else { now };
        }
    }

    /// Whether this server, leading `topic`, may serve its consumers at `now_ms` (ready,
    /// and in contact with a majority: see [`Replica::check_serving`]).
    pub fn serving(&self, topic: TopicId, now_ms: u64) -> Result<(), Error> {
        let h =
            self.hosted.get(&topic).ok_or_else(|| Error::internal(format!("topic {topic} is not hosted")))?;
        h.replica.check_serving(now_ms, self.timing.lease_ms * 2, &self.alive)
    }

    /// The assignment each hosted topic last took on (`None`: still being created).
    pub fn assignments(&self) -> BTreeMap<TopicId, Option<Assignment>> {
        self.hosted.iter().map(|(id, h)| (*id, h.applied.clone())).collect()
    }

    fn naming_busy(&self) -> bool {
        self.outgoing.values().any(|(_, k)| matches!(k, Outgoing::Register | Outgoing::Heartbeat))
    }

    /// Keeps a poll held at every leader something is parked on, with the new registrations
    /// (as `replica::park`'s session tasks do).
    fn send_polls(&mut self, ctx: &mut Ctx) {
        for leader in self.park_lot.leaders() {
            while let Next::Send { poll, parked } = self.park_lot.next(leader) {
                let max_wait_ms = PARK_WAIT.as_millis() as u32;
                let req = Request::Park { replica: self.id, poll, parked, max_wait_ms };
                let timeout = (PARK_WAIT.min(crate::transport::IDLE_TIMEOUT)).as_millis() as u64 + 2_000;
                let req_id = self.new_id();
                self.outgoing.insert(req_id, (ctx.now + timeout, Outgoing::Park { leader }));
                ctx.send(
                    self.node(),
                    server_node(leader),
                    Payload::Request { id: req_id, req: Box::new(req) },
                );
            }
        }
    }

    fn fetch_if_due(&mut self, ctx: &mut Ctx, id: TopicId) {
        let Some(h) = self.hosted.get(&id) else { return };
        let Some(f) = &h.follow else { return };
        if f.in_flight.is_some() || f.writing || f.parked || f.next_at > ctx.now {
            return;
        }
        let state = h.replica.log.state();
        let assignment = f.assignment.clone();
        let leader = assignment.leader;
        let req = Request::ReplicaFetch {
            topic: h.replica.log.name.clone(),
            topic_id: id,
            replica: self.id,
            fetch: Replica::fetch_request(&state, &assignment),
            known_commit: state.commit_index,
            max_bytes: REPLICA_FETCH_BYTES,
            max_wait_ms: self.timing.fetch_wait_ms as u32,
        };
        // A real follower learns its connection died within QUIC's idle timeout, however
        // long the leader may hold the fetch: a fetch the network lost is asked again then.
        let timeout =
            self.timing.fetch_wait_ms.min(crate::transport::IDLE_TIMEOUT.as_millis() as u64) + 2_000;
        let epoch = assignment.epoch;
        let kind = Outgoing::Fetch { topic: id, epoch, state: Box::new(state) };
        let req_id = self.new_id();
        self.outgoing.insert(req_id, (ctx.now + timeout, kind));
        ctx.send(self.node(), server_node(leader), Payload::Request { id: req_id, req: Box::new(req) });
        if let Some(f) = self.hosted.get_mut(&id).and_then(|h| h.follow.as_mut()) {
            f.in_flight = Some(req_id);
        }
    }

    /// A message for this server.
    pub fn handle(&mut self, ctx: &mut Ctx, msg: Message) {
        match msg.payload {
            Payload::Response { id, resp } => {
                if let Some((_, kind)) = self.outgoing.remove(&id) {
                    self.on_answer(ctx, kind, Ok(*resp));
                }
            }
            Payload::Request { id, req } => self.on_request(ctx, msg.from, id, *req),
            Payload::Raft { .. } => {} // only naming members speak Raft
        }
        self.poll(ctx);
    }

    fn on_answer(&mut self, ctx: &mut Ctx, kind: Outgoing, answer: Result<Response, Error>) {
        match kind {
            Outgoing::Register => match answer {
                Ok(Response::Registered { .. }) => {
                    self.naming.registered = true;
                    self.naming.known = 0;
                    self.naming.ledger = ReportLedger::default();
                    self.naming.backoff = 50;
                    self.naming.next_at = ctx.now;
                }
                Ok(Response::Error(e)) | Err(e) => self.naming_failed(ctx, &e),
                Ok(_) => self.naming_retry(ctx),
            },
            Outgoing::Heartbeat => match answer {
                Ok(Response::Heartbeat { version, assignments, send_all_reports, .. }) => {
                    if send_all_reports {
                        note(format!("server {}: asked for all its reports", self.id));
                        self.naming.ledger.send_all();
                    }
                    if let Some(Assignments::Since { known, .. }) = &assignments {
                        assert_eq!(
                            *known, self.naming.known,
                            "server {}: changes since another version",
                            self.id
                        );
                    }
                    if let Some(assignments) = assignments {
                        note(match &assignments {
                            Assignments::All(all) => {
                                format!(
                                    "server {}: told all its topics ({}) at version {version}",
                                    self.id,
                                    all.len()
                                )
                            }
                            Assignments::Since { known, changed, dropped } => format!(
                                "server {}: told the changes since version {known} ({} changed, {} dropped)",
                                self.id,
                                changed.len(),
                                dropped.len()
                            ),
                        });
                        self.naming.pending_version = version;
                        self.reconcile(assignments);
                    }
                    self.naming.known = version;
                    self.naming.next_at = ctx.now;
                }
                Ok(Response::Error(e)) | Err(e) => {
                    self.naming.registered = false;
                    self.naming_failed(ctx, &e);
                }
                Ok(_) => {
                    self.naming.registered = false;
                    self.naming_retry(ctx);
                }
            },
            Outgoing::Repair { topic, base } => match answer {
                Ok(Response::StoredChunk { bytes }) => self.submit(
                    |reply| Command::RepairChunk { topic, base, bytes, reply },
                    move |run, ctx, result| match result {
                        Ok(true) => {
                            note(format!(
                                "server {}: topic {topic}'s chunk at {base} repaired from a peer's copy",
                                run.id
                            ));
                            run.store.damaged().repaired(topic, base);
                        }
                        Ok(false) => run.store.damaged().forget(topic, base),
                        Err(e) => {
                            note(format!(
                                "server {}: topic {topic}'s chunk at {base} not repaired yet: {e}",
                                run.id
                            ));
                            run.repair_failed(ctx.now, topic, base)
                        }
                    },
                ),
                other => {
                    note(format!(
                        "server {}: topic {topic}'s chunk at {base} not repaired yet: {other:?}",
                        self.id
                    ));
                    self.repair_failed(ctx.now, topic, base)
                }
            },
            Outgoing::Park { leader } => {
                let woken = match answer {
                    Ok(Response::Woken(woken)) => self.park_lot.answered(leader, &woken),
                    _ => {
                        let all = self.park_lot.failed(leader);
                        note(format!(
                            "server {}: park poll to {leader} failed; {} topics wake",
                            self.id,
                            all.len()
                        ));
                        all
                    }
                };
                for topic in woken {
                    note(format!("server {} topic {topic}: parked fetch woken", self.id));
                    if let Some(f) = self.hosted.get_mut(&topic).and_then(|h| h.follow.as_mut()) {
                        f.parked = false;
                        f.next_at = ctx.now;
                    }
                }
                self.send_polls(ctx);
            }
            Outgoing::Alive { leader, digest, sent_list } => {
                self.told.answered(leader, digest, sent_list, matches!(answer, Ok(Response::Noted)));
            }
            Outgoing::Fetch { topic, epoch, state } => {
                let Some(h) = self.hosted.get_mut(&topic) else { return };
                let current = h.follow.as_ref().is_some_and(|f| f.assignment.epoch == epoch);
                if !current {
                    return;
                }
                let f = h.follow.as_mut().expect("following");
                f.in_flight = None;
                let step = match answer {
                    Ok(Response::Replica(a)) => Replica::follower_step(&state, a),
                    _ => {
                        f.next_at = ctx.now + f.backoff + ctx.rng.u64(0..=f.backoff / 2);
                        f.backoff = (f.backoff * 2).min(500);
                        return;
                    }
                };
                f.backoff = 20;
                let done = move |run: &mut Running, ctx: &mut Ctx, result: Result<LogState, Error>| {
                    if let Some(f) = run.hosted.get_mut(&topic).and_then(|h| h.follow.as_mut()) {
                        if f.assignment.epoch == epoch {
                            f.writing = false;
                            f.next_at = if result.is_ok() { ctx.now } else { ctx.now + 50 };
                        }
                    }
                };
                match &step {
                    FollowerStep::Idle => {}
                    FollowerStep::Append(c) if c.entries.is_empty() => {}
                    FollowerStep::Append(c) => note(format!(
                        "server {} topic {topic}: append {:?} (had {}..{} epoch {}) commit {}",
                        self.id,
                        c.entries.iter().map(|e| (e.index, e.entry.epoch, e.entry.end)).collect::<Vec<_>>(),
                        state.start_index,
                        state.end_index,
                        state.epoch,
                        c.commit_index
                    )),
                    other => note(format!(
                        "server {} topic {topic}: {other:?} (had {}..{} epoch {})",
                        self.id, state.start_index, state.end_index, state.epoch
                    )),
                }
                match step {
                    FollowerStep::Idle => {
                        f.parked = true;
                        let fetch = ParkedFetch {
                            topic,
                            epoch: Replica::fetch_request(&state, &f.assignment).epoch,
                            from: state.end_index,
                            known_commit: state.commit_index,
                        };
                        self.park_lot.park(f.assignment.leader, fetch, topic);
                        self.send_polls(ctx);
                    }
                    FollowerStep::Append(chunk) => {
                        f.writing = true;
                        self.submit(|reply| Command::ReplicaAppend { topic, chunk, reply }, done);
                    }
                    FollowerStep::Truncate(to) => {
                        f.writing = true;
                        self.submit(|reply| Command::Truncate { topic, to, reply }, done);
                    }
                    FollowerStep::Reset(reset) => {
                        f.writing = true;
                        self.submit(|reply| Command::Reset { topic, reset, reply }, done);
                    }
                    FollowerStep::Fenced(_) => {
                        f.next_at = ctx.now + 100;
                    }
                }
            }
        }
    }

    /// A naming call failed: ask the leader it named (soon), or the next member.
    fn naming_failed(&mut self, ctx: &mut Ctx, e: &Error) {
        self.naming.target.failed(e);
        if matches!(e, Error::NamingNotLeader { .. }) {
            self.naming.backoff = crate::server::NAMING_BACKOFF_MIN.as_millis() as u64;
        }
        self.naming_retry(ctx);
    }

    fn naming_retry(&mut self, ctx: &mut Ctx) {
        let b = self.naming.backoff;
        self.naming.next_at = ctx.now + b + ctx.rng.u64(0..=b / 2);
        self.naming.backoff = (b * 2).min(crate::server::NAMING_BACKOFF_MAX.as_millis() as u64);
    }

    /// Makes the hosted topics match the book, as `TopicServer::reconcile` does.
    fn reconcile(&mut self, assignments: Assignments) {
        let (gone, assignments): (Vec<TopicId>, Vec<TopicInfo>) = match assignments {
            Assignments::All(all) => {
                let listed: Vec<TopicId> = all.iter().map(|t| t.id).collect();
                (self.hosted.keys().copied().filter(|id| !listed.contains(id)).collect(), all)
            }
            Assignments::Since { changed, dropped, .. } => {
                (dropped.into_iter().filter(|id| self.hosted.contains_key(id)).collect(), changed)
            }
        };
        for id in gone {
            self.hosted.remove(&id);
            self.store.changed_topics().mark(id); // no longer followed
            self.park_book.wake_topic(id);
            self.park_lot.unpark(id);
            self.waits.retain(|w| w.topic != id);
            self.held.retain(|f| f.topic != id);
            self.submit(|reply| Command::DeleteTopic { id, reply }, |_, _, _| {});
        }
        for info in assignments {
            let assignment = Assignment::of(&info);
            match self.hosted.get_mut(&info.id) {
                Some(h) if h.applied.as_ref() == Some(&assignment) => {}
                Some(h) => {
                    h.applied = Some(assignment.clone());
                    self.apply_assignment(info.id, assignment);
                }
                None => {
                    let meta = assignment.new_meta(&info);
                    let id = info.id;
                    self.naming.reconciling += 1;
                    self.submit(
                        |reply| Command::CreateTopic { meta, reply },
                        move |run, _, result: Result<Arc<TopicLog>, Error>| {
                            run.naming.reconciling -= 1;
                            if result.is_err() {
                                // Changes since a version would not bring this topic again:
                                // ask for every topic next time.
                                run.naming.known = 0;
                            }
                            if let Ok(log) = result {
                                let replica = Replica::new(log, run.id, assignment.clone());
                                let hosted = Hosted {
                                    replica,
                                    applied: Some(assignment.clone()),
                                    refused: None,
                                    follow: None,
                                    applying: 0,
                                };
                                run.hosted.insert(id, hosted);
                                run.apply_assignment(id, assignment);
                            }
                        },
                    );
                }
            }
        }
    }

    /// `Replica::apply`, step by step.
    fn apply_assignment(&mut self, id: TopicId, assignment: Assignment) {
        let (voters, learners) = (assignment.voter_ids(), assignment.learner_ids());
        let (leader, epoch) = (assignment.leader, assignment.epoch);
        self.naming.reconciling += 1;
        self.submit(
            |reply| Command::Assign { topic: id, voters, learners, leader, epoch, reply },
            move |run, _, result: Result<(), Error>| {
                if !run.hosted.contains_key(&id) || result.is_err() {
                    run.naming.reconciling -= 1;
                    return;
                }
                // As `Replica::apply`: followers parked here wake, and what this server
                // parked for the topic is forgotten.
                run.park_book.wake_topic(id);
                run.park_lot.unpark(id);
                let h = run.hosted.get_mut(&id).expect("hosted");
                if h.replica.leads(&assignment) {
                    h.follow = None;
                    h.replica.await_lead();
                    run.submit(
                        |reply| Command::BecomeLeader { topic: id, epoch, reply },
                        move |run, _, result: Result<LogState, Error>| {
                            run.naming.reconciling -= 1;
                            let Some(h) = run.hosted.get_mut(&id) else { return };
                            if h.applied.as_ref() != Some(&assignment) {
                                return; // a newer assignment came meanwhile
                            }
                            match result {
                                Ok(state) => {
                                    note(format!(
                                        "server {} topic {id}: leads epoch {epoch} from entry {}",
                                        run.id,
                                        state.end_index - 1
                                    ));
                                    h.replica.take_lead(&assignment, &state);
                                    h.refused = None;
                                }
                                Err(e) => {
                                    note(format!(
                                        "server {} topic {id}: will not lead epoch {epoch}: {e}",
                                        run.id
                                    ));
                                    h.refused = Some(epoch);
                                    h.replica.log.mark_changed();
                                }
                            }
                        },
                    );
                } else {
                    run.naming.reconciling -= 1;
                    h.replica.take_follow(&assignment);
                    h.refused = None;
                    h.follow = Some(Follow {
                        assignment,
                        in_flight: None,
                        parked: false,
                        writing: false,
                        next_at: 0,
                        backoff: 20,
                    });
                }
            },
        );
    }

    fn hosted_by_name(&self, name: &TopicName) -> Option<(TopicId, Arc<Replica>)> {
        self.hosted.iter().find(|(_, h)| h.replica.log.name == *name).map(|(id, h)| (*id, h.replica.clone()))
    }

    fn on_request(&mut self, ctx: &mut Ctx, from: NodeId, id: u64, req: Request) {
        let me = self.id;
        let not_hosted =
            |name: &TopicName| Error::NotLeader { topic: name.to_string(), server: me, leader: None };
        let contact = self.timing.lease_ms * 2;
        let now = ctx.now;
        let deadline = now + crate::replica::COMMIT_WAIT.as_millis() as u64;
        match req {
            Request::Produce { topic, producer, sequence, records } => {
                let Some((tid, replica)) = self.hosted_by_name(&topic) else {
                    return self.respond(ctx, from, id, Response::Error(not_hosted(&topic)));
                };
                if let Err(e) = replica.check_leader() {
                    return self.respond(ctx, from, id, Response::Error(e));
                }
                self.submit(
                    |reply| Command::Append { topic: tid, producer, sequence, records, refused: None, reply },
                    move |run, ctx, result| match result {
                        Ok(a) => {
                            let answer = Response::Produced {
                                base: a.base,
                                count: a.count,
                                epoch: a.at.epoch,
                                duplicate: a.duplicate,
                            };
                            run.waits.push(Wait {
                                to: from,
                                id,
                                topic: tid,
                                at: a.at,
                                applied: false,
                                deadline,
                                answer,
                            });
                        }
                        Err(e) => run.respond(ctx, from, id, Response::Error(e)),
                    },
                );
            }
            Request::Fetch { topic, subscription, from: start, max_records, max_bytes, session, .. } => {
                let Some((_, replica)) = self.hosted_by_name(&topic) else {
                    return self.respond(ctx, from, id, Response::Error(not_hosted(&topic)));
                };
                if session.is_some() {
                    if let Err(e) = replica.check_serving(now, contact, &self.alive) {
                        return self.respond(ctx, from, id, Response::Error(e));
                    }
                }
                let log = replica.log.clone();
                let cursor = match self.store.cursor(log.id, &subscription) {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        let e = Error::UnknownSubscription {
                            topic: topic.to_string(),
                            subscription: subscription.to_string(),
                        };
                        return self.respond(ctx, from, id, Response::Error(e));
                    }
                    Err(e) => return self.respond(ctx, from, id, Response::Error(e)),
                };
                let consumer = session.is_some();
                let mut at = start.unwrap_or(cursor.next);
                let mut evicted = None;
                if consumer {
                    // As `TopicServer::fetch`: the backlog policy may have moved the cursor past
                    // this consumer; it goes on from there and is told until it acks past it.
                    if cursor.unreported > 0 {
                        evicted = Some(Evicted {
                            records: cursor.unreported,
                            at_ms: cursor.evicted_at_ms,
                            resume_at: cursor.next,
                        });
                    }
                    at = at.max(cursor.next);
                }
                let state = log.state();
                let answer = read_committed(
                    &self.store,
                    &log,
                    &state,
                    Some(&subscription),
                    at,
                    max_records,
                    max_bytes,
                )
                .map(|records| Response::Records {
                    records: records.unwrap_or_default(),
                    log_start: state.log_start,
                    commit: state.commit,
                    evicted,
                });
                self.respond(ctx, from, id, answer.unwrap_or_else(Response::Error));
            }
            // As `TopicServer`'s: a read through no subscription, at any replica, up to the
            // commit point it knows.
            Request::Read { topic, from: at, max_records, max_bytes, .. } => {
                let Some((_, replica)) = self.hosted_by_name(&topic) else {
                    return self.respond(ctx, from, id, Response::Error(not_hosted(&topic)));
                };
                let log = replica.log.clone();
                let state = log.state();
                let answer = read_committed(&self.store, &log, &state, None, at, max_records, max_bytes).map(
                    |records| Response::Records {
                        records: records.unwrap_or_default(),
                        log_start: state.log_start,
                        commit: state.commit,
                        evicted: None,
                    },
                );
                self.respond(ctx, from, id, answer.unwrap_or_else(Response::Error));
            }
            Request::Ack { topic, subscription, next, .. } => {
                let Some((tid, replica)) = self.hosted_by_name(&topic) else {
                    return self.respond(ctx, from, id, Response::Error(not_hosted(&topic)));
                };
                if let Err(e) = replica.check_serving(now, contact, &self.alive) {
                    return self.respond(ctx, from, id, Response::Error(e));
                }
                self.submit(
                    |reply| Command::Ack { topic: tid, subscription, next, reply },
                    move |run, ctx, result| run.answer_change(ctx, from, id, tid, deadline, result),
                );
            }
            Request::CreateSubscription { topic, subscription, from: start, if_missing } => {
                let Some((tid, replica)) = self.hosted_by_name(&topic) else {
                    return self.respond(ctx, from, id, Response::Error(not_hosted(&topic)));
                };
                if let Err(e) = replica.check_serving(now, contact, &self.alive) {
                    return self.respond(ctx, from, id, Response::Error(e));
                }
                self.submit(
                    |reply| Command::CreateSubscription {
                        topic: tid,
                        subscription,
                        from: start,
                        if_missing,
                        reply,
                    },
                    move |run, ctx, result| run.answer_change(ctx, from, id, tid, deadline, result),
                );
            }
            Request::DeleteSubscription { topic, subscription, .. } => {
                let Some((tid, replica)) = self.hosted_by_name(&topic) else {
                    return self.respond(ctx, from, id, Response::Error(not_hosted(&topic)));
                };
                if let Err(e) = replica.check_serving(now, contact, &self.alive) {
                    return self.respond(ctx, from, id, Response::Error(e));
                }
                self.submit(
                    |reply| Command::DeleteSubscription { topic: tid, subscription, reply },
                    move |run, ctx, result| run.answer_change(ctx, from, id, tid, deadline, result),
                );
            }
            Request::ResetSubscription { topic, subscription, to, execute, .. } => {
                let Some((tid, replica)) = self.hosted_by_name(&topic) else {
                    return self.respond(ctx, from, id, Response::Error(not_hosted(&topic)));
                };
                if let Err(e) = replica.check_serving(now, contact, &self.alive) {
                    return self.respond(ctx, from, id, Response::Error(e));
                }
                self.submit(
                    |reply| Command::ResetCursor { topic: tid, subscription, to, execute, reply },
                    move |run, ctx, result| match result {
                        Ok((outcome, Some(at))) => {
                            let answer = Response::Reset(outcome);
                            run.waits.push(Wait {
                                to: from,
                                id,
                                topic: tid,
                                at,
                                applied: true,
                                deadline,
                                answer,
                            });
                        }
                        Ok((outcome, None)) => run.respond(ctx, from, id, Response::Reset(outcome)),
                        Err(e) => run.respond(ctx, from, id, Response::Error(e)),
                    },
                );
            }
            Request::ReplicaFetch {
                topic_id, replica: follower, fetch, known_commit, max_wait_ms, ..
            } => {
                let Some(h) = self.hosted.get(&topic_id) else {
                    let e = Error::NotLeader { topic: format!("#{topic_id}"), server: me, leader: None };
                    return self.respond(ctx, from, id, Response::Error(e));
                };
                let replica = h.replica.clone();
                let judged = match replica.judge_fetch(follower, &fetch, now) {
                    Ok(j) => j,
                    Err(e) => return self.respond(ctx, from, id, Response::Error(e)),
                };
                if std::env::var("HERALD_SIM_DEBUG").is_ok() {
                    let st = replica.log.state();
                    note(format!(
                        "server {} topic {topic_id}: judged {fetch:?} from {follower}: {:?} (history {:?}, entries ..{} staged ..{})",
                        self.id, judged.decision, st.history.entries(), st.end_index, st.staged_end
                    ));
                }
                if let Some(index) = judged.apply {
                    let h = self.hosted.get_mut(&topic_id).expect("hosted");
                    if index > h.applying {
                        h.applying = index;
                        self.submit(|reply| Command::Commit { topic: topic_id, index, reply }, |_, _, _| {});
                    }
                }
                let answer = match judged.decision {
                    FetchDecision::Fenced { epoch } => Response::Replica(ReplicaAnswer::Fenced { epoch }),
                    FetchDecision::NotReplica => Response::Error(Error::Unauthorized {
                        detail: format!("{follower} is not a replica"),
                    }),
                    FetchDecision::Diverging { end_epoch, end_index } => {
                        Response::Replica(ReplicaAnswer::Diverging { end_epoch, end_index })
                    }
                    FetchDecision::Reset { .. } => match self.store.reset_snapshot(topic_id) {
                        Ok(r) => Response::Replica(ReplicaAnswer::Reset(r)),
                        Err(e) => Response::Error(e),
                    },
                    FetchDecision::Serve { from: at } => {
                        let wait = (max_wait_ms as u64).min(self.timing.fetch_wait_ms);
                        self.held.push(HeldFetch {
                            to: from,
                            id,
                            topic: topic_id,
                            epoch: judged.epoch,
                            from: at,
                            known_commit,
                            deadline: now + wait,
                        });
                        return;
                    }
                };
                self.respond(ctx, from, id, answer);
            }
            Request::FollowerAlive { replica: follower, digest, topics } => {
                let answer = match self.alive.on_alive(follower, digest, topics, now) {
                    AliveOutcome::Noted(changed) => {
                        for (topic, epoch) in changed {
                            if let Some(h) = self.hosted.get(&topic) {
                                h.replica.follower_alive(follower, epoch, now);
                            }
                        }
                        Response::Noted
                    }
                    AliveOutcome::ListWanted => {
                        note(format!("server {}: asks server {follower} for its list", self.id));
                        Response::ListWanted
                    }
                };
                self.respond(ctx, from, id, answer);
            }
            Request::Park { replica: follower, poll: sent, parked, max_wait_ms } => {
                let Some(poll) = self.park_book.hold(follower, sent) else {
                    note(format!("server {}: park poll {sent} of {follower} came twice", self.id));
                    self.respond(ctx, from, id, Response::Error(Parking::repeated(sent)));
                    return;
                };
                for fetch in parked {
                    let news = self
                        .hosted
                        .get(&fetch.topic)
                        .is_none_or(|h| Parking::news(&h.replica.log.state(), &fetch));
                    self.park_book.park(follower, fetch, news);
                }
                let wait = (max_wait_ms as u64).min(PARK_WAIT.as_millis() as u64);
                self.held_polls.push(HeldPoll { to: from, id, follower, poll, deadline: now + wait });
            }
            Request::ReadChunk { topic, topic_id, replica, base, end } => {
                let answer = match self.hosted.get(&topic_id) {
                    Some(h) => crate::server::read_chunk_for(&self.store, &h.replica, me, replica, base, end),
                    None => Err(not_hosted(&topic)),
                };
                let answer = answer.map_or_else(Response::Error, |bytes| Response::StoredChunk { bytes });
                self.respond(ctx, from, id, answer);
            }
            Request::Promise { topic_id, epoch, .. } => {
                let Some(h) = self.hosted.get(&topic_id) else {
                    let e = Error::NotLeader { topic: format!("#{topic_id}"), server: me, leader: None };
                    return self.respond(ctx, from, id, Response::Error(e));
                };
                h.replica.depose(epoch);
                self.submit(
                    |reply| Command::Promise { topic: topic_id, epoch, reply },
                    move |run, ctx, result| {
                        if std::env::var("HERALD_SIM_DEBUG").is_ok() {
                            note(format!(
                                "server {} topic {topic_id}: promised epoch {epoch}: {result:?}",
                                run.id
                            ));
                        }
                        let resp = match result {
                            Ok((last_epoch, log_end)) => Response::Promised { last_epoch, log_end },
                            Err(e) => Response::Error(e),
                        };
                        run.respond(ctx, from, id, resp);
                    },
                );
            }
            other => {
                let e = Error::invalid(format!(
                    "the simulated server does not serve {}",
                    crate::transport::request_name(&other)
                ));
                self.respond(ctx, from, id, Response::Error(e));
            }
        }
    }

    /// Answers a cursor change once its entry is applied.
    fn answer_change(
        &mut self,
        ctx: &mut Ctx,
        to: NodeId,
        id: u64,
        topic: TopicId,
        deadline: u64,
        result: Result<crate::storage::CursorChange, Error>,
    ) {
        match result {
            Ok(change) => {
                let answer = Response::Cursor { cursor: change.cursor };
                match change.pending {
                    Some(at) => self.waits.push(Wait { to, id, topic, at, applied: true, deadline, answer }),
                    None => self.respond(ctx, to, id, answer),
                }
            }
            Err(e) => self.respond(ctx, to, id, Response::Error(e)),
        }
    }

    /// Every hosted replica, for the checks.
    pub fn replicas(&self) -> impl Iterator<Item = (TopicId, &Arc<Replica>)> {
        self.hosted.iter().map(|(id, h)| (*id, &h.replica))
    }

    /// When the next timer of this server is due.
    pub fn next_timer(&self, now: u64) -> u64 {
        let mut at = now + 50;
        for (d, _) in self.outgoing.values() {
            at = at.min(*d);
        }
        for f in &self.held {
            at = at.min(f.deadline);
        }
        if !self.naming_busy() && self.naming.reconciling == 0 {
            at = at.min(self.naming.next_at.max(now + 1));
        }
        for h in self.hosted.values() {
            if let Some(f) = &h.follow {
                if f.in_flight.is_none() && !f.writing {
                    at = at.min(f.next_at.max(now + 1));
                }
            }
        }
        for t in self.repairs.values().filter(|t| !t.in_flight) {
            at = at.min(t.due.max(now + 1));
        }
        at.max(now + 1)
    }
}

/// Checks every stored chunk at once (a real server spreads this out: `server::repair`).
fn scrub_all(store: &Store) {
    let mut from = Some((0, 0));
    while let Some(at) = from {
        from = store.scrub(at, usize::MAX).unwrap_or(None);
    }
}

/// The server a made-up address names (used by clients that resolve leaders).
pub fn server_of(addr: SocketAddr) -> ServerId {
    server_at(addr)
}
