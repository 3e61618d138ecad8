//! A deterministic simulation of a whole cluster, run by seed (TigerBeetle's VOPR,
//! FoundationDB's simulator).
//!
//! One thread runs a naming group of one or three members and 3-5 topic servers made of the
//! production code: the naming members ([`crate::naming::member`]: raft-rs, its redb log and
//! the naming core), the storage writer on redb over a [`SimDisk`](crate::storage::faults::SimDisk)
//! (storage::faults) that loses unsynced writes when the power goes, and the replicas with
//! their rules ([`crate::replica`], [`crate::replication`]). Only the carrying is simulated:
//! a network of in-order links that delays, loses, duplicates and partitions (`net`), time,
//! and clients that produce with retries, consume and acknowledge, and create, reset and
//! delete subscriptions (`client`).
//!
//! Each seed picks its own cluster and fault mix (swarm testing: crashes with power loss,
//! restarts within a lease, pauses, partitions, a partition from the naming group only,
//! naming member crashes (the leader's too, mid-election), partitions and lost data
//! directories, failed fsyncs, replica replacement), runs faults for a while, then
//! heals everything and requires the cluster to recover. The [`Checker`] looks at every
//! step: no acked record lost, one value per committed offset on every replica, committed
//! cursors never back, a subscription once committed never vanishes, nothing deleted before
//! every subscription passed it, one leader per epoch; and at the end: every topic commits
//! again and every acked record reaches its consumer.
//!
//! A run is a pure function of its seed: [`run`] prints, on failure, the seed, the
//! violations, the last events, and a one-line command that replays it.

mod check;
mod client;
mod naming;
mod net;
mod scenarios;
mod server;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use check::{Checker, Violation};
pub use net::Weather;
pub use scenarios::{scenario, SCENARIOS};

use self::client::{SimClient, Work};
use self::naming::SimNaming;
use self::net::{
    is_naming, naming_node, server_node, Message, Net, NodeId, Payload, FIRST_CLIENT, NAMING_BASE,
};
use self::server::{Ctx, SimServer, Timing};
use crate::naming::core::Settings;
use crate::replica::Assignment;
use crate::types::{ServerId, TopicId, TopicName};
use crate::wire::{ReplicaInfo, Request, TopicConfig};

/// The real servers' idle fetch wait, in ms.
const REPLICA_FETCH_WAIT_MS: u64 = crate::replica::REPLICA_FETCH_WAIT.as_millis() as u64;

/// A fault the simulator injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The server's process dies and its power goes (unsynced writes are lost).
    Crash(ServerId),
    Restart(ServerId),
    /// SIGSTOP / SIGCONT.
    Pause(ServerId),
    Resume(ServerId),
    /// Cuts a server off everyone (`true`) or heals it.
    Isolate(ServerId, bool),
    /// Cuts a server off the naming group only (`true`) or heals those links.
    CutFromNaming(ServerId, bool),
    /// Naming member `m` crashes (0: whichever leads the group now).
    CrashNaming(u64),
    /// Naming member `m` starts again (0: every member that is down).
    RestartNaming(u64),
    /// Cuts naming member `m` off everyone (`true`) or heals it (0: the leader now when
    /// cutting, every member when healing).
    IsolateNaming(u64, bool),
    /// Naming member `m` crashes and loses its data directory.
    WipeNaming(u64),
    /// The server's next fsync fails.
    FailSync(ServerId),
    /// The power goes during the server's n-th write from now (mid-commit).
    TornWrite(ServerId, u64),
    /// A bit flips on the server's disk in its oldest committed chunk of the first topic that
    /// a subscription has still to read (0: whichever server leads that topic now); the
    /// second number picks the bit (`Store::damage_chunk`); F19. Scripted only, so the swarm's
    /// faults (and the regression seeds' runs) stay as they were.
    DamageChunk(ServerId, u64),
}

/// How often a simulated server checks every stored chunk (`server::repair::SCRUB_EVERY`,
/// a day on a real server, scaled down so runs see damage found by the scrub too).
pub const SCRUB_EVERY_MS: u64 = 2_000;

/// Events a run may take: seeds take thousands to tens of thousands, so far more means the
/// cluster loops (a livelock, or events that never let time pass) and the run must fail.
pub const MAX_EVENTS: u64 = 2_000_000;

/// A run's shape, chosen from its seed.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub servers: u64,
    pub replicas: u32,
    pub topics: usize,
    pub weather: Weather,
    pub lease_ms: u64,
    pub replace_after_ms: u64,
    /// Faults happen until then (ms of simulated time).
    pub faults_until_ms: u64,
    /// After the faults stop, the cluster must recover within this long.
    pub recovery_ms: u64,
    /// Mean pause between two random faults (`None`: only `script`).
    pub fault_every_ms: Option<u64>,
    /// Which random faults may happen.
    pub fault_kinds: Vec<&'static str>,
    /// Faults at fixed times (a scenario).
    pub script: Vec<(u64, Fault)>,
    pub batches: u32,
    pub window: usize,
    pub admin: bool,
    /// A group commit's fsync takes up to this long (ms).
    pub max_fsync_ms: u64,
    /// Topics keep at most this many bytes, evicting the slowest subscriptions beyond.
    pub backlog: Option<u64>,
    /// A consumer pauses this long between reads (so backlogs build up).
    pub consumer_pause_ms: u64,
    /// A producer pauses this long after each ack (so topics idle and wake again).
    pub producer_pause_ms: u64,
    /// Consumers read from replicas too (`client::ReadFrom::Replica`).
    pub replica_reads: bool,
    /// Applied entries a replica keeps before it compacts (small, so followers restart from
    /// the leader's state often).
    pub retention: crate::storage::Retention,
    /// Members of the naming group (1 or 3).
    pub naming_members: u64,
    /// How long a leader holds an idle follower's fetch before it parks (short, so topics
    /// park and wake often within a run).
    pub fetch_wait_ms: u64,
}

impl Config {
    /// A random cluster and fault mix for `seed` (swarm testing: each seed weighs the
    /// faults differently, so rare combinations come up).
    pub fn swarm(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
        let servers = rng.u64(3..=5);
        let replicas = match rng.u32(0..10) {
            0 => 1,
            1 => 2,
            2 if servers == 5 => 5,
            _ => 3,
        };
        let all = ["crash", "quick-restart", "pause", "isolate", "cut-naming", "naming", "fsync"];
        let fault_kinds: Vec<&'static str> = all.iter().copied().filter(|_| rng.u32(0..3) > 0).collect();
        let max_latency = [1, 2, 5, 10, 25][rng.usize(0..5)];
        // Fields drawn later come last, so older seeds keep their shape.
        let mut config = Self {
            seed,
            servers,
            replicas,
            topics: rng.usize(1..=2),
            weather: Weather {
                loss: [0.0, 0.0, 0.001, 0.01, 0.03][rng.usize(0..5)],
                duplication: [0.0, 0.0, 0.005, 0.02][rng.usize(0..4)],
                min_latency_ms: 1,
                max_latency_ms: max_latency,
            },
            lease_ms: 1_000,
            replace_after_ms: rng.u64(2_000..=6_000),
            faults_until_ms: rng.u64(10_000..=25_000),
            recovery_ms: 30_000,
            fault_every_ms: (!fault_kinds.is_empty()).then(|| rng.u64(500..=3_000)),
            fault_kinds,
            script: Vec::new(),
            batches: rng.u32(20..=60),
            window: rng.usize(1..=4),
            admin: rng.bool(),
            max_fsync_ms: 3,
            backlog: None,
            consumer_pause_ms: 0,
            producer_pause_ms: 0,
            replica_reads: false,
            retention: crate::storage::Retention::default(),
            naming_members: 1,
            fetch_wait_ms: REPLICA_FETCH_WAIT_MS,
        };
        config.max_fsync_ms = [1, 3, 10, 30][rng.usize(0..4)];
        if rng.u32(0..3) > 0 {
            config.fault_kinds.push("mid-group");
            config.fault_every_ms.get_or_insert(1_500);
        }
        config.backlog = (rng.u32(0..4) == 0).then(|| rng.u64(300..2_000));
        config.consumer_pause_ms = [0, 0, 100, 400][rng.usize(0..4)];
        if rng.u32(0..3) > 0 {
            config.fault_kinds.push("torn");
            config.fault_every_ms.get_or_insert(1_500);
        }
        let retained = [0, 4, 16, 64][rng.usize(0..4)];
        config.retention = crate::storage::Retention { retained, batch: 1 + retained / 2 };
        config.naming_members = if rng.u32(0..4) == 0 { 1 } else { 3 };
        if config.naming_members > 1 {
            for kind in ["naming-isolate", "naming-wipe"] {
                if rng.u32(0..3) > 0 {
                    config.fault_kinds.push(kind);
                    config.fault_every_ms.get_or_insert(1_500);
                }
            }
        }
        config.fetch_wait_ms = [REPLICA_FETCH_WAIT_MS, 1_000, 300, 100][rng.usize(0..4)];
        config.producer_pause_ms = [0, 0, 100, 250][rng.usize(0..4)];
        config.replica_reads = rng.bool();
        // F19: in a third of the runs whose topics have three replicas or more, a bit flips
        // once in one replica's chunk (a minority's copy), on a random server or the leader.
        if config.replicas >= 3 && rng.u32(0..3) == 0 {
            let at = rng.u64(1_000..config.faults_until_ms);
            let (server, pick) = (rng.u64(0..=servers), rng.u64(0..1 << 20));
            config.script.push((at, Fault::DamageChunk(server, pick)));
        }
        config
    }

    /// A calm cluster of three running `script`.
    pub fn scripted(seed: u64, servers: u64, naming_members: u64, script: Vec<(u64, Fault)>) -> Self {
        let faults_until_ms = script.iter().map(|(t, _)| *t).max().unwrap_or(0) + 1;
        Self {
            seed,
            servers,
            replicas: 3,
            topics: 1,
            weather: Weather::calm(),
            lease_ms: 1_000,
            replace_after_ms: 3_000,
            faults_until_ms,
            recovery_ms: 30_000,
            fault_every_ms: None,
            fault_kinds: Vec::new(),
            script,
            batches: 40,
            window: 2,
            admin: false,
            max_fsync_ms: 5,
            backlog: None,
            consumer_pause_ms: 0,
            producer_pause_ms: 0,
            replica_reads: false,
            retention: crate::storage::Retention { retained: 8, batch: 4 },
            naming_members,
            fetch_wait_ms: 300,
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub violations: Vec<Violation>,
    /// Events handled (a measure of the work done).
    pub events: u64,
    /// Simulated time at the end (ms).
    pub ended_ms: u64,
    /// The last events, newest last (for a failure report).
    pub trace: Vec<String>,
    pub acked: usize,
    pub elections: u64,
    /// Each topic's epoch at the end.
    pub epochs: BTreeMap<String, crate::types::Epoch>,
    /// Each topic's leader at the end.
    pub leaders: BTreeMap<String, ServerId>,
    /// What happened, counted (faults, elections, truncations, ...): what the run covered.
    pub stats: BTreeMap<&'static str, u64>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// A failure report: what broke, the last events, and how to replay it.
    pub fn report(&self, replay: &str) -> String {
        let verdict = if self.passed() { "passed" } else { "failed" };
        let mut out = format!("simulation seed {} {verdict} after {} events:\n", self.seed, self.events);
        for v in &self.violations {
            out.push_str(&format!("  - {v}\n"));
        }
        out.push_str("last events:\n");
        for line in &self.trace {
            out.push_str(&format!("  {line}\n"));
        }
        out.push_str(&format!("replay: {replay}\n"));
        out
    }
}

enum Event {
    Deliver(Message),
    ServerTimer(ServerId, u64),
    GroupDone(ServerId, u64),
    /// Naming member `m`'s clock, for its incarnation.
    NamingTimer(u64, u64),
    /// A Raft message of naming member `from` (that incarnation) to member `to` was lost; its
    /// sender hears so when the driver's send times out (`snapshot`: it carried one).
    NamingUndelivered {
        from: u64,
        incarnation: u64,
        to: u64,
        snapshot: bool,
    },
    ClientTimer(usize),
    Fault(Fault),
    RandomFault,
    Heal,
}

pub static PROFILE: std::sync::Mutex<BTreeMap<String, u64>> = std::sync::Mutex::new(BTreeMap::new());

/// Events of the run kept for a failure report (`HERALD_SIM_TRACE` for more).
fn trace_len() -> usize {
    std::env::var("HERALD_SIM_TRACE").ok().and_then(|v| v.parse().ok()).unwrap_or(60)
}

struct World {
    config: Config,
    rng: fastrand::Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    net: Net,
    naming: SimNaming,
    servers: BTreeMap<ServerId, SimServer>,
    clients: Vec<SimClient>,
    checker: Checker,
    clock: Arc<AtomicU64>,
    ids: Arc<AtomicU64>,
    /// Events for paused nodes, replayed when they resume.
    stash: BTreeMap<NodeId, Vec<Event>>,
    /// How far each replica's committed records were compared: (server, topic) -> offset.
    compared: BTreeMap<(ServerId, TopicId), u64>,
    trace: std::collections::VecDeque<String>,
    events: u64,
    faulting: bool,
    topics: Vec<TopicName>,
    /// Servers to crash during their next group commit.
    crash_mid_group: std::collections::BTreeSet<ServerId>,
    /// Topics the naming group created for the run.
    created: std::collections::BTreeSet<TopicName>,
    /// When the run last asked the naming group to create its topics.
    setup_asked_at: Option<u64>,
    /// The newest book version a naming leader of each term applied: no leader of a later
    /// term may hold less.
    book_seen: BTreeMap<u64, u64>,
    stats: BTreeMap<&'static str, u64>,
}

/// Runs the simulation of `config` to its end; the result says what broke, if anything.
pub fn run(config: Config) -> Outcome {
    let mut world = World::new(config);
    world.run();
    world.finish()
}

impl World {
    fn new(config: Config) -> Self {
        let settings = Settings::new(config.lease_ms, config.replace_after_ms);
        let mut world = Self {
            rng: fastrand::Rng::with_seed(config.seed),
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            net: Net::new(config.weather),
            naming: SimNaming::new(settings, config.naming_members),
            servers: (1..=config.servers).map(|id| (id, SimServer::new(id))).collect(),
            clients: Vec::new(),
            checker: Checker::default(),
            clock: Arc::new(AtomicU64::new(0)),
            ids: Arc::new(AtomicU64::new(1)),
            stash: BTreeMap::new(),
            compared: BTreeMap::new(),
            trace: std::collections::VecDeque::new(),
            events: 0,
            faulting: true,
            crash_mid_group: std::collections::BTreeSet::new(),
            created: std::collections::BTreeSet::new(),
            setup_asked_at: None,
            book_seen: BTreeMap::new(),
            stats: BTreeMap::new(),
            topics: (0..config.topics).map(|i| TopicName::new(format!("t{i}")).expect("name")).collect(),
            config,
        };
        for id in 1..=world.config.servers {
            world.start_server(id);
        }
        for m in 1..=world.config.naming_members {
            world.start_naming(m);
        }
        let script = world.config.script.clone();
        for (t, f) in script {
            world.at(t, Event::Fault(f));
        }
        if let Some(every) = world.config.fault_every_ms {
            let first = every + world.rng.u64(0..every);
            world.at(first, Event::RandomFault);
        }
        world.at(world.config.faults_until_ms, Event::Heal);
        world
    }

    fn at(&mut self, time: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((time.max(self.now), self.seq), event);
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    /// Counts what a trace line says happened.
    fn count_line(&mut self, line: &str) {
        const KINDS: &[(&str, &str)] = &[
            ("elected", "elections won"),
            ("no majority", "elections failed"),
            ("joins as a learner", "replacements started"),
            ("votes now", "learners promoted"),
            ("leaves (epoch", "voters removed"),
            ("called off", "replacements called off"),
            ("Truncate(", "truncations"),
            ("Reset(", "follower resets"),
            ("will not lead", "old epochs refused"),
            ("stops:", "fatal group failures"),
            ("leads the group", "naming leaders"),
            ("told all its topics", "full assignment lists"),
            ("told the changes since", "assignment changes"),
            ("is back and caught up", "preferred leader returns"),
            ("its preferred leader,", "preferred leaders elected"),
            ("asked for all its reports", "reports resent on request"),
            ("for its list", "follower lists asked for"),
            ("parked fetch woken", "parked fetches woken"),
            ("park poll to", "park polls failed"),
            ("at a replica that knows", "reads at a replica"),
            ("repaired from a peer's copy", "chunks repaired"),
            ("not repaired yet", "chunk repairs retried"),
        ];
        for (needle, what) in KINDS {
            if line.contains(needle) {
                self.count(what);
            }
        }
    }

    fn note(&mut self, line: String) {
        self.count_line(&line);
        if self.trace.len() == trace_len() {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>7} ms {line}", self.now));
    }

    fn timing(&self) -> Timing {
        Timing {
            lease_ms: self.config.lease_ms,
            min_fsync_ms: 0,
            max_fsync_ms: self.config.max_fsync_ms,
            retention: self.config.retention,
            naming_members: self.config.naming_members,
            fetch_wait_ms: self.config.fetch_wait_ms,
            scrub_every_ms: SCRUB_EVERY_MS,
        }
    }

    fn start_server(&mut self, id: ServerId) {
        let (clock, ids, timing) = (self.clock.clone(), self.ids.clone(), self.timing());
        let mut out = Vec::new();
        let server = self.servers.get_mut(&id).expect("server");
        if server.run.is_some() {
            return;
        }
        let mut ctx = Ctx { now: self.now, rng: &mut self.rng, out: &mut out, checker: &mut self.checker };
        if let Err(e) = server.start(&mut ctx, clock, ids, timing) {
            self.checker.violations.push(Violation(e));
            return;
        }
        let inc = server.incarnation;
        self.note(format!("server {id} starts"));
        self.send_all(out);
        self.at(self.now, Event::ServerTimer(id, inc));
        self.after_server(id);
    }

    fn start_naming(&mut self, m: u64) {
        if self.naming.is_up(m) {
            return;
        }
        if let Err(e) = self.naming.start(m) {
            self.checker.violations.push(Violation(e));
            return;
        }
        self.note(format!("naming member {m} starts"));
        let inc = self.naming.members[&m].incarnation;
        self.at(self.now, Event::NamingTimer(m, inc));
    }

    /// Takes what the naming group said back.
    fn heard(&mut self, heard: naming::Heard, member: u64) {
        // A leader of term T holds every change a leader of an earlier term applied (they
        // were committed): the book never goes back.
        let leaders: Vec<(u64, u64, u64)> = self.naming.leaders().collect();
        for (leader, term, version) in leaders {
            let earlier = self.book_seen.range(..term).map(|(_, v)| *v).max().unwrap_or(0);
            if version < earlier {
                self.checker.violations.push(Violation(format!(
                    "the naming book went back: leader {leader} of term {term} holds version {version}, a leader of an earlier term held {earlier}"
                )));
            }
            let seen = self.book_seen.entry(term).or_default();
            *seen = (*seen).max(version);
        }
        for n in heard.notes {
            self.note(n);
        }
        for (name, result) in heard.created {
            match result {
                Ok(()) => {
                    self.created.insert(name);
                }
                Err(e) => self.note(format!("creating {name}: {e}")),
            }
        }
        if let Some(e) = heard.fatal {
            // The process exits; a supervisor starts it again a little later.
            self.note(e);
            self.naming.crash(member);
            let back = self.now + self.rng.u64(200..2_000);
            self.at(back, Event::Fault(Fault::RestartNaming(member)));
        }
    }

    fn run(&mut self) {
        let end = self.config.faults_until_ms + self.config.recovery_ms;
        while let Some(((time, _), event)) = self.queue.pop_first() {
            if time > end || !self.checker.violations.is_empty() {
                break;
            }
            if self.events >= MAX_EVENTS {
                self.checker.violations.push(Violation(format!(
                    "over {MAX_EVENTS} events by {time} ms: something loops (a livelock, or events that never let time pass)"
                )));
                break;
            }
            self.now = time;
            self.clock.store(time, Ordering::Relaxed);
            self.events += 1;
            if std::env::var("HERALD_SIM_PROFILE").is_ok() {
                let kind = match &event {
                    Event::Deliver(m) => match &m.payload {
                        Payload::Request { req, .. } => crate::transport::request_name(req).to_string(),
                        Payload::Response { .. } => format!(
                            "response to {}",
                            if m.to >= FIRST_CLIENT {
                                "client"
                            } else if is_naming(m.to) {
                                "naming"
                            } else {
                                "server"
                            }
                        ),
                        Payload::Raft { .. } => "raft".into(),
                    },
                    Event::ServerTimer(..) => "server timer".into(),
                    Event::GroupDone(..) => "group".into(),
                    Event::NamingTimer(..) => "naming timer".into(),
                    Event::ClientTimer(..) => "client timer".into(),
                    _ => "other".into(),
                };
                *PROFILE.lock().unwrap().entry(kind).or_default() += 1;
            }
            self.handle(event);
            for line in server::NOTES.with(|n| std::mem::take(&mut *n.borrow_mut())) {
                self.note(line);
            }
            if !self.faulting
                && self.events % 64 == 0
                && self.recovered()
                && self.assignments_converged().is_ok()
                && self.damage_repaired().is_ok()
                && self.leaders_returned().is_ok()
                && self.leaders_serve().is_ok()
            {
                break;
            }
        }
    }

    /// Every producer had everything acknowledged, and every consumer read it all.
    /// Long after the faults stopped, every running server hosts exactly its topics of the
    /// book, as the book assigns them (heartbeat answers that carry changes lose none).
    fn assignments_converged(&self) -> Result<(), String> {
        let Some(book) = self.naming.book() else { return Ok(()) };
        let replica = |id: &ServerId| ReplicaInfo { server: *id, addr: book.servers[id].addr };
        for (id, s) in &self.servers {
            let Some(run) = &s.run else { continue };
            let hosted = run.assignments();
            let mut expected = BTreeMap::new();
            for t in book.topics.values().filter(|t| t.members().any(|r| r == *id)) {
                let assignment = Assignment {
                    leader: t.leader,
                    epoch: t.epoch,
                    voters: t.voters.iter().map(replica).collect(),
                    learners: t.learners.iter().map(replica).collect(),
                };
                expected.insert(t.id, Some(assignment));
            }
            if hosted != expected {
                return Err(format!(
                    "server {id} hosts {hosted:?}, but book version {} assigns it {expected:?}",
                    book.version
                ));
            }
        }
        Ok(())
    }

    /// Long after the faults stopped, every chunk the `DamageChunk` fault damaged is repaired
    /// from a peer's copy, or gone with the records every subscription has read (F19).
    fn damage_repaired(&self) -> Result<(), String> {
        for (id, s) in &self.servers {
            let Some(run) = &s.run else { continue };
            for (topic, base) in &s.damaged {
                if !matches!(run.store.damaged_chunk_end(*topic, *base, 0), Ok(None)) {
                    return Err(format!("server {id} still holds topic {topic}'s chunk at {base} damaged"));
                }
            }
        }
        Ok(())
    }

    /// Long after the faults stopped, every topic whose preferred leader runs is led by it
    /// (leadership returns once that server caught up and stayed up for the pause).
    fn leaders_returned(&self) -> Result<(), String> {
        let Some(book) = self.naming.book() else { return Ok(()) };
        for t in book.topics.values() {
            let preferred = t.preferred();
            let up = self.servers.get(&preferred).is_some_and(|s| s.run.is_some() && !s.paused);
            if up && t.learners.is_empty() && t.leader != preferred {
                let why = self.naming.core().map(|c| c.preferred_ready(t, self.now));
                return Err(format!(
                    "{} is led by {}, not by its preferred leader {preferred} ({why:?})",
                    t.name, t.leader
                ));
            }
        }
        Ok(())
    }

    /// Long after the faults stopped, the leader of every topic whose replicas all run
    /// serves its consumers: it is ready and hears from a majority, while idle too (fetches
    /// then wait long, and `FollowerAlive` is its contact).
    fn leaders_serve(&self) -> Result<(), String> {
        let Some(book) = self.naming.book() else { return Ok(()) };
        let running = |id: &ServerId| self.servers.get(id).is_some_and(|s| s.run.is_some() && !s.paused);
        for t in book.topics.values().filter(|t| t.members().all(|m| running(&m))) {
            let leader = self.servers[&t.leader].run.as_ref().expect("running");
            if let Err(e) = leader.serving(t.id, self.now) {
                return Err(format!("{}: leader {} does not serve: {e}", t.name, t.leader));
            }
        }
        Ok(())
    }

    fn recovered(&self) -> bool {
        let produced =
            self.clients.iter().all(|c| !matches!(c.work, Work::Produce { .. }) || c.produced_all());
        produced && self.consumers_caught_up().is_ok()
    }

    /// Every acked record reached its topic's consumer.
    fn consumers_caught_up(&self) -> Result<(), String> {
        for (topic, offset) in self.checker.acked.keys() {
            if !self.checker.read.contains(&(*topic, *offset)) && !self.checker.excused(*topic, *offset) {
                return Err(format!("acked offset {offset} of topic {topic} has not reached its consumer"));
            }
        }
        Ok(())
    }

    fn is_paused(&self, node: NodeId) -> bool {
        if is_naming(node) {
            return self.naming.members.get(&(node - NAMING_BASE)).is_some_and(|m| m.paused);
        }
        self.servers.get(&node).is_some_and(|s| s.paused)
    }

    fn handle(&mut self, event: Event) {
        let target = match &event {
            Event::Deliver(m) => Some(m.to),
            Event::ServerTimer(id, _) | Event::GroupDone(id, _) => Some(server_node(*id)),
            Event::NamingTimer(m, _) => Some(naming_node(*m)),
            _ => None,
        };
        if let Some(node) = target.filter(|n| self.is_paused(*n)) {
            self.stash.entry(node).or_default().push(event);
            return;
        }
        match event {
            Event::Deliver(msg) => self.deliver(msg),
            Event::ServerTimer(id, inc) => {
                if self.servers[&id].incarnation != inc {
                    return;
                }
                self.with_server(id, |run, ctx| {
                    run.tick(ctx);
                    Ok(())
                });
                if let Some(run) = self.servers[&id].run.as_ref() {
                    let next = run.next_timer(self.now);
                    self.at(next, Event::ServerTimer(id, inc));
                }
            }
            Event::GroupDone(id, inc) => {
                if self.servers[&id].incarnation != inc {
                    return;
                }
                self.count("group commits");
                self.with_server(id, |run, ctx| run.finish_group(ctx));
                self.compare_committed(id);
            }
            Event::NamingTimer(m, inc) => {
                if self.naming.members[&m].incarnation != inc {
                    return;
                }
                self.with_naming(m, |naming, ctx, next_id| naming.tick(ctx, m, next_id));
                // Uneven clocks: election timeouts are not randomized in a run (it stays a
                // function of its seed), so the ticks are.
                let tick = crate::naming::raft::TICK_MS;
                let next = self.now + tick - tick / 5 + self.rng.u64(0..=2 * tick / 5);
                self.at(next, Event::NamingTimer(m, inc));
                self.check_setup();
            }
            Event::NamingUndelivered { from, incarnation, to, snapshot } => {
                if self.naming.members.get(&from).is_none_or(|m| m.incarnation != incarnation) {
                    return;
                }
                self.with_naming(from, |naming, ctx, next_id| {
                    naming.undelivered(ctx, from, to, snapshot, next_id)
                });
            }
            Event::ClientTimer(i) => {
                // A producer starts once its topic's consumer has its subscription: every
                // acked record then has a reader that must get it.
                let gated = matches!(self.clients[i].work, Work::Produce { .. })
                    && self.clients.iter().any(|c| {
                        c.topic == self.clients[i].topic && c.subscription().is_some() && !c.is_ready()
                    });
                if gated {
                    self.at(self.now + 20, Event::ClientTimer(i));
                    return;
                }
                let mut out = Vec::new();
                {
                    let ids = self.ids.clone();
                    let mut next_id = move || ids.fetch_add(1, Ordering::Relaxed);
                    let mut ctx =
                        Ctx { now: self.now, rng: &mut self.rng, out: &mut out, checker: &mut self.checker };
                    self.clients[i].tick(&mut ctx, &mut next_id);
                }
                self.send_all(out);
                let next = self.clients[i].next_timer(self.now);
                self.at(next, Event::ClientTimer(i));
            }
            Event::Fault(f) => self.fault(f),
            Event::RandomFault => {
                if self.faulting {
                    if let Some(f) = self.random_fault() {
                        self.fault(f);
                    }
                    let every = self.config.fault_every_ms.unwrap_or(1_000);
                    let next = self.now + every / 2 + self.rng.u64(0..every);
                    self.at(next, Event::RandomFault);
                }
            }
            Event::Heal => self.heal(),
        }
    }

    /// Runs `f` on a live server with a context, then sends what it sent and starts its next
    /// group; a server that must stop (a fatal commit failure) crashes.
    fn with_server(
        &mut self,
        id: ServerId,
        f: impl FnOnce(&mut server::Running, &mut Ctx) -> Result<(), String>,
    ) {
        let mut out = Vec::new();
        let result = {
            let Some(run) = self.servers.get_mut(&id).and_then(|s| s.run.as_mut()) else { return };
            let mut ctx =
                Ctx { now: self.now, rng: &mut self.rng, out: &mut out, checker: &mut self.checker };
            f(run, &mut ctx)
        };
        self.send_all(out);
        match result {
            Ok(()) => self.after_server(id),
            Err(e) => {
                // The process exits; a supervisor starts it again a little later.
                self.note(e);
                self.crash(id);
                let back = self.now + self.rng.u64(200..2_000);
                self.at(back, Event::Fault(Fault::Restart(id)));
            }
        }
    }

    fn after_server(&mut self, id: ServerId) {
        let mut out = Vec::new();
        let done = {
            let Some(server) = self.servers.get_mut(&id) else { return };
            let inc = server.incarnation;
            let Some(run) = server.run.as_mut() else { return };
            let mut ctx =
                Ctx { now: self.now, rng: &mut self.rng, out: &mut out, checker: &mut self.checker };
            let done = run.start_group(&mut ctx).map(|t| (t, inc));
            if done.is_some() {
                // Followers waiting see the group's entries before its fsync (as the state
                // watch wakes them in the server).
                run.poll(&mut ctx);
            }
            done
        };
        self.send_all(out);
        if let Some((t, inc)) = done {
            self.at(t, Event::GroupDone(id, inc));
            if self.crash_mid_group.remove(&id) {
                // The power goes while the group's fsync is under way; back within a lease.
                let at = self.now + self.rng.u64(0..=t.saturating_sub(self.now));
                self.at(at, Event::Fault(Fault::Crash(id)));
                let back = at + self.rng.u64(10..self.config.lease_ms / 2);
                self.at(back, Event::Fault(Fault::Restart(id)));
            }
        }
    }

    /// Runs `f` on the naming group for member `m`, then sends what it sent and takes in what
    /// it heard.
    fn with_naming(
        &mut self,
        m: u64,
        f: impl FnOnce(&mut SimNaming, &mut Ctx, &mut dyn FnMut() -> u64) -> naming::Heard,
    ) {
        let mut out = Vec::new();
        let heard = {
            let ids = self.ids.clone();
            let mut next_id = move || ids.fetch_add(1, Ordering::Relaxed);
            let mut ctx =
                Ctx { now: self.now, rng: &mut self.rng, out: &mut out, checker: &mut self.checker };
            f(&mut self.naming, &mut ctx, &mut next_id)
        };
        self.send_all(out);
        self.heard(heard, m);
    }

    fn send_all(&mut self, out: Vec<Message>) {
        for msg in out {
            let times = self.net.send(&mut self.rng, self.now, &msg);
            if times.is_empty() {
                self.naming_undelivered(&msg);
            }
            for t in times {
                self.at(t, Event::Deliver(msg.clone()));
            }
        }
    }

    /// A naming member's Raft message that will not arrive: the real driver's send times out
    /// and tells Raft (`NamingMember::undelivered`), so the simulated one does too.
    fn naming_undelivered(&mut self, msg: &Message) {
        let Payload::Raft { msg: raft, .. } = &msg.payload else { return };
        if !is_naming(msg.from) || !is_naming(msg.to) {
            return;
        }
        let from = msg.from - NAMING_BASE;
        let Some(incarnation) = self.naming.members.get(&from).map(|m| m.incarnation) else { return };
        let snapshot = raft.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
        let at = self.now + crate::naming::RAFT_SEND_TIMEOUT.as_millis() as u64;
        let to = msg.to - NAMING_BASE;
        self.count(if snapshot { "naming snapshots lost" } else { "naming messages lost" });
        self.at(at, Event::NamingUndelivered { from, incarnation, to, snapshot });
    }

    fn deliver(&mut self, msg: Message) {
        if self.net.is_blocked(msg.from, msg.to) {
            self.naming_undelivered(&msg);
            return;
        }
        if is_naming(msg.to) && !self.naming.is_up(msg.to - NAMING_BASE) {
            self.naming_undelivered(&msg);
        }
        let ids = self.ids.clone();
        let mut next_id = move || ids.fetch_add(1, Ordering::Relaxed);
        match msg.to {
            to if is_naming(to) => {
                let member = to - NAMING_BASE;
                self.with_naming(member, |naming, ctx, next_id| naming.handle(ctx, member, msg, next_id));
            }
            to if to >= FIRST_CLIENT => {
                let i = (to - FIRST_CLIENT) as usize;
                let mut out = Vec::new();
                {
                    let mut ctx =
                        Ctx { now: self.now, rng: &mut self.rng, out: &mut out, checker: &mut self.checker };
                    self.clients[i].handle(&mut ctx, msg, &mut next_id);
                }
                self.send_all(out);
            }
            to => {
                if let Payload::Request { req, .. } = &msg.payload {
                    if !matches!(
                        **req,
                        Request::ReplicaFetch { .. }
                            | Request::FollowerAlive { .. }
                            | Request::Heartbeat { .. }
                            | Request::Fetch { .. }
                            | Request::Read { .. }
                            | Request::Ack { .. }
                    ) {
                        let what = crate::transport::request_name(req);
                        self.note(format!("{} -> server {to}: {what}", msg.from));
                    }
                }
                self.with_server(to, |run, ctx| {
                    run.handle(ctx, msg);
                    Ok(())
                });
            }
        }
        self.check_setup();
    }

    /// Creates the topics once enough servers registered, then starts the clients (the
    /// consumers' subscriptions first, so every acked record has a reader).
    fn check_setup(&mut self) {
        if !self.clients.is_empty() {
            return;
        }
        if self.created.len() < self.topics.len() {
            let Some(leader) = self.naming.leader() else { return };
            if self.setup_asked_at.is_some_and(|t| self.now < t + 500) {
                return;
            }
            let core = self.naming.members[&leader].member.as_ref().and_then(|m| m.core()).expect("leads");
            let live = core.list_servers(self.now).iter().filter(|s| s.alive).count() as u64;
            if live < self.config.servers {
                return;
            }
            self.setup_asked_at = Some(self.now);
            let ids = self.ids.clone();
            let mut next_id = move || ids.fetch_add(1, Ordering::Relaxed);
            let missing: Vec<TopicName> =
                self.topics.iter().filter(|n| !self.created.contains(*n)).cloned().collect();
            for name in missing {
                let replicas = self.config.replicas.min(self.config.servers as u32);
                let config = TopicConfig {
                    backlog_limit: self.config.backlog,
                    backlog_policy: crate::wire::BacklogPolicy::Evict,
                    ..TopicConfig::default()
                };
                let mut out = Vec::new();
                let heard = {
                    let mut ctx =
                        Ctx { now: self.now, rng: &mut self.rng, out: &mut out, checker: &mut self.checker };
                    self.naming.create(&mut ctx, name, replicas, config, &mut next_id)
                };
                self.send_all(out);
                self.heard(heard, leader);
            }
            return;
        }
        for (i, name) in self.topics.clone().into_iter().enumerate() {
            let producer = 0x1000 + i as u64;
            let members = self.config.naming_members;
            self.clients.push(SimClient::new(
                FIRST_CLIENT + self.clients.len() as NodeId,
                members,
                name.clone(),
                Work::Consume {
                    subscription: format!("c{i}"),
                    pause_ms: self.config.consumer_pause_ms,
                    from_replicas: self.config.replica_reads,
                },
            ));
            self.clients.push(SimClient::new(
                FIRST_CLIENT + self.clients.len() as NodeId,
                members,
                name.clone(),
                Work::Produce {
                    producer,
                    batches: self.config.batches,
                    window: self.config.window,
                    pause_ms: self.config.producer_pause_ms,
                },
            ));
            if self.config.admin {
                self.clients.push(SimClient::new(
                    FIRST_CLIENT + self.clients.len() as NodeId,
                    members,
                    name,
                    Work::Admin { names: vec!["a0".into(), "a1".into()] },
                ));
            }
        }
        for i in 0..self.clients.len() {
            // Producers start a little after consumers created their subscriptions.
            let start = if matches!(self.clients[i].work, Work::Produce { .. }) { 300 } else { 0 };
            self.at(self.now + start, Event::ClientTimer(i));
        }
    }

    fn random_fault(&mut self) -> Option<Fault> {
        let kinds = self.config.fault_kinds.clone();
        let kind = kinds[self.rng.usize(0..kinds.len())];
        let server = self.rng.u64(1..=self.config.servers);
        let up = self.servers[&server].run.is_some();
        match kind {
            "crash" if up => {
                let back = self.now + self.rng.u64(200..4_000);
                self.at(back, Event::Fault(Fault::Restart(server)));
                Some(Fault::Crash(server))
            }
            "quick-restart" if up => {
                // Back within a lease: the power-loss case of a leader that must not lead
                // its old epoch again.
                let back = self.now + self.rng.u64(10..(self.config.lease_ms / 2));
                self.at(back, Event::Fault(Fault::Restart(server)));
                Some(Fault::Crash(server))
            }
            "mid-group" if up => {
                self.crash_mid_group.insert(server);
                None
            }
            "pause" if up && !self.servers[&server].paused => {
                let back = self.now + self.rng.u64(300..3_000);
                self.at(back, Event::Fault(Fault::Resume(server)));
                Some(Fault::Pause(server))
            }
            "isolate" => {
                let back = self.now + self.rng.u64(300..4_000);
                self.at(back, Event::Fault(Fault::Isolate(server, false)));
                Some(Fault::Isolate(server, true))
            }
            "cut-naming" => {
                let back = self.now + self.rng.u64(500..(2 * self.config.replace_after_ms));
                self.at(back, Event::Fault(Fault::CutFromNaming(server, false)));
                Some(Fault::CutFromNaming(server, true))
            }
            "naming" => {
                // The leader half the time (the hardest case: mid-election, mid-commit).
                let m = if self.rng.bool() { 0 } else { self.rng.u64(1..=self.config.naming_members) };
                let back = self.now + self.rng.u64(50..3_000);
                let restart = if m == 0 { self.naming.leader().unwrap_or(1) } else { m };
                self.at(back, Event::Fault(Fault::RestartNaming(restart)));
                Some(Fault::CrashNaming(restart))
            }
            "naming-isolate" => {
                let m = self.rng.u64(1..=self.config.naming_members);
                let back = self.now + self.rng.u64(300..4_000);
                self.at(back, Event::Fault(Fault::IsolateNaming(m, false)));
                Some(Fault::IsolateNaming(m, true))
            }
            "naming-wipe" => {
                // Only while the others are up: a group that lost a majority's disks is lost.
                // Only one disk at a time: the others must be up and hold the whole book (a
                // group that lost a majority's disks has lost the book, in any Raft system).
                let m = self.rng.u64(1..=self.config.naming_members);
                let versions: Vec<Option<(u64, bool)>> = (1..=self.config.naming_members)
                    .filter(|o| *o != m)
                    .map(|o| {
                        self.naming.members[&o].member.as_ref().map(|n| {
                            let s = n.status();
                            (s.book_version, s.rebuilding)
                        })
                    })
                    .collect();
                let whole = versions.iter().all(|v| v.is_some_and(|(_, rebuilding)| !rebuilding))
                    && versions.windows(2).all(|w| w[0].map(|v| v.0) == w[1].map(|v| v.0));
                if !whole {
                    return None;
                }
                let back = self.now + self.rng.u64(50..2_000);
                self.at(back, Event::Fault(Fault::RestartNaming(m)));
                Some(Fault::WipeNaming(m))
            }
            "fsync" if up => Some(Fault::FailSync(server)),
            "torn" if up => Some(Fault::TornWrite(server, self.rng.u64(1..40))),
            _ => None,
        }
    }

    fn crash(&mut self, id: ServerId) {
        if let Some(s) = self.servers.get_mut(&id) {
            s.crash();
            s.paused = false;
        }
        self.stash.remove(&server_node(id));
    }

    fn fault(&mut self, f: Fault) {
        self.note(format!("fault: {f:?}"));
        let kind = match f {
            Fault::Crash(_) => "crashes (power cuts)",
            Fault::Restart(_) => "restarts",
            Fault::Pause(_) => "pauses",
            Fault::Resume(_) => "resumes",
            Fault::Isolate(_, true) => "isolations",
            Fault::CutFromNaming(_, true) => "cuts from the naming group",
            Fault::CrashNaming(_) => "naming member crashes",
            Fault::IsolateNaming(_, true) => "naming member isolations",
            Fault::WipeNaming(_) => "naming member wipes",
            Fault::FailSync(_) => "failed fsyncs",
            Fault::TornWrite(..) => "torn writes",
            // Counted once done (it waits for a group being written).
            Fault::DamageChunk(..) => "",
            _ => "heals",
        };
        if !kind.is_empty() {
            self.count(kind);
        }
        match f {
            Fault::Crash(id) => self.crash(id),
            Fault::Restart(id) => self.start_server(id),
            Fault::Pause(id) => {
                if let Some(s) = self.servers.get_mut(&id).filter(|s| s.run.is_some()) {
                    s.paused = true;
                }
            }
            Fault::Resume(id) => self.resume(server_node(id)),
            Fault::Isolate(id, cut) => {
                let others: Vec<NodeId> = (1..=self.config.naming_members)
                    .map(naming_node)
                    .chain((1..=self.config.servers).filter(|s| *s != id))
                    .chain((0..self.clients.len() as NodeId).map(|c| FIRST_CLIENT + c))
                    .collect();
                for o in others {
                    self.net.cut(server_node(id), o, cut);
                }
            }
            Fault::CutFromNaming(id, cut) => {
                for m in 1..=self.config.naming_members {
                    self.net.cut(server_node(id), naming_node(m), cut);
                }
            }
            Fault::CrashNaming(m) => {
                let m = if m == 0 { self.naming.leader().unwrap_or(1) } else { m };
                self.naming.crash(m);
                self.stash.remove(&naming_node(m));
            }
            Fault::WipeNaming(m) => {
                self.naming.wipe(m);
                self.stash.remove(&naming_node(m));
            }
            Fault::RestartNaming(0) => {
                for m in 1..=self.config.naming_members {
                    self.start_naming(m);
                }
            }
            Fault::RestartNaming(m) => self.start_naming(m),
            Fault::IsolateNaming(0, false) => {
                for m in 1..=self.config.naming_members {
                    self.fault(Fault::IsolateNaming(m, false));
                }
            }
            Fault::IsolateNaming(0, true) => {
                let m = self.naming.leader().unwrap_or(1);
                self.fault(Fault::IsolateNaming(m, true));
            }
            Fault::IsolateNaming(m, cut) => {
                let others: Vec<NodeId> = (1..=self.config.naming_members)
                    .filter(|o| *o != m)
                    .map(naming_node)
                    .chain((1..=self.config.servers).map(server_node))
                    .chain((0..self.clients.len() as NodeId).map(|c| FIRST_CLIENT + c))
                    .collect();
                for o in others {
                    self.net.cut(naming_node(m), o, cut);
                }
            }
            Fault::FailSync(id) => {
                if let Some(s) = self.servers.get(&id) {
                    s.disk.fail_syncs(1);
                }
            }
            Fault::TornWrite(id, n) => {
                if let Some(s) = self.servers.get(&id) {
                    s.disk.cut_after_writes(n);
                }
            }
            Fault::DamageChunk(id, pick) => {
                let Some(book) = self.naming.book() else { return };
                let Some(topic) = book.topics.values().min_by_key(|t| t.id) else { return };
                let (topic, id) = (topic.id, if id == 0 { topic.leader } else { id });
                let Some(server) = self.servers.get_mut(&id) else { return };
                match server.damage_chunk(topic, pick) {
                    // A group is being written: the disk is damaged right after it.
                    Err(()) => self.at(self.now + 1, Event::Fault(Fault::DamageChunk(id, pick))),
                    Ok(Some(base)) => {
                        self.count("damaged chunks");
                        self.note(format!("server {id}: topic {topic}'s chunk at {base} damaged"));
                    }
                    Ok(None) => {
                        self.note(format!("server {id}: no committed chunk of topic {topic} to damage"))
                    }
                }
            }
        }
    }

    fn resume(&mut self, node: NodeId) {
        if is_naming(node) {
            if let Some(m) = self.naming.members.get_mut(&(node - NAMING_BASE)) {
                m.paused = false;
            }
        } else if let Some(s) = self.servers.get_mut(&node) {
            s.paused = false;
        }
        for e in self.stash.remove(&node).unwrap_or_default() {
            self.at(self.now, e);
        }
    }

    /// The faults stop: every process runs again, every link heals.
    fn heal(&mut self) {
        self.faulting = false;
        self.note("faults stop; everything heals".into());
        self.net.heal();
        self.net.weather = Weather { loss: 0.0, duplication: 0.0, ..self.net.weather };
        for m in 1..=self.config.naming_members {
            self.start_naming(m);
            self.resume(naming_node(m));
        }
        for id in 1..=self.config.servers {
            self.servers[&id].disk.fail_syncs(0);
            self.servers[&id].disk.disarm();
            self.resume(server_node(id));
            self.start_server(id);
        }
        // Every topic must commit again: a new producer's batches must all be acked.
        if !self.clients.is_empty() {
            for (i, name) in self.topics.clone().into_iter().enumerate() {
                let node = FIRST_CLIENT + self.clients.len() as NodeId;
                let work = Work::Produce { producer: 0x2000 + i as u64, batches: 3, window: 1, pause_ms: 0 };
                self.clients.push(SimClient::new(node, self.config.naming_members, name, work));
                self.at(self.now, Event::ClientTimer(self.clients.len() - 1));
            }
        }
    }

    /// Compares the records below a replica's commit point with everything seen committed.
    fn compare_committed(&mut self, id: ServerId) {
        let Some(run) = self.servers.get(&id).and_then(|s| s.run.as_ref()) else { return };
        let mut seen = Vec::new();
        for (topic, replica) in run.replicas() {
            let state = replica.log.state();
            let from = self.compared.get(&(id, topic)).copied().unwrap_or(0).max(state.log_start);
            if from >= state.commit {
                continue;
            }
            match crate::server::read_committed(
                &run.store,
                &replica.log,
                &state,
                None,
                from,
                10_000,
                u32::MAX,
            ) {
                Ok(Some(records)) => {
                    let records = match records.decode() {
                        Ok(records) => records,
                        Err(e) => {
                            self.checker
                                .violations
                                .push(Violation(format!("server {id}, topic #{topic}: {e}")));
                            continue;
                        }
                    };
                    for r in &records {
                        seen.push((topic, r.offset, String::from_utf8_lossy(&r.record.payload).to_string()));
                    }
                    let upto = records.last().map_or(from, |r| r.offset + 1);
                    self.compared.insert((id, topic), upto);
                }
                Ok(None) => {}
                Err(e) => seen.push((topic, u64::MAX, format!("{e}"))),
            }
        }
        for (topic, offset, payload) in seen {
            if offset == u64::MAX {
                continue; // deleted meanwhile
            }
            self.checker.saw_committed(topic, offset, &payload, &format!("replica {id}"));
        }
    }

    /// The cluster's state, for a failure report.
    fn dump(&self) -> String {
        let mut out = String::new();
        for t in self.naming.book().map(|b| b.topics.values().collect::<Vec<_>>()).unwrap_or_default() {
            out.push_str(&format!(
                "    book {}: id {} leader {} epoch {} (elections to {}) voters {:?} learners {:?} replacing {:?}\n",
                t.name, t.id, t.leader, t.epoch, t.election_epoch, t.voters, t.learners, t.replacing
            ));
        }
        for (id, s) in &self.servers {
            let Some(run) = &s.run else {
                out.push_str(&format!("    server {id}: down\n"));
                continue;
            };
            for (topic, r) in run.replicas() {
                let st = r.log.state();
                out.push_str(&format!(
                    "    server {id} topic {topic}: {:?} leading {:?} ready {} promised {} epoch {} entries {}..{} commit {}/{} applied {} records {}..{}\n",
                    r.role(), st.leading, r.ready(), st.promised, st.epoch, st.start_index, st.end_index,
                    st.commit_index, st.commit, st.applied, st.log_start, st.log_end
                ));
            }
        }
        for c in &self.clients {
            out.push_str(&format!("    client {}: {}\n", c.node, c.describe()));
        }
        out
    }

    fn finish(mut self) -> Outcome {
        if self.checker.violations.is_empty() {
            if self.faulting {
                self.checker.violations.push(Violation("the run ended before the faults stopped".into()));
            } else if !self.recovered() {
                let stuck: Vec<String> = self
                    .clients
                    .iter()
                    .filter(|c| matches!(c.work, Work::Produce { .. }) && !c.produced_all())
                    .map(|c| format!("the producer of {}", c.topic))
                    .collect();
                let why = match self.consumers_caught_up() {
                    Err(e) if stuck.is_empty() => e,
                    _ => format!("{} still waiting for acks", stuck.join(", ")),
                };
                self.checker.violations.push(Violation(format!(
                    "liveness: {} ms after the faults stopped the cluster had not recovered: {why}\n{}",
                    self.config.recovery_ms,
                    self.dump()
                )));
            } else if let Err(e) = self.assignments_converged() {
                self.checker.violations.push(Violation(format!(
                    "liveness: {} ms after the faults stopped the servers had not taken the book on: {e}",
                    self.config.recovery_ms,
                )));
            } else if let Err(e) = self.damage_repaired() {
                self.checker.violations.push(Violation(format!(
                    "liveness: {} ms after the faults stopped a damaged chunk was neither repaired nor deleted: {e}\n{}",
                    self.config.recovery_ms,
                    self.dump()
                )));
            } else if let Err(e) = self.leaders_returned() {
                self.checker.violations.push(Violation(format!(
                    "liveness: {} ms after the faults stopped leadership had not returned: {e}\n{}",
                    self.config.recovery_ms,
                    self.dump()
                )));
            } else if let Err(e) = self.leaders_serve() {
                self.checker.violations.push(Violation(format!(
                    "liveness: {} ms after the faults stopped a leader did not serve: {e}\n{}",
                    self.config.recovery_ms,
                    self.dump()
                )));
            }
        }
        if self.checker.violations.is_empty() {
            for (topic, offset) in self.checker.acked.keys() {
                if !self.checker.read.contains(&(*topic, *offset)) && !self.checker.excused(*topic, *offset) {
                    self.checker.violations.push(Violation(format!(
                        "G1: acked offset {offset} of topic {topic} never reached its consumer"
                    )));
                    break;
                }
            }
            for (id, s) in &self.servers {
                if let Some(run) = &s.run {
                    if let Err(e) = run.store.check_consistency() {
                        self.checker.violations.push(Violation(format!("server {id}: {e}")));
                    }
                    if let Some(e) = run.dedup_differs() {
                        self.checker.violations.push(Violation(format!("server {id}: {e}")));
                    }
                }
            }
        }
        let elections = self.naming.elected;
        let epochs = self
            .naming
            .book()
            .map(|b| b.topics.iter().map(|(n, t)| (n.clone(), t.epoch)).collect())
            .unwrap_or_default();
        let leaders = self
            .naming
            .book()
            .map(|b| b.topics.iter().map(|(n, t)| (n.clone(), t.leader)).collect())
            .unwrap_or_default();
        self.stats.insert("records acked", self.checker.acked.len() as u64);
        self.stats.insert("evictions told", self.checker.evicted_below.len() as u64);
        Outcome {
            stats: self.stats,
            epochs,
            leaders,
            seed: self.config.seed,
            violations: self.checker.violations,
            events: self.events,
            ended_ms: self.now,
            trace: self.trace.into_iter().collect(),
            acked: self.checker.acked.len(),
            elections,
        }
    }
}
