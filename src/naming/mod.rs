//! The naming server: the book of topic servers and topics.
//!
//! It knows which topic servers exist (id, address) and which are alive (a lease renewed by
//! heartbeats, measured on the monotonic clock), which topics exist, and for each its voters,
//! learners, leader and epoch. The book lives in redb (`book`) and survives restarts; leases
//! do not (after a restart every server has a grace period to report in before it can be
//! taken for dead). Every decision is made by the core without I/O (`core`); this module
//! carries its requests, makes its changes durable before anyone hears of them, and sends its
//! promise requests.
//!
//! Servers learn what they host from heartbeat answers: a heartbeat is a long poll that
//! returns at once when the book changed since the version the server knows, so a created
//! topic reaches its servers within a round trip, and a server that was down catches up on
//! its first heartbeat. `CreateTopic` answers once every replica has applied the change.

pub mod book;
pub mod core;
pub mod member;
pub mod raft;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::{debug, info, warn};

use self::book::{BookChange, BookStore};
use self::core::{Liveness, NamingCore, PromiseAsk, Settings, Step};
use crate::certs::{self, CertRole};
use crate::error::Error;
use crate::metrics::EndpointMetrics;
use crate::transport::{self, ready, Connection, Peer, ResponseFuture, Service};
use crate::types::{mono_ms, now_ms, ServerId, TopicName};
use crate::wire::{Request, Response, TopicChanges, TopicConfig, TopicReport};

/// How long a server counts as alive after its last heartbeat, by default. Failover takes
/// about this long; heartbeats come every third of it, so a server must stall for about two
/// thirds of a lease before it is taken for dead.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(1);

/// How long a replica may be dead before it is replaced, by default.
pub const DEFAULT_REPLACE_AFTER: Duration = Duration::from_secs(60);

/// How long `CreateTopic` waits for the replicas to take the topic on.
const PLACEMENT_WAIT: Duration = Duration::from_secs(5);

/// Settings of `herald naming`.
#[derive(Debug, Clone)]
pub struct NamingConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub certs_dir: PathBuf,
    pub lease: Duration,
    /// How long a replica may be dead before another server takes its place.
    pub replace_after: Duration,
    /// Where to serve Prometheus metrics (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
}

pub struct NamingServer {
    store: BookStore,
    core: Mutex<NamingCore>,
    version: watch::Sender<u64>,
    applied: watch::Sender<()>,
    lease: Duration,
    metrics: Arc<EndpointMetrics>,
    elections: Counter,
}

impl NamingServer {
    /// Opens the book in `dir` (creating it on first start).
    pub fn open(dir: &std::path::Path, lease: Duration, replace_after: Duration) -> anyhow::Result<Self> {
        let (store, book) = BookStore::open(dir)?;
        info!(
            servers = book.servers.len(),
            topics = book.topics.len(),
            version = book.version,
            "naming book loaded"
        );
        let version = book.version;
        let settings = Settings::new(lease.as_millis() as u64, replace_after.as_millis() as u64);
        Ok(Self {
            store,
            core: Mutex::new(NamingCore::new(book, settings, mono_ms())),
            version: watch::Sender::new(version),
            applied: watch::Sender::new(()),
            lease,
            metrics: Arc::default(),
            elections: Counter::default(),
        })
    }

    fn core(&self) -> std::sync::MutexGuard<'_, NamingCore> {
        self.core.lock().expect("core lock")
    }

    /// Everything `--metrics-listen` shows, read now.
    pub fn render_metrics(&self) -> String {
        let mut registry = Registry::default();
        self.metrics.register(&mut registry);
        registry.register("herald_elections", "Leaders elected by the naming server", self.elections.clone());
        let servers = Family::<StateLabels, Gauge>::default();
        let topics = Gauge::<i64>::default();
        {
            let core = self.core();
            let now = mono_ms();
            for id in core.book().servers.keys() {
                let state = match core.liveness(*id, now) {
                    Liveness::Alive => "alive",
                    Liveness::Dead => "dead",
                    Liveness::Unknown => "unknown",
                };
                servers.get_or_create(&StateLabels { state }).inc();
            }
            topics.set(core.book().topics.len() as i64);
        }
        registry.register(
            "herald_topic_servers",
            "Registered topic servers, alive, dead or unknown",
            servers,
        );
        registry.register("herald_topics", "Topics in the book", topics);
        crate::metrics::encode(&registry)
    }

    /// Makes `change` durable, then applies it and tells the servers (in that order).
    fn commit(&self, core: &mut NamingCore, change: &BookChange) -> Result<u64, Error> {
        let version = core.book().version + 1;
        self.store
            .save(change, version)
            .map_err(|e| Error::Storage { server: 0, detail: format!("naming server book: {e}") })?;
        core.apply(change);
        self.version.send_replace(version);
        Ok(version)
    }

    fn require_node(peer: &Peer, what: &str) -> Result<(), Error> {
        if peer.is_node {
            Ok(())
        } else {
            Err(Error::Unauthorized {
                detail: format!(
                    "{what} needs the cluster's node certificate; {} presented another",
                    peer.addr
                ),
            })
        }
    }

    fn register(&self, peer: &Peer, server: ServerId, addr: SocketAddr) -> Result<Response, Error> {
        Self::require_node(peer, "registering a topic server")?;
        let mut core = self.core();
        if let Some(change) = core.register(mono_ms(), server, addr) {
            self.commit(&mut core, &change)?;
            info!(server, %addr, "topic server registered");
        }
        Ok(Response::Registered { lease_ms: self.lease.as_millis() as u32, cluster: core.book().cluster_id })
    }

    fn heartbeat(
        self: &Arc<Self>,
        peer: &Peer,
        server: ServerId,
        known_version: u64,
        applied_version: u64,
        wait_ms: u32,
        reports: Vec<TopicReport>,
    ) -> ResponseFuture {
        if let Err(e) = Self::require_node(peer, "heartbeating") {
            return ready(Response::Error(e));
        }
        if let Err(e) = self.core().heartbeat(mono_ms(), server, applied_version, reports) {
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
            let core = me.core();
            let current = core.book().version;
            let assignments = (current != known_version).then(|| core.assignments_for(server));
            Response::Heartbeat { version: current, assignments }
        })
    }

    /// Applies a change a request decided, then answers once its topic's replicas applied it
    /// (or after [`PLACEMENT_WAIT`]), so what the caller does next sees the change.
    fn change_topic(
        self: &Arc<Self>,
        name: TopicName,
        decide: impl FnOnce(&NamingCore) -> Result<BookChange, Error>,
    ) -> ResponseFuture {
        let committed = {
            let mut core = self.core();
            decide(&core).and_then(|change| self.commit(&mut core, &change))
        };
        let version = match committed {
            Ok(v) => v,
            Err(e) => return ready(Response::Error(e)),
        };
        let me = self.clone();
        Box::pin(async move {
            let mut applied = me.applied.subscribe();
            let deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
            loop {
                let done = {
                    let core = me.core();
                    match core.book().topics.get(name.as_str()) {
                        Some(t) => core.applied_by_all(t, version),
                        None => true,
                    }
                };
                if done || tokio::time::timeout_at(deadline, applied.changed()).await.is_err() {
                    break;
                }
            }
            me.core().lookup(&name).map(Response::Topic).unwrap_or_else(Response::Error)
        })
    }

    fn create_topic(self: &Arc<Self>, name: TopicName, replicas: u32, config: TopicConfig) -> ResponseFuture {
        let topic = name.clone();
        self.change_topic(topic, move |core| {
            let change = core.create_topic(mono_ms(), now_ms(), name.clone(), replicas, config)?;
            let voters = change.topics.first().map(|t| t.voters.clone()).unwrap_or_default();
            info!(topic = %name, ?voters, "topic created");
            Ok(change)
        })
    }

    /// Changes a topic's policies; they apply to batches produced after the answer.
    fn alter_topic(self: &Arc<Self>, name: TopicName, changes: TopicChanges) -> ResponseFuture {
        let topic = name.clone();
        self.change_topic(topic, move |core| {
            let change = core.alter_topic(&name, changes)?;
            if let Some(t) = change.topics.first() {
                info!(topic = %name, schema = t.config.schema.is_some(), backlog_limit = ?t.config.backlog_limit, policy = t.config.backlog_policy.as_str(), "topic altered");
            }
            Ok(change)
        })
    }

    fn delete_topic(&self, name: &TopicName) -> Result<Response, Error> {
        let mut core = self.core();
        let change = core.delete_topic(name)?;
        self.commit(&mut core, &change)?;
        info!(topic = %name, "topic deleted");
        Ok(Response::Deleted)
    }

    /// Carries out one decision of the core: durable change first, then its promise requests.
    fn run_step(self: &Arc<Self>, endpoint: &quinn::Endpoint, step: Step) {
        if let Some(change) = &step.change {
            let mut core = self.core();
            if let Err(e) = self.commit(&mut core, change) {
                warn!(error = %e, decision = %step.note, "could not make a decision durable; it is dropped");
                return;
            }
        }
        if step.elected {
            self.elections.inc();
        }
        if !step.note.is_empty() {
            info!("{}", step.note);
        }
        for ask in step.asks {
            tokio::spawn(ask_promise(self.clone(), endpoint.clone(), ask).in_current_span());
        }
    }
}

/// Asks one voter to promise an epoch, and hands its answer to the core.
async fn ask_promise(naming: Arc<NamingServer>, endpoint: quinn::Endpoint, ask: PromiseAsk) {
    let wait = Duration::from_millis(naming.core().settings().promise_wait_ms);
    let req = Request::Promise { topic: ask.name.clone(), topic_id: ask.topic, epoch: ask.epoch };
    let call = async {
        let conn = Connection::connect(&endpoint, ask.addr).await?;
        let answer = conn.call(&req).await;
        conn.close();
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
    naming.core().on_promise(mono_ms(), ask.topic, ask.epoch, ask.server, answer);
}

/// Runs the core's periodic decisions: elections and replacements.
async fn decide(naming: Arc<NamingServer>, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
    // Fine-grained, so an election starts within ~5 % of a lease of the expiry.
    let tick = (naming.lease / 20).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let steps = naming.core().tick(mono_ms());
        for step in steps {
            naming.run_step(&endpoint, step);
        }
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
        let answer = |r: Result<Response, Error>| ready(r.unwrap_or_else(Response::Error));
        match req {
            Request::Register { server, addr } => answer(self.register(peer, server, addr)),
            Request::Heartbeat { server, known_version, applied_version, wait_ms, reports } => {
                self.heartbeat(peer, server, known_version, applied_version, wait_ms, reports)
            }
            Request::CreateTopic { name, replicas, config } => self.create_topic(name, replicas, config),
            Request::DeleteTopic { name } => answer(self.delete_topic(&name)),
            Request::AlterTopic { name, changes } => self.alter_topic(name, changes),
            Request::LookupTopic { name } => answer(self.core().lookup(&name).map(Response::Topic)),
            Request::ListTopics => ready(Response::Topics(self.core().list_topics())),
            Request::ListServers => ready(Response::Servers(self.core().list_servers(mono_ms()))),
            other => answer(Err(Error::invalid(format!(
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
    let identity = certs::load(&config.certs_dir, CertRole::Node)?;
    let service = Arc::new(NamingServer::open(&config.data_dir, config.lease, config.replace_after)?);
    let endpoint = transport::server_endpoint(config.listen, &identity)
        .with_context(|| format!("starting the naming server on {}", config.listen))?;
    info!(listen = %config.listen, data = %config.data_dir.display(), "naming server ready");
    let decisions =
        tokio::spawn(decide(service.clone(), endpoint.clone(), shutdown.clone()).in_current_span());
    if let Some(addr) = config.metrics_listen {
        let naming = service.clone();
        crate::metrics::spawn(addr, Arc::new(move || naming.render_metrics()), shutdown.clone());
    }
    transport::serve(endpoint, service, shutdown).await;
    let _ = decisions.await;
    Ok(())
}
