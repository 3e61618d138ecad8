//! The naming server: one member of the naming group that keeps the book of topic servers
//! and topics.
//!
//! The book (servers, topics, each topic's voters, learners, leader and epochs) is
//! replicated on the group's members with Raft ([`raft`]: raft-rs over a redb log), so it
//! survives the loss of a minority of them. One member leads; only it decides ([`member`]:
//! its naming core, [`core`], proposes each change and applies it once committed) and only
//! it answers topic servers and clients; the others redirect them with
//! [`Error::NamingNotLeader`] and the leader's address. Leases are not replicated: a
//! member that becomes leader gives every server a grace period to report in before it can
//! be taken for dead.
//!
//! This module carries: requests in, Raft messages between members over QUIC (one sender
//! task per member, batched, dropped when the member is unreachable: Raft resends), the
//! clock, and the promise requests of elections. Servers learn what they host from
//! heartbeat answers: a heartbeat is a long poll that returns at once when the book changed
//! since the version the server knows, with what changed since then ([`changes`]).
//! `CreateTopic` answers once every replica has applied the change (or `NotPlaced` when too
//! few did in time).

pub mod book;
pub mod changes;
pub mod core;
pub mod member;
pub mod raft;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::raft::eraftpb::{Message, MessageType};
use anyhow::Context;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::{debug, error, info, warn};

use self::book::AclChange;
use self::core::{Liveness, NamingCore, PromiseAsk, Settings};
use self::member::{Admin, Done, Effects, NamingMember};
use self::raft::{decode_message, encode_message, GroupError, GroupSettings, RaftLog, TICK_MS};
use crate::acl::{AclView, Operation};
use crate::certs::{self, CertRole, Principal};
use crate::error::Error;
use crate::metrics::EndpointMetrics;
use crate::transport::{self, ready, Connection, Peer, ResponseFuture, Service};
use crate::types::{mono_ms, now_ms, Epoch, ServerId, TopicName};
use crate::wire::{MemberRole, Reports, Request, Response, TopicInfo};

/// The file in the data directory holding this member's Raft log and book snapshots.
pub const BOOK_FILE: &str = "book.redb";

/// How long a server counts as alive after its last heartbeat, by default. Failover takes
/// about this long; heartbeats come every third of it, so a server must stall for about two
/// thirds of a lease before it is taken for dead.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(1);

/// How long a replica may be dead before it is replaced, by default.
pub const DEFAULT_REPLACE_AFTER: Duration = Duration::from_secs(60);

/// How long `CreateTopic` waits for the replicas to take the topic on.
const PLACEMENT_WAIT: Duration = Duration::from_secs(5);

/// How long `Rebalance` waits for its elections to end: an election takes at most
/// `core::Settings::promise_wait_ms` (1 s) and its book change, so this leaves room for a
/// naming leader change on the way.
const REBALANCE_WAIT: Duration = Duration::from_secs(10);

/// Settings of `herald naming`.
#[derive(Debug, Clone)]
pub struct NamingConfig {
    /// This member's id in its group.
    pub id: u64,
    /// Every member of the group and its address, this one included; one entry: a naming
    /// server on its own.
    pub peers: BTreeMap<u64, SocketAddr>,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub certs_dir: PathBuf,
    pub lease: Duration,
    /// How long a replica may be dead before another server takes its place.
    pub replace_after: Duration,
    /// How long a topic's preferred leader must be up before leadership goes back to it
    /// (`None`: only on `topic rebalance`).
    pub leader_return: Option<Duration>,
    /// Where to serve Prometheus metrics (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// What clients may hold of this member.
    pub limits: transport::Limits,
    /// Clients that may do everything; every other client only what it was granted.
    pub superusers: BTreeSet<String>,
}

impl NamingConfig {
    /// A naming server on its own (member 1 of a group of one).
    pub fn alone(listen: SocketAddr, data_dir: PathBuf, certs_dir: PathBuf) -> Self {
        Self {
            id: 1,
            peers: BTreeMap::from([(1, listen)]),
            listen,
            data_dir,
            certs_dir,
            lease: DEFAULT_LEASE,
            replace_after: DEFAULT_REPLACE_AFTER,
            leader_return: Some(DEFAULT_LEASE * core::PREFERRED_RETURN_LEASES as u32),
            metrics_listen: None,
            limits: transport::Limits::default(),
            superusers: default_superusers(),
        }
    }
}

/// The superusers when none are named: the `admin` client `herald certs` makes.
pub fn default_superusers() -> BTreeSet<String> {
    [certs::ADMIN_CLIENT.to_string()].into()
}

/// The receiving ends of the Raft messages for each other member.
type Outboxes = BTreeMap<u64, mpsc::Receiver<Message>>;

/// Where an [`Admin`] request's answer goes.
type Reply = oneshot::Sender<Result<Done, Error>>;

/// How long an admin request waits for its change to commit before it is answered as
/// unavailable (a group without a majority commits nothing).
const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// Raft messages queued for one member at most; beyond, they are dropped (Raft sends
/// again what was lost).
const RAFT_OUTBOX: usize = 1_024;

/// Raft messages sent in one request at most.
const RAFT_BATCH: usize = 256;

/// Most bytes of Raft messages a member puts in its answer to another member's messages;
/// what is over goes as a request of its own, so an answer stays well inside a frame
/// (`wire::MAX_FRAME_BYTES`) even when it carries appends of `raft::MAX_MESSAGE_BYTES`.
const RAFT_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// How long one batch of Raft messages may take to be handed over: a member that does
/// not take them within it is treated as unreachable, and its connection is dialed again.
pub(crate) const RAFT_SEND_TIMEOUT: Duration = Duration::from_secs(2);

pub struct NamingServer {
    member: Mutex<NamingMember<Reply>>,
    /// The committed book's version.
    version: watch::Sender<u64>,
    applied: watch::Sender<()>,
    lease: Duration,
    metrics: Arc<EndpointMetrics>,
    elections: Counter,
    /// Raft messages for each other member.
    outboxes: BTreeMap<u64, mpsc::Sender<Message>>,
    /// This member's log is empty (sent with its Raft messages).
    log_empty: AtomicBool,
    endpoint: quinn::Endpoint,
    /// Connections to topic servers, for promise requests.
    servers: transport::Pool,
    /// Cancelled when the book can no longer be written: the server stops.
    fatal: CancellationToken,
    /// Clients that may do everything (`--superusers`).
    superusers: BTreeSet<String>,
}

impl NamingServer {
    /// Opens this member's log in `config.data_dir` (creating it on first start).
    fn open(config: &NamingConfig, endpoint: quinn::Endpoint) -> anyhow::Result<(Arc<Self>, Outboxes)> {
        crate::files::private_dir(&config.data_dir)?;
        let old = config.data_dir.join("naming.redb");
        if old.exists() {
            anyhow::bail!(
                "{} holds the book of an earlier Herald (one naming server, no Raft log); this Herald keeps the book in a Raft log in {}: use a new --data directory",
                old.display(),
                BOOK_FILE
            );
        }
        let path = config.data_dir.join(BOOK_FILE);
        let db =
            redb::Database::create(&path).map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        crate::files::private_file(&path)?;
        let log = RaftLog::open(Arc::new(db)).with_context(|| format!("reading {}", path.display()))?;
        let ids: Vec<u64> = config.peers.keys().copied().collect();
        let voters = log.voters();
        if !voters.is_empty() && voters != ids {
            anyhow::bail!(
                "{} belongs to a naming group of members {voters:?}; --peers names {ids:?} (a data directory serves one group)",
                path.display()
            );
        }
        let settings = Settings {
            preferred_pause_ms: config.leader_return.map(|d| d.as_millis() as u64),
            ..Settings::new(config.lease.as_millis() as u64, config.replace_after.as_millis() as u64)
        };
        let member = NamingMember::open(
            config.id,
            config.peers.clone(),
            log,
            GroupSettings::default(),
            settings,
            fastrand::u64(1..u64::MAX),
        )?;
        info!(
            member = config.id,
            members = ids.len(),
            book_version = member.book().version,
            "naming book loaded"
        );
        let mut outboxes = BTreeMap::new();
        let mut inboxes = BTreeMap::new();
        for id in ids.into_iter().filter(|id| *id != config.id) {
            let (tx, rx) = mpsc::channel(RAFT_OUTBOX);
            outboxes.insert(id, tx);
            inboxes.insert(id, rx);
        }
        let server = Arc::new(Self {
            version: watch::Sender::new(member.book().version),
            log_empty: AtomicBool::new(member.log_is_empty()),
            member: Mutex::new(member),
            applied: watch::Sender::new(()),
            lease: config.lease,
            superusers: config.superusers.clone(),
            metrics: Arc::default(),
            elections: Counter::default(),
            outboxes,
            servers: transport::Pool::new(endpoint.clone()),
            endpoint,
            fatal: CancellationToken::new(),
        });
        Ok((server, inboxes))
    }

    fn member(&self) -> std::sync::MutexGuard<'_, NamingMember<Reply>> {
        self.member.lock().expect("member lock")
    }

    /// Everything `--metrics-listen` shows, read now.
    pub fn render_metrics(&self) -> String {
        let mut registry = Registry::default();
        self.metrics.register(&mut registry);
        registry.register(
            "herald_elections",
            "Leaders elected by this naming member",
            self.elections.clone(),
        );
        let servers = Family::<StateLabels, Gauge>::default();
        let topics = Gauge::<i64>::default();
        let leading = Gauge::<i64>::default();
        let term = Gauge::<i64>::default();
        {
            let member = self.member();
            let status = member.status();
            leading.set(i64::from(status.role == MemberRole::Leader));
            term.set(status.term as i64);
            topics.set(member.book().topics.len() as i64);
            if let Some(core) = member.core() {
                let now = mono_ms();
                for id in core.book().servers.keys() {
                    let state = match core.liveness(*id, now) {
                        Liveness::Alive => "alive",
                        Liveness::Dead => "dead",
                        Liveness::Unknown => "unknown",
                    };
                    servers.get_or_create(&StateLabels { state }).inc();
                }
            }
        }
        registry.register(
            "herald_topic_servers",
            "Registered topic servers, alive, dead or unknown (on the naming leader)",
            servers,
        );
        registry.register("herald_topics", "Topics in the book", topics);
        registry.register("herald_naming_leader", "1 while this member leads the naming group", leading);
        registry.register("herald_naming_term", "This member's Raft term", term);
        crate::metrics::encode(&registry)
    }

    /// Carries what the member produced: Raft messages, answers, promise requests, notes.
    fn carry(self: &Arc<Self>, fx: Result<Effects<Reply>, GroupError>) {
        let fx = match fx {
            Ok(fx) => fx,
            Err(e) => {
                error!(error = %e, "the naming book cannot be kept; stopping this member");
                self.fatal.cancel();
                return;
            }
        };
        {
            let member = self.member();
            self.log_empty.store(member.log_is_empty(), Ordering::Relaxed);
            let version = member.book().version;
            self.version.send_if_modified(|v| std::mem::replace(v, version) != version);
        }
        for m in fx.messages {
            if let Some(out) = self.outboxes.get(&m.to) {
                let _ = out.try_send(m); // full: Raft sends it again
            }
        }
        for (reply, result) in fx.replies {
            let _ = reply.send(result);
        }
        for note in fx.notes {
            info!("{note}");
        }
        self.elections.inc_by(fx.elected);
        for ask in fx.asks {
            tokio::spawn(ask_promise(self.clone(), ask).in_current_span());
        }
    }

    /// Hands `admin` to the member and waits until its change committed.
    async fn submit(self: &Arc<Self>, admin: Admin) -> Result<Done, Error> {
        let (tx, rx) = oneshot::channel();
        let fx = self.member().submit(mono_ms(), admin, tx);
        self.carry(fx);
        match tokio::time::timeout(COMMIT_WAIT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Unavailable { detail: "the naming member stopped".into() }),
            Err(_) => Err(Error::Unavailable {
                detail: format!(
                    "the naming group did not commit the change within {COMMIT_WAIT:?} (is a majority of its members up?); it may still be made: look before trying again"
                ),
            }),
        }
    }

    fn register(self: &Arc<Self>, peer: &Peer, server: ServerId, addr: SocketAddr) -> ResponseFuture {
        if let Err(e) = peer.require(&Principal::Node(server), "registering a topic server") {
            return ready(Response::Error(e));
        }
        let me = self.clone();
        let lease_ms = self.lease.as_millis() as u32;
        Box::pin(async move {
            match me.submit(Admin::Register { server, addr }).await {
                Ok(Done::Registered { cluster }) => {
                    debug!(server, %addr, "topic server registered");
                    Response::Registered { lease_ms, cluster }
                }
                Ok(other) => Response::Error(Error::internal(format!("register ended as {other:?}"))),
                Err(e) => Response::Error(e),
            }
        })
    }

    fn heartbeat(
        self: &Arc<Self>,
        peer: &Peer,
        server: ServerId,
        known_version: u64,
        applied_version: u64,
        wait_ms: u32,
        reports: Reports,
    ) -> ResponseFuture {
        if let Err(e) = peer.require(&Principal::Node(server), "heartbeating") {
            return ready(Response::Error(e));
        }
        if let Err(e) = self.member().heartbeat(mono_ms(), server, applied_version, reports) {
            return ready(Response::Error(e));
        }
        self.applied.send_replace(());
        let me = self.clone();
        let wait = Duration::from_millis(wait_ms as u64).min(self.lease / 3);
        Box::pin(async move {
            let mut version = me.version.subscribe();
            if *version.borrow_and_update() == known_version {
                let _ = tokio::time::timeout(wait, version.changed()).await;
            }
            let member = me.member();
            let core = match member.serving() {
                Ok(core) => core,
                Err(e) => return Response::Error(e),
            };
            core.heartbeat_answer(server, known_version, &me.superusers)
        })
    }

    /// `name`'s entry once its epoch is past `past_epoch`, or as it is after `max_wait_ms`
    /// (at most [`AWAIT_LEADER_LIMIT`]); an unknown topic or a member that does not serve
    /// is answered at once.
    fn await_leader(
        self: &Arc<Self>,
        name: TopicName,
        past_epoch: Epoch,
        max_wait_ms: u32,
    ) -> ResponseFuture {
        let me = self.clone();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(max_wait_ms as u64).min(AWAIT_LEADER_LIMIT);
        Box::pin(async move {
            let mut version = me.version.subscribe();
            loop {
                version.borrow_and_update();
                let answer = me.read_now(|core| core.lookup(&name).map(Response::Topic));
                let waiting = matches!(&answer, Response::Topic(t) if t.epoch <= past_epoch);
                if !waiting || tokio::time::timeout_at(deadline, version.changed()).await.is_err() {
                    return answer;
                }
            }
        })
    }

    /// Commits a change to topics, then answers once their replicas applied it (or after
    /// [`PLACEMENT_WAIT`]), so what the caller does next sees the change. A new topic that
    /// not enough replicas took on in that time is a [`Error::NotPlaced`]. `one`: answer
    /// with the single topic (`Topic`) rather than a list (`Topics`).
    fn change_topics(
        self: &Arc<Self>,
        peer: &Peer,
        admin: Admin,
        what: &'static str,
        one: bool,
    ) -> ResponseFuture {
        let principal = peer.principal.to_string();
        let creating = matches!(admin, Admin::CreateTopics { .. });
        let me = self.clone();
        Box::pin(async move {
            let (names, version) = match me.submit(admin).await {
                Ok(Done::TopicsChanged { names, version }) => (names, version),
                Ok(other) => {
                    return Response::Error(Error::internal(format!("topic change ended as {other:?}")))
                }
                Err(e) => return Response::Error(e),
            };
            for name in &names {
                if let Some(t) = me.member().book().topics.get(name.as_str()) {
                    info!(%principal, topic = %name, voters = ?t.voters, schema = t.config.schema.is_some(), backlog_limit = ?t.config.backlog_limit, policy = t.config.backlog_policy.as_str(), "{what}");
                }
            }
            let mut applied = me.applied.subscribe();
            let deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
            loop {
                let done = {
                    let member = me.member();
                    let book = member.book();
                    member.core().is_none_or(|core| {
                        names
                            .iter()
                            .filter_map(|n| book.topics.get(n.as_str()))
                            .all(|t| core.applied_by_all(t, version))
                    })
                };
                if done || tokio::time::timeout_at(deadline, applied.changed()).await.is_err() {
                    break;
                }
            }
            let member = me.member();
            let core = match member.serving() {
                Ok(core) => core,
                Err(e) => return Response::Error(e),
            };
            if creating {
                if let Some(e) = names.iter().find_map(|n| core.placed(n, version, PLACEMENT_WAIT).err()) {
                    warn!(error = %e, "topic not placed");
                    return Response::Error(e);
                }
            }
            let infos: Result<Vec<TopicInfo>, Error> = names.iter().map(|n| core.lookup(n)).collect();
            match infos {
                Ok(mut infos) if one && infos.len() == 1 => Response::Topic(infos.remove(0)),
                Ok(infos) => Response::Topics(infos),
                Err(e) => Response::Error(e),
            }
        })
    }

    fn delete_topics(self: &Arc<Self>, peer: &Peer, names: Vec<TopicName>) -> ResponseFuture {
        let principal = peer.principal.to_string();
        let me = self.clone();
        Box::pin(async move {
            match me.submit(Admin::DeleteTopics { names: names.clone() }).await {
                Ok(_) => {
                    for name in &names {
                        info!(%principal, topic = %name, "topic deleted");
                    }
                    Response::Deleted
                }
                Err(e) => Response::Error(e),
            }
        })
    }

    /// Starts the elections that hand topics back to their preferred leaders, then answers
    /// once they ended (or after [`REBALANCE_WAIT`]): each move says whether it happened.
    fn rebalance(self: &Arc<Self>, peer: &Peer) -> ResponseFuture {
        let principal = peer.principal.to_string();
        let me = self.clone();
        Box::pin(async move {
            let mut moves = match me.submit(Admin::Rebalance).await {
                Ok(Done::Rebalanced(moves)) => moves,
                Ok(other) => {
                    return Response::Error(Error::internal(format!("rebalance ended as {other:?}")))
                }
                Err(e) => return Response::Error(e),
            };
            let started = moves.iter().filter(|m| m.skipped.is_none()).count();
            info!(%principal, started, not_ready = moves.len() - started, "rebalance");
            let mut version = me.version.subscribe();
            let deadline = tokio::time::Instant::now() + REBALANCE_WAIT;
            loop {
                let pending = {
                    let member = me.member();
                    let book = member.book();
                    moves.iter().filter(|m| m.skipped.is_none()).any(|m| {
                        book.topics.get(m.topic.as_str()).is_some_and(|t| t.election_epoch > t.epoch)
                    })
                };
                if !pending || tokio::time::timeout_at(deadline, version.changed()).await.is_err() {
                    break;
                }
            }
            let member = me.member();
            for m in moves.iter_mut().filter(|m| m.skipped.is_none()) {
                match member.book().topics.get(m.topic.as_str()) {
                    Some(t) if t.leader == m.to => m.moved = true,
                    Some(t) if t.election_epoch > t.epoch => {
                        m.skipped = Some(format!("its election did not end within {REBALANCE_WAIT:?}"))
                    }
                    Some(t) => {
                        m.skipped = Some(format!(
                            "{} was behind when the election asked; {} leads again (epoch {})",
                            m.to, t.leader, t.epoch
                        ))
                    }
                    None => m.skipped = Some("deleted meanwhile".into()),
                }
            }
            Response::Rebalanced(moves)
        })
    }

    /// Raft messages from another member.
    fn raft(
        self: &Arc<Self>,
        peer: &Peer,
        from: u64,
        messages: Vec<Vec<u8>>,
        sender_empty: bool,
    ) -> Response {
        if let Err(e) = peer.require(&Principal::Naming, "naming group traffic") {
            return Response::Error(e);
        }
        if !self.outboxes.contains_key(&from) {
            return Response::Error(Error::invalid(format!("naming member {from} is not in this group")));
        }
        let now = mono_ms();
        let (mut answers, mut answer_bytes) = (Vec::new(), 0);
        for bytes in messages {
            let message = match message_from(from, &bytes) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => return Response::Error(e),
            };
            let mut fx = self.member().step(now, message, sender_empty);
            if let Ok(fx) = fx.as_mut() {
                // What is for the sender goes back in this answer, not as a request of its own
                // (past `RAFT_ANSWER_BYTES`, through the sender's outbox as before).
                fx.messages.retain(|m| {
                    if m.to != from {
                        return true;
                    }
                    let bytes = encode_message(m);
                    if answer_bytes + bytes.len() > RAFT_ANSWER_BYTES {
                        return true;
                    }
                    answer_bytes += bytes.len();
                    answers.push(bytes);
                    false
                });
            }
            self.carry(fx);
        }
        Response::RaftDelivered { messages: answers, sender_empty: self.log_empty.load(Ordering::Relaxed) }
    }

    /// Steps the Raft messages member `from` sent back in its answer (see [`Self::raft`]).
    fn step_answers(self: &Arc<Self>, from: u64, messages: Vec<Vec<u8>>, sender_empty: bool) {
        let now = mono_ms();
        for bytes in messages {
            match message_from(from, &bytes) {
                Ok(Some(m)) => {
                    let fx = self.member().step(now, m, sender_empty);
                    self.carry(fx);
                }
                Ok(None) => {}
                Err(e) => warn!(from, error = %e, "a raft answer that does not decode"),
            }
        }
    }

    /// Answers a read of the book (leader only: a follower's book may lag).
    /// Refuses `operation` on `topic` unless the peer is a superuser or was granted it.
    fn allow(&self, peer: &Peer, operation: Operation, topic: &str) -> Result<(), Error> {
        self.member().book().acl.check(&self.superusers, &peer.principal, operation, topic)
    }

    /// Grants are given, taken back and shown by superusers only.
    fn require_superuser(&self, peer: &Peer) -> Result<(), Error> {
        if crate::acl::is_superuser(&self.superusers, &peer.principal) {
            return Ok(());
        }
        Err(Error::NotAuthorized {
            principal: peer.principal.to_string(),
            operation: Operation::Admin.as_str().into(),
            topic: "the cluster (grants and servers)".into(),
            hint: "only superusers (herald naming --superusers) change or list grants and retire servers"
                .into(),
        })
    }

    fn change_acl(self: &Arc<Self>, peer: &Peer, change: AclChange) -> ResponseFuture {
        if let Err(e) = self.require_superuser(peer) {
            return ready(Response::Error(e));
        }
        let me = self.clone();
        let principal = peer.principal.to_string();
        Box::pin(async move {
            let shown: Vec<String> = change
                .revoke
                .iter()
                .map(|g| format!("revoke: {g}"))
                .chain(change.grant.iter().map(|g| format!("grant: {g}")))
                .collect();
            match me.submit(Admin::ChangeAcl { change }).await {
                Ok(_) => {
                    info!(%principal, changes = ?shown, "grants changed");
                    me.read_now(|core| Ok(Response::Grants(me.acl_view(core))))
                }
                Err(e) => Response::Error(e),
            }
        })
    }

    fn remove_server(self: &Arc<Self>, peer: &Peer, server: ServerId) -> ResponseFuture {
        if let Err(e) = self.require_superuser(peer) {
            return ready(Response::Error(e));
        }
        let me = self.clone();
        let principal = peer.principal.to_string();
        Box::pin(async move {
            match me.submit(Admin::RetireServer { server }).await {
                Ok(_) => {
                    info!(%principal, server, "server retired");
                    Response::Deleted
                }
                Err(e) => Response::Error(e),
            }
        })
    }

    fn acl_view(&self, core: &NamingCore) -> AclView {
        AclView { acl: core.book().acl.clone(), superusers: self.superusers.clone() }
    }

    fn read(&self, f: impl FnOnce(&NamingCore) -> Result<Response, Error>) -> ResponseFuture {
        ready(self.read_now(f))
    }

    fn read_now(&self, f: impl FnOnce(&NamingCore) -> Result<Response, Error>) -> Response {
        let member = self.member();
        member.serving().and_then(f).unwrap_or_else(Response::Error)
    }
}

/// Longest an `AwaitLeader` is held before it is answered with the entry as it is: the
/// client asks again, and a held request keeps a stream and a topic answer's share of its
/// connection's budget (`transport::limits::TOPIC_ANSWER_BYTES`).
pub const AWAIT_LEADER_LIMIT: Duration = Duration::from_secs(5);

/// Asks one voter to promise an epoch, and hands its answer to the member.
async fn ask_promise(naming: Arc<NamingServer>, ask: PromiseAsk) {
    let wait = Duration::from_millis(naming.member().settings().promise_wait_ms);
    let req = Request::Promise { topic: ask.name.clone(), topic_id: ask.topic, epoch: ask.epoch };
    // One pooled connection per server: a server that failed may lead thousands of topics,
    // and a dial (a TLS handshake) per promise made their elections take tens of seconds.
    let call = async {
        let conn = naming.servers.get(ask.addr).await?;
        let answer = conn.call(&req).await;
        if matches!(answer, Err(Error::Unavailable { .. })) {
            naming.servers.forget(ask.addr).await;
        }
        answer
    };
    let answer = match tokio::time::timeout(wait, call).await {
        Ok(Ok(Response::Promised { last_epoch, log_end })) => Some((last_epoch, log_end)),
        Ok(Ok(other)) => {
            debug!(server = ask.server, ?other, "unexpected answer to a promise request");
            None
        }
        Ok(Err(e)) => {
            debug!(server = ask.server, error = %e, "no promise");
            None
        }
        Err(_) => None,
    };
    naming.member().on_promise(mono_ms(), ask.topic, ask.epoch, ask.server, answer);
}

/// Ticks the member: Raft's clock and the leader's periodic decisions.
async fn tick(naming: Arc<NamingServer>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_millis(TICK_MS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let fx = naming.member().tick(mono_ms());
        naming.carry(fx);
    }
}

/// A Raft message member `from` sent (in a request or an answer); `None` (and a warning) for
/// one that claims another sender.
fn message_from(from: u64, bytes: &[u8]) -> Result<Option<Message>, Error> {
    let m = decode_message(bytes).map_err(|e| Error::invalid(format!("raft message: {e}")))?;
    if m.from != from {
        warn!(from, claimed = m.from, "a raft message from another member than its sender");
        return Ok(None);
    }
    Ok(Some(m))
}

/// Carries Raft messages to member `to`, in batches, over one connection at a time.
async fn send_raft(
    naming: Arc<NamingServer>,
    from: u64,
    to: u64,
    addr: SocketAddr,
    mut outbox: mpsc::Receiver<Message>,
    shutdown: CancellationToken,
) {
    let mut conn: Option<Connection> = None;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = outbox.recv() => match m { Some(m) => m, None => return },
        };
        let mut snapshot = first.get_msg_type() == MessageType::MsgSnapshot;
        let mut messages = vec![encode_message(&first)];
        while messages.len() < RAFT_BATCH {
            match outbox.try_recv() {
                Ok(m) => {
                    snapshot |= m.get_msg_type() == MessageType::MsgSnapshot;
                    messages.push(encode_message(&m));
                }
                Err(_) => break,
            }
        }
        let sender_empty = naming.log_empty.load(Ordering::Relaxed);
        let req = Request::NamingRaft { from, messages, sender_empty };
        let sent = tokio::time::timeout(RAFT_SEND_TIMEOUT, async {
            if conn.as_ref().is_none_or(|c| c.is_closed()) {
                conn = Some(Connection::connect(&naming.endpoint, addr).await?);
            }
            conn.as_ref().expect("connected").call(&req).await
        })
        .await;
        match sent {
            Ok(Ok(Response::RaftDelivered { messages, sender_empty })) => {
                naming.step_answers(to, messages, sender_empty);
                continue;
            }
            Ok(Ok(other)) => debug!(member = to, answer = ?other, "raft messages refused"),
            Ok(Err(e)) => {
                debug!(member = to, error = %e, "raft messages not delivered");
                conn = None;
            }
            Err(_) => {
                debug!(member = to, "raft messages not delivered in time");
                conn = None;
            }
        }
        // Raft resends what was lost once told (a lost snapshot only then).
        let fx = naming.member().undelivered(mono_ms(), to, snapshot);
        naming.carry(fx);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

impl Service for NamingServer {
    fn describe(&self) -> String {
        "the naming server".into()
    }

    fn metrics(&self) -> &Arc<EndpointMetrics> {
        &self.metrics
    }

    fn server_id(&self) -> Option<ServerId> {
        None
    }

    fn dispatch(self: &Arc<Self>, req: Request, peer: &Peer) -> ResponseFuture {
        let topic_ops: Vec<(Operation, &str)> = match &req {
            Request::CreateTopic { name, .. }
            | Request::DeleteTopic { name }
            | Request::AlterTopic { name, .. } => vec![(Operation::Admin, name.as_str())],
            Request::CreateTopics { names, .. } | Request::DeleteTopics { names } => {
                names.iter().map(|n| (Operation::Admin, n.as_str())).collect()
            }
            Request::LookupTopic { name } | Request::AwaitLeader { name, .. } => {
                vec![(Operation::Describe, name.as_str())]
            }
            // Moves leaders of any topic: admin on every topic.
            Request::Rebalance => vec![(Operation::Admin, "")],
            _ => Vec::new(),
        };
        for (operation, topic) in topic_ops {
            if let Err(e) = self.allow(peer, operation, topic) {
                return ready(Response::Error(e));
            }
        }
        // Lists show only the topics the peer may describe.
        let visible = |core: &NamingCore, t: &TopicInfo| {
            core.book()
                .acl
                .check(&self.superusers, &peer.principal, Operation::Describe, t.name.as_str())
                .is_ok()
        };
        match req {
            Request::Register { server, addr } => self.register(peer, server, addr),
            Request::Heartbeat { server, known_version, applied_version, wait_ms, reports } => {
                self.heartbeat(peer, server, known_version, applied_version, wait_ms, reports)
            }
            Request::CreateTopic { name, replicas, config } => self.change_topics(
                peer,
                Admin::CreateTopics { names: vec![name], replicas, config, wall_ms: now_ms() },
                "topic created",
                true,
            ),
            Request::CreateTopics { names, replicas, config } => self.change_topics(
                peer,
                Admin::CreateTopics { names, replicas, config, wall_ms: now_ms() },
                "topic created",
                false,
            ),
            Request::DeleteTopic { name } => self.delete_topics(peer, vec![name]),
            Request::DeleteTopics { names } => self.delete_topics(peer, names),
            Request::Rebalance => self.rebalance(peer),
            Request::AlterTopic { name, changes } => {
                self.change_topics(peer, Admin::AlterTopic { name, changes }, "topic altered", true)
            }
            Request::LookupTopic { name } => self.read(|core| core.lookup(&name).map(Response::Topic)),
            Request::AwaitLeader { name, past_epoch, max_wait_ms } => {
                self.await_leader(name, past_epoch, max_wait_ms)
            }
            Request::ListTopics => self.read(|core| {
                Ok(Response::Topics(core.list_topics().into_iter().filter(|t| visible(core, t)).collect()))
            }),
            Request::ListTopicsPage { after, limit } => self.read(|core| {
                let limit = (limit as usize).clamp(1, core::TOPIC_PAGE_LIMIT);
                let (topics, next) = core.list_topics_page(after.as_ref(), limit, core::TOPIC_PAGE_BYTES);
                let topics = topics.into_iter().filter(|t| visible(core, t)).collect();
                Ok(Response::TopicPage { topics, next })
            }),
            Request::ChangeAcl { grant, revoke } => self.change_acl(peer, AclChange { grant, revoke }),
            Request::RemoveServer { server } => self.remove_server(peer, server),
            Request::ListGrants => match self.require_superuser(peer) {
                Ok(()) => self.read(|core| Ok(Response::Grants(self.acl_view(core)))),
                Err(e) => ready(Response::Error(e)),
            },
            Request::ListServers => self.read(|core| Ok(Response::Servers(core.list_servers(mono_ms())))),
            Request::NamingRaft { from, messages, sender_empty } => {
                ready(self.raft(peer, from, messages, sender_empty))
            }
            Request::NamingStatus => ready(Response::NamingStatus(self.member().status())),
            Request::NamingAlive { server } => {
                ready(match peer.require(&Principal::Node(server), "a liveness ping") {
                    Ok(()) => {
                        self.member().alive(mono_ms(), server);
                        Response::Noted
                    }
                    Err(e) => Response::Error(e),
                })
            }
            other => ready(Response::Error(Error::invalid(format!(
                "{} is a topic server request; the naming server answers lookups and admin only",
                transport::request_name(&other)
            )))),
        }
    }
}

/// Runs a naming server until `shutdown`.
pub async fn run(config: NamingConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Every log line of this server (its tasks included) carries `node`.
    run_node(config, shutdown).instrument(tracing::info_span!("node", node = "naming")).await
}

async fn run_node(config: NamingConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let identity = certs::load(&config.certs_dir, CertRole::Naming)?;
    let endpoint = transport::server_endpoint(config.listen, &identity)
        .with_context(|| format!("starting the naming server on {}", config.listen))?;
    let (service, inboxes) = NamingServer::open(&config, endpoint.clone())?;
    info!(
        listen = %config.listen,
        data = %config.data_dir.display(),
        member = config.id,
        members = config.peers.len(),
        "naming server ready"
    );
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(tick(service.clone(), stop.clone()).in_current_span());
    for (to, outbox) in inboxes {
        let addr = config.peers[&to];
        let task = send_raft(service.clone(), config.id, to, addr, outbox, stop.clone());
        tasks.spawn(task.in_current_span());
    }
    if let Some(addr) = config.metrics_listen {
        let naming = service.clone();
        crate::metrics::spawn(addr, Arc::new(move || naming.render_metrics()), stop.clone());
    }
    let fatal = service.fatal.clone();
    let serving =
        tokio::spawn(transport::serve(endpoint, service, config.limits, stop.clone()).in_current_span());
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = fatal.cancelled() => {}
    }
    stop.cancel();
    let _ = serving.await;
    while tasks.join_next().await.is_some() {}
    if fatal.is_cancelled() {
        anyhow::bail!("the naming book could not be written (see the error above)");
    }
    Ok(())
}
