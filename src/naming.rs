//! The naming server: the book of topic servers and topics.
//!
//! It knows which topic servers exist (id, address) and which are alive (a lease renewed by
//! heartbeats, measured on the monotonic clock), which topics exist, and for each its
//! replica set, leader and epoch. The book lives in redb and survives restarts; leases do
//! not (after a restart every server is considered dead until it heartbeats again, which
//! takes at most a third of a lease).
//!
//! Servers learn what they host from heartbeat answers: a heartbeat is a long poll that
//! returns at once when the book changed since the version the server knows, so a created
//! topic reaches its servers within a round trip, and a server that was down catches up on
//! its first heartbeat. `CreateTopic` answers once every replica has applied the change.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::{debug, info, warn};

use crate::certs::{self, CertRole};
use crate::error::Error;
use crate::metrics::EndpointMetrics;
use crate::replication;
use crate::transport::{self, ready, Connection, Peer, ResponseFuture, Service};
use crate::types::{now_ms, Epoch, ServerId, TopicId, TopicName};
use crate::wire::{
    ReplicaInfo, Request, Response, ServerInfo, TopicChanges, TopicConfig, TopicInfo, MAX_RECORD_BYTES_LIMIT,
};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;

const SERVERS: TableDefinition<u64, &[u8]> = TableDefinition::new("servers");
const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Version of the book's on-disk layout. 2: topic policies in the topic config.
const BOOK_FORMAT: u64 = 2;

/// How long a server counts as alive after its last heartbeat, by default. Failover takes
/// about this long; heartbeats come every third of it, so a server must stall for about two
/// thirds of a lease before it is taken for dead.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(1);

/// How long a replica may be dead before it is replaced, by default.
pub const DEFAULT_REPLACE_AFTER: Duration = Duration::from_secs(60);

/// How long `CreateTopic` waits for the replicas to take the topic on.
const PLACEMENT_WAIT: Duration = Duration::from_secs(5);

/// Most replicas a topic may ask for.
const MAX_REPLICAS: u32 = 16;

/// How long an election waits for each replica's promise.
const PROMISE_WAIT: Duration = Duration::from_secs(1);

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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ServerRecord {
    id: ServerId,
    addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TopicRecord {
    id: TopicId,
    name: TopicName,
    config: TopicConfig,
    replicas: Vec<ServerId>,
    leader: ServerId,
    /// The epoch the current leader was chosen in.
    epoch: Epoch,
    /// The newest epoch any election used (at least `epoch`). Kept apart from `epoch` so an
    /// election under way never shows servers a leader it has not chosen.
    election_epoch: Epoch,
    created_ms: u64,
}

/// The persistent book plus the in-memory liveness view.
struct Book {
    servers: BTreeMap<ServerId, ServerRecord>,
    topics: BTreeMap<String, TopicRecord>,
    version: u64,
    next_topic_id: TopicId,
    cluster_id: u64,
    leases: HashMap<ServerId, Instant>,
    applied: HashMap<ServerId, u64>,
    /// Leaders' latest reports of which replicas hold everything they have, with when.
    caught_up: HashMap<TopicId, (Instant, Vec<ServerId>)>,
}

pub struct NamingServer {
    db: Database,
    book: Mutex<Book>,
    version: watch::Sender<u64>,
    applied: watch::Sender<()>,
    lease: Duration,
    replace_after: Duration,
    started: Instant,
    metrics: Arc<EndpointMetrics>,
    elections: Counter,
}

impl NamingServer {
    /// Opens the book in `dir` (creating it on first start).
    pub fn open(dir: &Path, lease: Duration, replace_after: Duration) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("naming.redb");
        let db = Database::create(&path).map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        let txn = db.begin_write()?;
        let cluster_id = {
            let mut meta = txn.open_table(META)?;
            let id = meta.get("cluster_id")?.map(|v| v.value());
            // A book from before the format was recorded is format 1.
            let format = meta.get("format")?.map(|v| v.value()).or(id.map(|_| 1));
            if let Some(f) = format.filter(|f| *f != BOOK_FORMAT) {
                anyhow::bail!(
                    "{} holds a naming book in format {f}; this Herald reads format {BOOK_FORMAT} (no migration between them yet: use a new --data directory)",
                    dir.display()
                );
            }
            meta.insert("format", BOOK_FORMAT)?;
            let id = id.unwrap_or_else(|| fastrand::u64(1..u64::MAX));
            meta.insert("cluster_id", id)?;
            txn.open_table(SERVERS)?;
            txn.open_table(TOPICS)?;
            id
        };
        txn.commit()?;
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let get = |k: &str| -> anyhow::Result<Option<u64>> { Ok(meta.get(k)?.map(|v| v.value())) };
        let version = get("version")?.unwrap_or(0);
        let next_topic_id = get("next_topic_id")?.unwrap_or(1);
        let mut servers = BTreeMap::new();
        for entry in txn.open_table(SERVERS)?.iter()? {
            let (_, v) = entry?;
            let s: ServerRecord = postcard::from_bytes(v.value())?;
            servers.insert(s.id, s);
        }
        let mut topics = BTreeMap::new();
        for entry in txn.open_table(TOPICS)?.iter()? {
            let (_, v) = entry?;
            let t: TopicRecord = postcard::from_bytes(v.value())?;
            topics.insert(t.name.to_string(), t);
        }
        drop(meta);
        drop(txn);
        info!(servers = servers.len(), topics = topics.len(), version, "naming book loaded");
        let book = Book {
            servers,
            topics,
            version,
            next_topic_id,
            cluster_id,
            leases: HashMap::new(),
            applied: HashMap::new(),
            caught_up: HashMap::new(),
        };
        Ok(Self {
            db,
            book: Mutex::new(book),
            version: watch::Sender::new(version),
            applied: watch::Sender::new(()),
            lease,
            replace_after,
            started: Instant::now(),
            metrics: Arc::default(),
            elections: Counter::default(),
        })
    }

    /// Everything `--metrics-listen` shows, read now.
    pub fn render_metrics(&self) -> String {
        let mut registry = Registry::default();
        self.metrics.register(&mut registry);
        registry.register(
            "herald_elections",
            "Leaders elected after a leader's lease ran out",
            self.elections.clone(),
        );
        let servers = Family::<StateLabels, Gauge>::default();
        let topics = Gauge::<i64>::default();
        {
            let book = self.book.lock().expect("book lock");
            for id in book.servers.keys() {
                let state = if self.is_alive(&book, *id) { "alive" } else { "dead" };
                servers.get_or_create(&StateLabels { state }).inc();
            }
            topics.set(book.topics.len() as i64);
        }
        registry.register("herald_topic_servers", "Registered topic servers, alive or dead", servers);
        registry.register("herald_topics", "Topics in the book", topics);
        crate::metrics::encode(&registry)
    }

    fn storage_err(e: impl std::fmt::Display) -> Error {
        Error::Storage { server: 0, detail: format!("naming server book: {e}") }
    }

    /// Writes the book's changes in one durable transaction.
    fn persist(
        &self,
        book: &Book,
        server: Option<&ServerRecord>,
        topic: Option<&TopicRecord>,
        removed_topic: Option<&str>,
    ) -> Result<(), Error> {
        let run = || -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                meta.insert("version", book.version)?;
                meta.insert("next_topic_id", book.next_topic_id)?;
                if let Some(s) = server {
                    let bytes = postcard::to_stdvec(s).expect("encodes");
                    txn.open_table(SERVERS)?.insert(s.id, bytes.as_slice())?;
                }
                if let Some(t) = topic {
                    let bytes = postcard::to_stdvec(t).expect("encodes");
                    txn.open_table(TOPICS)?.insert(t.name.as_str(), bytes.as_slice())?;
                }
                if let Some(name) = removed_topic {
                    txn.open_table(TOPICS)?.remove(name)?;
                }
            }
            txn.commit()?;
            Ok(())
        };
        run().map_err(Self::storage_err)
    }

    fn is_alive(&self, book: &Book, id: ServerId) -> bool {
        book.leases.get(&id).is_some_and(|t| t.elapsed() < self.lease)
    }

    fn topic_info(book: &Book, t: &TopicRecord) -> TopicInfo {
        TopicInfo {
            id: t.id,
            name: t.name.clone(),
            config: t.config.clone(),
            replicas: t
                .replicas
                .iter()
                .filter_map(|id| book.servers.get(id).map(|s| ReplicaInfo { server: s.id, addr: s.addr }))
                .collect(),
            leader: t.leader,
            epoch: t.epoch,
            created_ms: t.created_ms,
        }
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
        let mut book = self.book.lock().expect("book lock");
        let record = ServerRecord { id: server, addr };
        let changed = book.servers.get(&server).is_none_or(|s| s.addr != addr);
        if changed {
            book.version += 1;
            book.servers.insert(server, record.clone());
            self.persist(&book, Some(&record), None, None)?;
            self.version.send_replace(book.version);
            info!(server, %addr, "topic server registered");
        }
        book.leases.insert(server, Instant::now());
        Ok(Response::Registered { lease_ms: self.lease.as_millis() as u32, cluster: book.cluster_id })
    }

    #[allow(clippy::too_many_arguments)]
    fn heartbeat(
        self: &Arc<Self>,
        peer: &Peer,
        server: ServerId,
        known_version: u64,
        applied_version: u64,
        wait_ms: u32,
        caught_up: Vec<(TopicId, Vec<ServerId>)>,
    ) -> ResponseFuture {
        if let Err(e) = Self::require_node(peer, "heartbeating") {
            return ready(Response::Error(e));
        }
        {
            let mut book = self.book.lock().expect("book lock");
            if !book.servers.contains_key(&server) {
                return ready(Response::Error(Error::Unavailable {
                    detail: format!("server {server} is not registered; register first"),
                }));
            }
            let now = Instant::now();
            book.leases.insert(server, now);
            let applied = book.applied.entry(server).or_default();
            *applied = (*applied).max(applied_version);
            for (topic, replicas) in caught_up {
                book.caught_up.insert(topic, (now, replicas));
            }
        }
        self.applied.send_replace(());
        let me = self.clone();
        let wait = Duration::from_millis(wait_ms as u64).min(self.lease / 3);
        Box::pin(async move {
            let mut version = me.version.subscribe();
            if *version.borrow_and_update() == known_version {
                let _ = tokio::time::timeout(wait, version.changed()).await;
            }
            let book = me.book.lock().expect("book lock");
            let assignments = (book.version != known_version).then(|| {
                book.topics
                    .values()
                    .filter(|t| t.replicas.contains(&server))
                    .map(|t| Self::topic_info(&book, t))
                    .collect()
            });
            Response::Heartbeat { version: book.version, assignments }
        })
    }

    fn create_topic(self: &Arc<Self>, name: TopicName, replicas: u32, config: TopicConfig) -> ResponseFuture {
        let placed = (|| {
            if replicas == 0 || replicas > MAX_REPLICAS {
                return Err(Error::invalid(format!("--replicas must be 1..={MAX_REPLICAS}, got {replicas}")));
            }
            if let Some(schema) = &config.schema {
                crate::policy::compile_schema(schema)?;
            }
            if config.backlog_limit == Some(0) {
                return Err(Error::invalid("--backlog-limit must be at least 1 byte"));
            }
            if config.max_record_bytes == 0 || config.max_record_bytes > MAX_RECORD_BYTES_LIMIT {
                return Err(Error::invalid(format!(
                    "--max-record-bytes must be 1..={MAX_RECORD_BYTES_LIMIT}, got {}",
                    config.max_record_bytes
                )));
            }
            let mut book = self.book.lock().expect("book lock");
            if book.topics.contains_key(name.as_str()) {
                return Err(Error::TopicExists { topic: name.to_string() });
            }
            // Least loaded live servers first; ties by id, so placement is predictable.
            let mut load: BTreeMap<ServerId, usize> =
                book.servers.keys().filter(|id| self.is_alive(&book, **id)).map(|id| (*id, 0)).collect();
            for t in book.topics.values() {
                for r in &t.replicas {
                    if let Some(n) = load.get_mut(r) {
                        *n += 1;
                    }
                }
            }
            if load.len() < replicas as usize {
                return Err(Error::NotEnoughServers { requested: replicas, live: load.len() as u32 });
            }
            let mut candidates: Vec<(usize, ServerId)> = load.into_iter().map(|(id, n)| (n, id)).collect();
            candidates.sort();
            let chosen: Vec<ServerId> =
                candidates.into_iter().take(replicas as usize).map(|(_, id)| id).collect();
            let record = TopicRecord {
                id: book.next_topic_id,
                name: name.clone(),
                config,
                leader: chosen[0],
                replicas: chosen,
                epoch: 1,
                election_epoch: 1,
                created_ms: now_ms(),
            };
            book.next_topic_id += 1;
            book.version += 1;
            book.topics.insert(name.to_string(), record.clone());
            if let Err(e) = self.persist(&book, None, Some(&record), None) {
                book.topics.remove(name.as_str());
                book.version -= 1;
                book.next_topic_id -= 1;
                return Err(e);
            }
            self.version.send_replace(book.version);
            info!(topic = %name, id = record.id, replicas = ?record.replicas, "topic created");
            Ok((book.version, record))
        })();
        // Answer once the replicas host it, so the producer's first request finds it.
        self.answer_when_applied(placed)
    }

    /// Answers with the topic once its replicas applied book `version` (or after
    /// [`PLACEMENT_WAIT`]), so what the caller does next sees the change.
    fn answer_when_applied(self: &Arc<Self>, changed: Result<(u64, TopicRecord), Error>) -> ResponseFuture {
        let me = self.clone();
        Box::pin(async move {
            let (version, record) = match changed {
                Ok(p) => p,
                Err(e) => return Response::Error(e),
            };
            let mut applied = me.applied.subscribe();
            let deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
            loop {
                let done = {
                    let book = me.book.lock().expect("book lock");
                    record.replicas.iter().all(|r| book.applied.get(r).copied().unwrap_or(0) >= version)
                };
                if done || tokio::time::timeout_at(deadline, applied.changed()).await.is_err() {
                    break;
                }
            }
            let book = me.book.lock().expect("book lock");
            let record = book.topics.get(record.name.as_str()).unwrap_or(&record);
            Response::Topic(Self::topic_info(&book, record))
        })
    }

    /// Changes a topic's policies; they apply to batches produced after the answer.
    fn alter_topic(self: &Arc<Self>, name: TopicName, changes: TopicChanges) -> ResponseFuture {
        let changed = (|| {
            if let Some(Some(schema)) = &changes.schema {
                crate::policy::compile_schema(schema)?;
            }
            if changes.backlog_limit == Some(Some(0)) {
                return Err(Error::invalid("--backlog-limit must be at least 1 byte"));
            }
            let mut book = self.book.lock().expect("book lock");
            let Some(old) = book.topics.get(name.as_str()).cloned() else {
                return Err(Error::UnknownTopic { topic: name.to_string() });
            };
            let mut record = old.clone();
            if let Some(schema) = changes.schema {
                record.config.schema = schema;
            }
            if let Some(limit) = changes.backlog_limit {
                record.config.backlog_limit = limit;
            }
            if let Some(policy) = changes.backlog_policy {
                record.config.backlog_policy = policy;
            }
            book.version += 1;
            book.topics.insert(name.to_string(), record.clone());
            if let Err(e) = self.persist(&book, None, Some(&record), None) {
                book.topics.insert(name.to_string(), old);
                book.version -= 1;
                return Err(e);
            }
            self.version.send_replace(book.version);
            info!(topic = %name, schema = record.config.schema.is_some(), backlog_limit = ?record.config.backlog_limit, policy = record.config.backlog_policy.as_str(), "topic altered");
            Ok((book.version, record))
        })();
        self.answer_when_applied(changed)
    }

    fn delete_topic(&self, name: &TopicName) -> Result<Response, Error> {
        let mut book = self.book.lock().expect("book lock");
        let Some(record) = book.topics.remove(name.as_str()) else {
            return Err(Error::UnknownTopic { topic: name.to_string() });
        };
        book.version += 1;
        if let Err(e) = self.persist(&book, None, None, Some(name.as_str())) {
            book.version -= 1;
            book.topics.insert(name.to_string(), record);
            return Err(e);
        }
        self.version.send_replace(book.version);
        info!(topic = %name, "topic deleted");
        Ok(Response::Deleted)
    }

    fn lookup(&self, name: &TopicName) -> Result<Response, Error> {
        let book = self.book.lock().expect("book lock");
        match book.topics.get(name.as_str()) {
            Some(t) => Ok(Response::Topic(Self::topic_info(&book, t))),
            None => Err(Error::UnknownTopic { topic: name.to_string() }),
        }
    }

    fn list_topics(&self) -> Response {
        let book = self.book.lock().expect("book lock");
        Response::Topics(book.topics.values().map(|t| Self::topic_info(&book, t)).collect())
    }

    fn list_servers(&self) -> Response {
        let book = self.book.lock().expect("book lock");
        let servers = book
            .servers
            .values()
            .map(|s| ServerInfo {
                id: s.id,
                addr: s.addr,
                alive: self.is_alive(&book, s.id),
                topics: book.topics.values().filter(|t| t.replicas.contains(&s.id)).count() as u32,
            })
            .collect();
        Response::Servers(servers)
    }
}

impl NamingServer {
    /// Topics whose leader's lease has expired and that can elect another: a majority of
    /// their replicas is alive (otherwise an election could not succeed, and each attempt
    /// would burn an epoch and an fsync).
    fn leaderless(&self) -> Vec<String> {
        let book = self.book.lock().expect("book lock");
        book.topics
            .values()
            .filter(|t| t.replicas.len() > 1 && !self.is_alive(&book, t.leader))
            .filter(|t| {
                let alive = t.replicas.iter().filter(|r| self.is_alive(&book, **r)).count();
                alive >= replication::majority(t.replicas.len())
            })
            .map(|t| t.name.to_string())
            .collect()
    }

    /// Runs one election for `topic`: bump the election epoch durably, collect promises from
    /// the replicas that answer, pick the most up-to-date of a majority, and publish it.
    async fn elect(
        self: &Arc<Self>,
        endpoint: &quinn::Endpoint,
        topic: &str,
    ) -> Result<Option<ServerId>, Error> {
        let (record, epoch, addrs) = {
            let mut book = self.book.lock().expect("book lock");
            let Some(t) = book.topics.get_mut(topic) else { return Ok(None) };
            t.election_epoch = t.election_epoch.max(t.epoch) + 1;
            let record = t.clone();
            // Only replicas with a live lease are asked: a dead one would cost the whole
            // promise timeout, and any majority is enough for a safe choice.
            let addrs: Vec<(ServerId, SocketAddr)> = record
                .replicas
                .iter()
                .filter(|id| self.is_alive(&book, **id))
                .filter_map(|id| book.servers.get(id).map(|s| (s.id, s.addr)))
                .collect();
            self.persist(&book, None, Some(&record), None)?;
            (record.clone(), record.election_epoch, addrs)
        };
        info!(topic, epoch, "leader lease expired; electing");
        let mut asks = tokio::task::JoinSet::new();
        for (server, addr) in addrs {
            let endpoint = endpoint.clone();
            let req = Request::Promise { topic: record.name.clone(), topic_id: record.id, epoch };
            asks.spawn(async move {
                let ask = async {
                    let conn = Connection::connect(&endpoint, addr).await?;
                    let answer = conn.call(&req).await;
                    conn.close();
                    answer
                };
                match tokio::time::timeout(PROMISE_WAIT, ask).await {
                    Ok(Ok(Response::Promised { last_epoch, log_end })) => Some((server, last_epoch, log_end)),
                    Ok(Ok(_)) | Err(_) => None,
                    Ok(Err(e)) => {
                        debug!(server, error = %e, "no promise");
                        None
                    }
                }
            });
        }
        let mut reports = Vec::new();
        while let Some(r) = asks.join_next().await {
            if let Ok(Some(report)) = r {
                reports.push(report);
            }
        }
        let Some(winner) = replication::choose_leader(&record.replicas, &reports) else {
            warn!(
                topic,
                epoch,
                answered = reports.len(),
                replicas = record.replicas.len(),
                "no majority answered; the topic has no leader until one does"
            );
            return Ok(None);
        };
        let mut book = self.book.lock().expect("book lock");
        let Some(t) = book.topics.get_mut(topic) else { return Ok(None) };
        if t.id != record.id || t.election_epoch != epoch {
            return Ok(None); // deleted, or a newer election started meanwhile
        }
        t.leader = winner;
        t.epoch = epoch;
        let record = t.clone();
        book.version += 1;
        self.persist(&book, None, Some(&record), None)?;
        self.version.send_replace(book.version);
        info!(topic, epoch, leader = winner, ?reports, "leader elected");
        self.elections.inc();
        Ok(Some(winner))
    }
}

impl NamingServer {
    /// When `server` was last heard from (the naming server's start if never, since then).
    fn last_seen(&self, book: &Book, server: ServerId) -> Instant {
        book.leases.get(&server).copied().unwrap_or(self.started)
    }

    /// Replaces, in each topic, one replica dead for longer than `replace_after` by the least
    /// loaded live server outside the replica set, in a new epoch under the same leader. Only
    /// when the leader is alive and reported, after the dead replica was last heard from, that
    /// every other live replica holds everything it has: then a majority of the new set holds
    /// every committed record, so no later failure of a minority can lose one.
    fn replace_lost_replicas(&self) -> Result<(), Error> {
        let mut book = self.book.lock().expect("book lock");
        let mut load: HashMap<ServerId, usize> = HashMap::new();
        for t in book.topics.values() {
            for r in &t.replicas {
                *load.entry(*r).or_default() += 1;
            }
        }
        let names: Vec<String> = book.topics.keys().cloned().collect();
        for name in names {
            let t = &book.topics[&name];
            if t.replicas.len() < 2 || !self.is_alive(&book, t.leader) {
                continue;
            }
            let Some(&lost) = t.replicas.iter().find(|r| {
                !self.is_alive(&book, **r) && self.last_seen(&book, **r).elapsed() > self.replace_after
            }) else {
                continue;
            };
            let safe = book.caught_up.get(&t.id).is_some_and(|(when, holders)| {
                *when > self.last_seen(&book, lost)
                    && t.replicas
                        .iter()
                        .filter(|r| **r != lost && self.is_alive(&book, **r))
                        .all(|r| holders.contains(r))
            });
            if !safe {
                continue;
            }
            let candidate = book
                .servers
                .keys()
                .filter(|s| !t.replicas.contains(s) && self.is_alive(&book, **s))
                .min_by_key(|s| (load.get(s).copied().unwrap_or(0), **s))
                .copied();
            let Some(new) = candidate else { continue };
            let t = book.topics.get_mut(&name).expect("topic");
            for r in t.replicas.iter_mut() {
                if *r == lost {
                    *r = new;
                }
            }
            t.election_epoch = t.election_epoch.max(t.epoch) + 1;
            t.epoch = t.election_epoch;
            let record = t.clone();
            *load.entry(new).or_default() += 1;
            book.version += 1;
            self.persist(&book, None, Some(&record), None)?;
            self.version.send_replace(book.version);
            info!(topic = %name, lost, new, epoch = record.epoch, "replaced a lost replica");
        }
        Ok(())
    }
}

/// Watches leaders' leases and elects new leaders for topics whose leader died.
async fn watch_leaders(naming: Arc<NamingServer>, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
    let started = Instant::now();
    // Fine-grained, so an election starts within ~5 % of a lease of the expiry.
    let tick = (naming.lease / 20).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        // After a restart, leases are unknown: give every server one lease to heartbeat.
        if started.elapsed() < naming.lease {
            continue;
        }
        for topic in naming.leaderless() {
            if let Err(e) = naming.elect(&endpoint, &topic).await {
                warn!(topic, error = %e, "election failed");
            }
        }
        if let Err(e) = naming.replace_lost_replicas() {
            warn!(error = %e, "replacing lost replicas failed");
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
            Request::Heartbeat { server, known_version, applied_version, wait_ms, caught_up } => {
                self.heartbeat(peer, server, known_version, applied_version, wait_ms, caught_up)
            }
            Request::CreateTopic { name, replicas, config } => self.create_topic(name, replicas, config),
            Request::DeleteTopic { name } => answer(self.delete_topic(&name)),
            Request::AlterTopic { name, changes } => self.alter_topic(name, changes),
            Request::LookupTopic { name } => answer(self.lookup(&name)),
            Request::ListTopics => ready(self.list_topics()),
            Request::ListServers => ready(self.list_servers()),
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
    let elections =
        tokio::spawn(watch_leaders(service.clone(), endpoint.clone(), shutdown.clone()).in_current_span());
    if let Some(addr) = config.metrics_listen {
        let naming = service.clone();
        crate::metrics::spawn(addr, Arc::new(move || naming.render_metrics()), shutdown.clone());
    }
    transport::serve(endpoint, service, shutdown).await;
    let _ = elections.await;
    Ok(())
}
