//! Simulated clients: a producer that retries without duplicates, a consumer that acks as it
//! reads, and an admin that creates, resets and deletes subscriptions. They speak the real
//! protocol and report what they were told to the [`Checker`].

use std::collections::{BTreeMap, VecDeque};

use super::net::{server_node, Message, NamingTarget, NodeId, Payload};
use super::server::{server_of, Ctx};
use crate::error::Error;
use crate::types::{Offset, Record, ServerId, StartFrom, StoredRecord, SubscriptionName, TopicId, TopicName};
use crate::wire::{ConsumerSession, FetchedRecords, Request, ResetTo, Response};

/// How long a client waits for an answer before it takes the server for gone.
const ANSWER_WAIT_MS: u64 = 2_000;

/// What a client does.
pub enum Work {
    /// Sends `batches` batches of up to 3 records, `window` in flight, pausing `pause_ms`
    /// after each ack (so topics idle, and their followers park, between batches).
    Produce { producer: u64, batches: u32, window: usize, pause_ms: u64 },
    /// Reads through `subscription` and acknowledges what it read, pausing between reads;
    /// with `from_replicas`, every other read goes to a random replica without a session
    /// (as `client::ReadFrom::Replica` does; half of them as a `Read` through no
    /// subscription, as `client::Reader` does), and to the leader after an empty or failed one.
    Consume { subscription: String, pause_ms: u64, from_replicas: bool },
    /// Creates, resets, deletes and checks the subscriptions `names`.
    Admin { names: Vec<String> },
}

/// What an admin believes of one of its subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    Exists,
    Absent,
    /// An operation on it went unanswered: it may have happened.
    Unknown,
}

enum Asked {
    Lookup,
    Produce {
        sequence: u64,
    },
    Create {
        name: String,
    },
    Fetch,
    /// A read at a replica, without a session.
    ReplicaFetch,
    Ack,
    Delete {
        name: String,
    },
    Reset {
        name: String,
    },
    Check {
        name: String,
    },
}

pub struct SimClient {
    pub node: NodeId,
    /// The naming member asked for lookups.
    naming: NamingTarget,
    pub topic: TopicName,
    pub work: Work,
    topic_id: Option<TopicId>,
    leader: Option<ServerId>,
    asked: BTreeMap<u64, (u64, Asked)>,
    next_at: u64,
    /// Producer: batches sent and not acknowledged, oldest first: (sequence, payloads, sent).
    inflight: VecDeque<(u64, Vec<String>, bool)>,
    next_sequence: u64,
    /// Consumer: the subscription exists; where this session reads next.
    ready: bool,
    /// The topic's replicas, as the last lookup said.
    replicas: Vec<ServerId>,
    /// Consumer: the next read goes to the leader (a replica read came back empty or failed).
    leader_next: bool,
    position: Option<Offset>,
    session: u64,
    /// Admin: what it believes of each subscription.
    subs: BTreeMap<String, SubState>,
    /// Stop sending new work (the run is ending).
    pub finishing: bool,
    /// Producer: a batch was acknowledged.
    known: bool,
    /// The last error it got (for a failure report).
    last_error: Option<String>,
}

impl SimClient {
    pub fn new(node: NodeId, naming_members: u64, topic: TopicName, work: Work) -> Self {
        let subs = match &work {
            Work::Admin { names } => names.iter().map(|n| (n.clone(), SubState::Absent)).collect(),
            _ => BTreeMap::new(),
        };
        Self {
            node,
            naming: NamingTarget::new(naming_members),
            topic,
            work,
            topic_id: None,
            leader: None,
            asked: BTreeMap::new(),
            next_at: 0,
            inflight: VecDeque::new(),
            next_sequence: 0,
            ready: false,
            replicas: Vec::new(),
            leader_next: false,
            position: None,
            session: node,
            subs,
            finishing: false,
            known: false,
            last_error: None,
        }
    }

    /// A producer that sent every batch and had each acknowledged.
    pub fn produced_all(&self) -> bool {
        matches!(self.work, Work::Produce { batches: 0, .. }) && self.inflight.is_empty()
    }

    fn batches_left(&self) -> u32 {
        match self.work {
            Work::Produce { batches, .. } => batches,
            _ => 0,
        }
    }

    /// What it is doing, for a failure report.
    pub fn describe(&self) -> String {
        let asked: Vec<String> = self
            .asked
            .values()
            .map(|(d, a)| {
                let what = match a {
                    Asked::Lookup => "lookup".to_string(),
                    Asked::Produce { sequence } => format!("produce {sequence}"),
                    Asked::Create { name } => format!("create {name}"),
                    Asked::Fetch => "fetch".into(),
                    Asked::ReplicaFetch => "replica fetch".into(),
                    Asked::Ack => "ack".into(),
                    Asked::Delete { name } => format!("delete {name}"),
                    Asked::Reset { name } => format!("reset {name}"),
                    Asked::Check { name } => format!("check {name}"),
                };
                format!("{what} until {d}")
            })
            .collect();
        format!(
            "{} leader {:?} next at {} ready {} position {:?} inflight {:?} asked {asked:?} last error {:?}",
            self.topic,
            self.leader,
            self.next_at,
            self.ready,
            self.position,
            self.inflight.iter().map(|b| (b.0, b.2)).collect::<Vec<_>>(),
            self.last_error
        )
    }

    /// A consumer whose subscription exists.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    pub fn subscription(&self) -> Option<&str> {
        match &self.work {
            Work::Consume { subscription, .. } => Some(subscription),
            _ => None,
        }
    }

    fn ask(
        &mut self,
        ctx: &mut Ctx,
        to: NodeId,
        req: Request,
        asked: Asked,
        next_id: &mut dyn FnMut() -> u64,
    ) {
        let id = next_id();
        self.asked.insert(id, (ctx.now + ANSWER_WAIT_MS, asked));
        ctx.send(self.node, to, Payload::Request { id, req: Box::new(req) });
    }

    fn busy(&self) -> bool {
        !self.asked.is_empty()
    }

    pub fn next_timer(&self, now: u64) -> u64 {
        // Due work, or a look every 50 ms; answers wake the client on their own.
        let mut at = if self.next_at > now { self.next_at } else { now + 50 };
        for (d, _) in self.asked.values() {
            at = at.min(*d);
        }
        at.max(now + 1)
    }

    /// Forgets the leader (it failed, or said it is not the leader).
    fn lost_leader(&mut self, ctx: &mut Ctx) {
        self.leader = None;
        self.asked.retain(|_, (_, a)| matches!(a, Asked::Lookup));
        for b in self.inflight.iter_mut() {
            b.2 = false;
        }
        self.position = None;
        self.next_at = ctx.now + 20 + ctx.rng.u64(0..30);
    }

    pub fn tick(&mut self, ctx: &mut Ctx, next_id: &mut dyn FnMut() -> u64) {
        let now = ctx.now;
        let expired: Vec<u64> =
            self.asked.iter().filter(|(_, (d, _))| *d <= now).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some((_, asked)) = self.asked.remove(&id) {
                self.answered(ctx, asked, Err(Error::Unavailable { detail: "no answer".into() }));
            }
        }
        if now < self.next_at {
            return;
        }
        let Some(leader) = self.leader else {
            if !self.asked.values().any(|(_, a)| matches!(a, Asked::Lookup)) {
                let to = self.naming.node();
                self.ask(ctx, to, Request::LookupTopic { name: self.topic.clone() }, Asked::Lookup, next_id);
            }
            return;
        };
        let to = server_node(leader);
        let topic = self.topic.clone();
        let busy = self.busy();
        match &self.work {
            Work::Produce { producer, window, .. } => {
                let (producer, window) = (*producer, *window);
                // Resend, in order, what a failure left unacknowledged; then new batches.
                let mut sends = Vec::new();
                for b in self.inflight.iter_mut().filter(|b| !b.2) {
                    b.2 = true;
                    sends.push((b.0, b.1.clone()));
                }
                // One batch alone until the producer is known (as `client::Producer` does).
                let window = if self.known { window } else { 1 };
                while !self.finishing && self.batches_left() > 0 && self.inflight.len() < window {
                    if let Work::Produce { batches, .. } = &mut self.work {
                        *batches -= 1;
                    }
                    let sequence = self.next_sequence;
                    self.next_sequence += 1;
                    let count = 1 + ctx.rng.usize(0..3);
                    let payloads: Vec<String> =
                        (0..count).map(|i| format!("p{producer}-{sequence}-{i}")).collect();
                    self.inflight.push_back((sequence, payloads.clone(), true));
                    sends.push((sequence, payloads));
                }
                for (sequence, payloads) in sends {
                    let records =
                        payloads.into_iter().map(|p| Record { payload: p.into_bytes(), ..Record::default() });
                    let req = Request::Produce {
                        topic: topic.clone(),
                        producer,
                        sequence,
                        records: records.collect(),
                    };
                    self.ask(ctx, to, req, Asked::Produce { sequence }, next_id);
                }
            }
            Work::Consume { subscription, .. } => {
                if busy {
                    return;
                }
                let sub = SubscriptionName::new(subscription.clone()).expect("valid name");
                let name = subscription.clone();
                if !self.ready {
                    let req = Request::CreateSubscription {
                        topic,
                        subscription: sub,
                        from: StartFrom::Earliest,
                        if_missing: true,
                    };
                    return self.ask(ctx, to, req, Asked::Create { name }, next_id);
                }
                let from_replicas = matches!(self.work, Work::Consume { from_replicas: true, .. });
                if let (true, Some(at), false) = (from_replicas, self.position, self.leader_next) {
                    if !self.replicas.is_empty() {
                        self.leader_next = true; // every other read at the leader keeps the hold
                        let replica = self.replicas[ctx.rng.usize(0..self.replicas.len())];
                        // A sessionless fetch, or (as `consume --offset` reads) a read through
                        // no subscription: the same records either way. Chosen by the read's
                        // offset, not the seed's random stream, so that the seeds kept as
                        // regression tests still play out as they did.
                        let req = if at % 2 == 0 {
                            Request::Fetch {
                                topic,
                                subscription: sub,
                                from: Some(at),
                                max_records: 20,
                                max_bytes: 1 << 20,
                                max_wait_ms: 0,
                                session: None,
                            }
                        } else {
                            Request::Read {
                                topic,
                                from: at,
                                max_records: 20,
                                max_bytes: 1 << 20,
                                max_wait_ms: 0,
                            }
                        };
                        return self.ask(ctx, server_node(replica), req, Asked::ReplicaFetch, next_id);
                    }
                }
                self.leader_next = false;
                let session =
                    ConsumerSession { id: self.session, name: format!("sim consumer {}", self.node) };
                let req = Request::Fetch {
                    topic,
                    subscription: sub,
                    from: self.position,
                    max_records: 20,
                    max_bytes: 1 << 20,
                    max_wait_ms: 0,
                    session: Some(session),
                };
                self.ask(ctx, to, req, Asked::Fetch, next_id);
            }
            Work::Admin { names } => {
                if busy || self.finishing {
                    return;
                }
                let name = names[ctx.rng.usize(0..names.len())].clone();
                let sub = SubscriptionName::new(name.clone()).expect("valid name");
                let state = self.subs[&name];
                let (req, asked) = match (state, ctx.rng.u32(0..4)) {
                    (SubState::Exists, 0) => (
                        Request::DeleteSubscription { topic, subscription: sub, force: false },
                        Asked::Delete { name },
                    ),
                    (SubState::Exists, 1) => {
                        let to = if ctx.rng.bool() { ResetTo::Earliest } else { ResetTo::Latest };
                        (
                            Request::ResetSubscription {
                                topic,
                                subscription: sub,
                                to,
                                execute: true,
                                force: false,
                            },
                            Asked::Reset { name },
                        )
                    }
                    (SubState::Exists, _) => {
                        let session = ConsumerSession { id: next_id(), name: "sim admin check".into() };
                        let req = Request::Fetch {
                            topic,
                            subscription: sub,
                            from: None,
                            max_records: 1,
                            max_bytes: 1 << 20,
                            max_wait_ms: 0,
                            session: Some(session),
                        };
                        (req, Asked::Check { name })
                    }
                    (SubState::Absent | SubState::Unknown, _) => {
                        let from = if ctx.rng.bool() { StartFrom::Earliest } else { StartFrom::Latest };
                        let if_missing = state == SubState::Unknown;
                        (
                            Request::CreateSubscription { topic, subscription: sub, from, if_missing },
                            Asked::Create { name },
                        )
                    }
                };
                self.ask(ctx, to, req, asked, next_id);
                self.next_at = now + 50 + ctx.rng.u64(0..200);
            }
        }
    }

    pub fn handle(&mut self, ctx: &mut Ctx, msg: Message, next_id: &mut dyn FnMut() -> u64) {
        let Payload::Response { id, resp } = msg.payload else { return };
        let Some((_, asked)) = self.asked.remove(&id) else { return };
        let result = match *resp {
            Response::Error(e) => Err(e),
            other => Ok(other),
        };
        self.answered(ctx, asked, result);
        self.tick(ctx, next_id);
    }

    /// A fetch answer's records, decoded; one that does not decode (a damaged chunk served)
    /// is a violation.
    fn decoded(ctx: &mut Ctx, records: &FetchedRecords) -> Option<Vec<StoredRecord>> {
        match records.decode() {
            Ok(records) => Some(records),
            Err(e) => {
                ctx.checker
                    .violations
                    .push(super::check::Violation(format!("a fetch answer does not decode: {e}")));
                None
            }
        }
    }

    /// A consumer's read: checked (committed, dense, in order) and acknowledged at the leader.
    fn read(
        &mut self,
        ctx: &mut Ctx,
        records: Vec<crate::wire::StoredRecord>,
        evicted: Option<crate::wire::Evicted>,
    ) {
        let topic = self.topic_id.unwrap_or(0);
        let sub = self.subscription().unwrap_or_default().to_string();
        if let Some(e) = evicted {
            ctx.checker.evicted(topic, e.resume_at);
            self.position = self.position.map(|p| p.max(e.resume_at));
        }
        if self.position.is_none() {
            if let Some(first) = records.first() {
                ctx.checker.resumed(topic, &sub, first.offset);
            }
        }
        for r in &records {
            let expected = self.position.unwrap_or(r.offset);
            if r.offset != expected {
                ctx.checker.violations.push(super::check::Violation(format!(
                    "G2: {sub} read offset {} where {expected} was next",
                    r.offset
                )));
            }
            let payload = String::from_utf8_lossy(&r.record.payload).to_string();
            ctx.checker.saw_committed(topic, r.offset, &payload, "a consumer");
            ctx.checker.read.insert((topic, r.offset));
            self.position = Some(r.offset + 1);
        }
        let pause = match self.work {
            Work::Consume { pause_ms, .. } => pause_ms,
            _ => 0,
        };
        self.next_at = ctx.now + pause;
        match (records.last(), self.leader) {
            (Some(last), Some(leader)) => {
                let req = Request::Ack {
                    topic: self.topic.clone(),
                    subscription: SubscriptionName::new(sub).expect("valid name"),
                    next: last.offset + 1,
                    session: None,
                };
                let id = ctx.rng.u64(..) | (1 << 62);
                self.asked.insert(id, (ctx.now + ANSWER_WAIT_MS, Asked::Ack));
                ctx.send(self.node, server_node(leader), Payload::Request { id, req: Box::new(req) });
            }
            _ => self.next_at = ctx.now + pause + 20 + ctx.rng.u64(0..30),
        }
    }

    fn answered(&mut self, ctx: &mut Ctx, asked: Asked, result: Result<Response, Error>) {
        let topic = self.topic_id.unwrap_or(0);
        if let Err(e) = &result {
            self.last_error = Some(format!("at {}: {e}", ctx.now));
            if let Asked::ReplicaFetch = asked {
                // The replica is down, behind, or no longer one: the next read is the leader's.
                self.leader_next = true;
                self.next_at = ctx.now;
                return;
            }
            if let Asked::Lookup = asked {
                self.naming.failed(e);
                self.next_at = ctx.now + 50;
                return;
            }
            if let (Asked::Create { name } | Asked::Delete { name } | Asked::Reset { name }, true) =
                (&asked, e.is_retriable())
            {
                if matches!(self.work, Work::Admin { .. }) {
                    // It may have happened: a create with `if_missing` finds out later.
                    if !matches!(asked, Asked::Reset { .. }) {
                        self.subs.insert(name.clone(), SubState::Unknown);
                        ctx.checker.subscriptions.remove(&(topic, name.clone()));
                    }
                    // A reset may have moved the cursor back: unknown until the next answer.
                    ctx.checker.cursors.remove(&(topic, name.clone()));
                }
            }
            if e.is_retriable() || matches!(e, Error::Unauthorized { .. }) {
                return self.lost_leader(ctx);
            }
            // What a replica read showed committed, a deposed leader that does not know yet
            // may not have committed: the ack goes to the leader looked up again (as
            // `client::Consumer` does).
            let replica_reads = matches!(self.work, Work::Consume { from_replicas: true, .. });
            if let (Error::OffsetBeyondEnd { .. }, Asked::Ack, true) = (e, &asked, replica_reads) {
                return self.lost_leader(ctx);
            }
            if let (Error::BacklogFull { .. }, Asked::Produce { .. }) = (e, &asked) {
                // Refused for room: the same batch goes again once readers freed some.
                for b in self.inflight.iter_mut() {
                    b.2 = false;
                }
                self.asked.retain(|_, (_, a)| !matches!(a, Asked::Produce { .. }));
                self.next_at = ctx.now + 100;
                return;
            }
        }
        match (asked, result) {
            (Asked::Lookup, Ok(Response::Topic(info))) => {
                self.topic_id = Some(info.id);
                self.leader = info.leader_addr().map(server_of);
                self.replicas = info.replicas.iter().map(|r| server_of(r.addr)).collect();
                self.next_at = ctx.now;
                if self.leader.is_none() {
                    self.next_at = ctx.now + 50;
                }
            }
            (Asked::Produce { sequence }, Ok(Response::Produced { base, count, epoch, duplicate })) => {
                if std::env::var("HERALD_SIM_DEBUG").is_ok() {
                    super::server::note(format!(
                        "client {}: batch {sequence} acked at {base}+{count} in epoch {epoch} (duplicate {duplicate}) by {:?}",
                        self.node, self.leader
                    ));
                }
                self.known = true;
                if let Some(pos) = self.inflight.iter().position(|b| b.0 == sequence) {
                    let (_, payloads, _) = self.inflight.remove(pos).expect("batch");
                    if payloads.len() as u32 != count {
                        ctx.checker.violations.push(super::check::Violation(format!(
                            "batch {sequence} of {} records acked with {count}",
                            payloads.len()
                        )));
                    }
                    let (producer, pause) = match self.work {
                        Work::Produce { producer, pause_ms, .. } => (producer, pause_ms),
                        _ => (0, 0),
                    };
                    ctx.checker.produced(topic, producer, sequence, base, &payloads);
                    if pause > 0 {
                        self.next_at = self.next_at.max(ctx.now + pause);
                    }
                }
            }
            (Asked::Create { name }, Ok(Response::Cursor { cursor })) => {
                match self.work {
                    Work::Consume { .. } => self.ready = true,
                    _ => {
                        self.subs.insert(name.clone(), SubState::Exists);
                    }
                }
                ctx.checker.subscriptions.insert((topic, name.clone()));
                ctx.checker.cursors.entry((topic, name)).or_insert(cursor);
            }
            (Asked::Delete { name }, Ok(Response::Deleted | Response::Cursor { .. })) => {
                self.subs.insert(name.clone(), SubState::Absent);
                ctx.checker.subscriptions.remove(&(topic, name.clone()));
                ctx.checker.cursors.remove(&(topic, name));
            }
            (Asked::Reset { name }, Ok(Response::Reset(outcome))) => {
                if outcome.executed {
                    ctx.checker.cursor_acked(topic, &name, outcome.after, true);
                }
            }
            (Asked::Check { .. }, Ok(Response::Records { .. })) => {}
            (Asked::Check { name }, Err(e)) => {
                ctx.checker.violations.push(super::check::Violation(format!(
                    "subscription {name} (created, never deleted) failed a read: {e}"
                )));
            }
            (Asked::ReplicaFetch, Ok(Response::Records { records, .. })) if records.is_empty() => {
                self.leader_next = true;
                self.next_at = ctx.now;
            }
            (Asked::ReplicaFetch, Ok(Response::Records { records, commit, .. })) => {
                let Some(records) = Self::decoded(ctx, &records) else { return };
                super::server::note(format!(
                    "client {}: read {}..={} at a replica that knows commit {commit}",
                    self.node,
                    records[0].offset,
                    records[records.len() - 1].offset
                ));
                self.read(ctx, records, None);
            }
            (Asked::Fetch, Ok(Response::Records { records, evicted, .. })) => {
                let Some(records) = Self::decoded(ctx, &records) else { return };
                self.read(ctx, records, evicted);
            }
            (Asked::Ack, Ok(Response::Cursor { cursor })) => {
                let sub = self.subscription().unwrap_or_default().to_string();
                ctx.checker.cursor_acked(topic, &sub, cursor, false);
            }
            (asked, Err(e)) => {
                let what = match asked {
                    Asked::Fetch | Asked::Ack => "a consumer",
                    Asked::Produce { .. } => "a producer",
                    _ => "an admin",
                };
                ctx.checker.violations.push(super::check::Violation(format!("{what} was refused: {e}")));
            }
            (_, Ok(other)) => {
                ctx.checker.violations.push(super::check::Violation(format!("unexpected answer {other:?}")));
            }
        }
    }
}
