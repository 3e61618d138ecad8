//! The client library: admin calls, a pipelined producer and a consumer.
//!
//! A [`Client`] keeps one QUIC connection to the naming server and one per topic server it
//! talks to. Requests that fail with a retriable error (connection lost, `NotLeader`,
//! `Unavailable`) are retried after asking the naming server again, with exponential backoff
//! and jitter, until a deadline.
//!
//! The [`Producer`] keeps up to `max_inflight` batches in flight on one stream. Each batch
//! carries the producer id and a sequence number; after a failure the producer resends every
//! unacknowledged batch, in order, with the same numbers, and the leader answers the ones it
//! already stored from its dedup window: a retry never makes a second copy (G4).
//!
//! The [`Consumer`] is in `consumer.rs`.

mod consumer;
mod reader;

pub use consumer::{replica_for, Consumer, ReadFrom, ACK_EVERY, FETCH_BYTES};
pub use reader::{Located, Reader, Skipped};

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::Endpoint;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::acl::{AclView, Grant};
use crate::certs::{self, CertRole, Identity};
use crate::error::Error;
use crate::storage::PRODUCER_DEDUP_WINDOW;
use crate::transport::{self, Connection, FrameWriter};
use crate::types::{
    NamingAddrs, Offset, ProducerId, ServerId, StartFrom, SubscriptionName, TopicName, MAX_TOPICS_PER_REQUEST,
};
use crate::wire::{
    ConsumerSession, LeaderMove, Record, Request, ResetOutcome, ResetTo, Response, ServerInfo,
    SubscriptionInfo, TopicChanges, TopicConfig, TopicInfo, TopicStatus,
};

/// Batches a producer keeps in flight by default.
pub const DEFAULT_INFLIGHT: usize = 32;
/// Most batches in flight; below the leader's dedup window so every retry is recognised.
pub const MAX_INFLIGHT: usize = PRODUCER_DEDUP_WINDOW / 2;
/// Largest batch the CLI producer and `herald bench` build, in record bytes. A batch is
/// stored as one redb value, whose leaf redb allocates in a power of two of pages: at exactly
/// 1 MiB of records, the chunk's framing (1-3 bytes a record) and the leaf's header took it
/// just past 1 MiB, so every batch took 2 MiB on disk, and 1,000-byte records wrote 2.1 bytes
/// per byte stored (`/proc/PID/io`) against 1.15 with this headroom, which holds the framing
/// of [`MAX_BATCH_RECORDS`] records.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024 - 32 * 1024;
/// Most records per batch.
pub const MAX_BATCH_RECORDS: usize = 4096;
/// How long a request keeps being retried before its error is reported.
pub const DEFAULT_RETRY_DEADLINE: Duration = Duration::from_secs(30);
/// A producer with batches in flight and no answer for this long asks the naming server
/// whether the leader changed (a killed leader sends no error; its connection just goes
/// quiet until the idle timeout).
const STALL_CHECK: Duration = Duration::from_millis(500);
/// After a question to the book about a silent leader failed, how soon the client asks
/// again; each further failure waits twice as long, up to [`STALL_RECHECK_MAX`], plus jitter.
const STALL_RECHECK: Duration = Duration::from_millis(50);
/// The longest wait between two such questions: every client of a killed server asks at
/// once, and when the naming group is slow or down, doubling waits with jitter spread them
/// out (matrix F22, `herald bench clients`).
const STALL_RECHECK_MAX: Duration = Duration::from_millis(400);
/// How long one lookup about a silent leader may take before it counts as failed.
const STALL_LOOKUP_LIMIT: Duration = Duration::from_millis(500);
/// How long a client asks the naming group to hold an `AwaitLeader` (it holds one at most
/// `naming::AWAIT_LEADER_LIMIT`); the client then asks again.
const AWAIT_LEADER_WAIT: Duration = Duration::from_secs(2);
/// Extra time a consumer gives a long poll beyond its wait before suspecting the server.
const POLL_GRACE: Duration = Duration::from_secs(2);

/// Exponential backoff with jitter: each wait doubles up to a cap, plus up to half again at
/// random; bounded by a deadline, or not.
struct Backoff {
    next: Duration,
    max: Duration,
    deadline: Option<Instant>,
}

impl Backoff {
    /// For retries: 20 ms doubling to 1 s, until `deadline` from now.
    fn new(deadline: Duration) -> Self {
        Self {
            next: Duration::from_millis(20),
            max: Duration::from_secs(1),
            deadline: Some(Instant::now() + deadline),
        }
    }

    /// For a stalled client's failed questions to the book: [`STALL_RECHECK`] doubling to
    /// [`STALL_RECHECK_MAX`], for as long as it waits.
    fn recheck() -> Self {
        Self { next: STALL_RECHECK, max: STALL_RECHECK_MAX, deadline: None }
    }

    /// Sleeps before the next attempt; `false` when the deadline has passed.
    async fn wait(&mut self) -> bool {
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            return false;
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=self.next.as_millis() as u64 / 2));
        let left = self.deadline.map_or(Duration::MAX, |d| d - now);
        tokio::time::sleep((self.next + jitter).min(left)).await;
        self.next = (self.next * 2).min(self.max);
        true
    }
}

/// A connection to a Herald cluster.
pub struct Client {
    endpoint: Endpoint,
    naming_route: NamingRoute,
    naming: Mutex<Option<Connection>>,
    /// Each topic's leader as last looked up, and whether a failure made it suspect since:
    /// a topic whose leader is healthy needs no naming server at all.
    routes: std::sync::Mutex<HashMap<TopicName, Route>>,
    servers: transport::Pool,
    retry_deadline: Duration,
    /// Lookups in a row that the naming connection did not answer in time.
    naming_stalls: AtomicUsize,
}

impl Client {
    /// A client of the cluster whose naming servers are `naming`, with the client
    /// certificate from `certs_dir`. Connects lazily.
    pub fn new(naming: impl Into<NamingAddrs>, certs_dir: &Path) -> anyhow::Result<Arc<Self>> {
        let identity = certs::load(certs_dir, CertRole::Client)?;
        Self::with_identity(naming, &identity)
    }

    /// A client of the naming group at `naming` that connects as `identity` (a certificate
    /// and key signed by the cluster CA, e.g. from [`certs::load`]).
    pub fn with_identity(naming: impl Into<NamingAddrs>, identity: &Identity) -> anyhow::Result<Arc<Self>> {
        let naming = naming.into();
        let endpoint = transport::client_endpoint(naming.first(), transport::client_config(identity)?)?;
        Ok(Arc::new(Self {
            endpoint: endpoint.clone(),
            naming_route: NamingRoute::new(naming),
            routes: std::sync::Mutex::new(HashMap::new()),
            naming: Mutex::new(None),
            servers: transport::Pool::new(endpoint.clone()),
            retry_deadline: DEFAULT_RETRY_DEADLINE,
            naming_stalls: AtomicUsize::new(0),
        }))
    }

    /// Changes how long retriable failures are retried (default 30 s).
    pub fn set_retry_deadline(self: &mut Arc<Self>, deadline: Duration) {
        if let Some(me) = Arc::get_mut(self) {
            me.retry_deadline = deadline;
        }
    }

    async fn naming_conn(&self) -> Result<Connection, Error> {
        let mut guard = self.naming.lock().await;
        if let Some(c) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let conn = self.naming_route.connect(&self.endpoint).await?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn server_conn(&self, addr: SocketAddr) -> Result<Connection, Error> {
        self.servers.get(addr).await
    }

    async fn forget_server(&self, addr: SocketAddr) {
        self.servers.forget(addr).await;
    }

    /// How each naming address sees its group (one call each, no retries).
    pub async fn naming_members(&self) -> Vec<(SocketAddr, Result<crate::wire::MemberStatus, Error>)> {
        let mut calls = tokio::task::JoinSet::new();
        for (i, addr) in self.naming_route.addrs().list().iter().copied().enumerate() {
            let endpoint = self.endpoint.clone();
            calls.spawn(async move {
                let answer = async {
                    let conn = Connection::connect(&endpoint, addr).await?;
                    let answer = conn.call(&Request::NamingStatus).await;
                    conn.close();
                    match answer? {
                        Response::NamingStatus(s) => Ok(s),
                        other => {
                            Err(Error::internal(format!("unexpected answer to NamingStatus: {other:?}")))
                        }
                    }
                };
                (i, addr, answer.await)
            });
        }
        let mut answers: Vec<_> = calls.join_all().await;
        answers.sort_by_key(|(i, _, _)| *i);
        answers.into_iter().map(|(_, addr, a)| (addr, a)).collect()
    }

    /// Calls the naming group's leader, following redirects and retrying while no member
    /// answers (an election, a restart) for up to the retry deadline. A process that never
    /// reached any member fails at once instead, naming every address it tried.
    pub async fn naming_call(&self, req: &Request) -> Result<Response, Error> {
        let mut backoff = Backoff::new(self.retry_deadline);
        let mut warned = false;
        loop {
            let connected = self.naming_conn().await;
            let never_reached = connected.is_err() && !self.naming_route.reached();
            let result = match connected {
                Ok(conn) => conn.call(req).await,
                Err(e) => Err(e),
            };
            let detail = match result {
                Err(e) if self.naming_route.redirected(&e) => {
                    *self.naming.lock().await = None;
                    e.to_string()
                }
                Err(Error::Unavailable { detail }) if never_reached => {
                    return Err(Error::Unavailable {
                        detail: format!(
                            "no naming server answered ({detail}); is the cluster running? `herald dev` or `make run` starts one, --naming / HERALD_NAMING points elsewhere"
                        ),
                    });
                }
                Err(Error::Unavailable { detail }) => {
                    if !warned {
                        warn!(
                            "naming server {} unreachable ({detail}); retrying for up to {:?}",
                            self.naming_route.addrs(),
                            self.retry_deadline
                        );
                        warned = true;
                    }
                    *self.naming.lock().await = None;
                    detail
                }
                other => return other,
            };
            if !backoff.wait().await {
                return Err(Error::Unavailable {
                    detail: format!(
                        "no answer from the naming group at {} ({detail}); is a majority of its members running?",
                        self.naming_route.addrs()
                    ),
                });
            }
        }
    }

    /// Creates a topic of `replicas` replicas with `config`, placed by the naming group;
    /// answered once its replicas took it on.
    pub async fn create_topic(
        &self,
        name: &TopicName,
        replicas: u32,
        config: TopicConfig,
    ) -> Result<TopicInfo, Error> {
        match self.naming_call(&Request::CreateTopic { name: name.clone(), replicas, config }).await? {
            Response::Topic(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    /// Creates topics with one configuration, in requests of at most
    /// [`MAX_TOPICS_PER_REQUEST`] names, each all or none; returns them as placed. An error
    /// leaves the requests before it done (their topics are returned in no error).
    pub async fn create_topics(
        &self,
        names: &[TopicName],
        replicas: u32,
        config: &TopicConfig,
    ) -> Result<Vec<TopicInfo>, Error> {
        let mut created = Vec::with_capacity(names.len());
        for chunk in names.chunks(MAX_TOPICS_PER_REQUEST) {
            let req = Request::CreateTopics { names: chunk.to_vec(), replicas, config: config.clone() };
            match self.naming_call(&req).await? {
                Response::Topics(topics) => created.extend(topics),
                other => return Err(unexpected(other)),
            }
        }
        Ok(created)
    }

    /// Deletes topics, in requests of at most [`MAX_TOPICS_PER_REQUEST`] names, each all or
    /// none.
    pub async fn delete_topics(&self, names: &[TopicName]) -> Result<(), Error> {
        for chunk in names.chunks(MAX_TOPICS_PER_REQUEST) {
            match self.naming_call(&Request::DeleteTopics { names: chunk.to_vec() }).await? {
                Response::Deleted => {}
                other => return Err(unexpected(other)),
            }
        }
        Ok(())
    }

    /// Hands every topic whose preferred leader is alive and caught up back to it; returns
    /// every topic that was not led by its preferred leader and whether it moved.
    pub async fn rebalance(&self) -> Result<Vec<LeaderMove>, Error> {
        match self.naming_call(&Request::Rebalance).await? {
            Response::Rebalanced(moves) => Ok(moves),
            other => Err(unexpected(other)),
        }
    }

    /// Changes a topic's policies; they apply to what is produced after this returns.
    pub async fn alter_topic(&self, name: &TopicName, changes: TopicChanges) -> Result<TopicInfo, Error> {
        match self.naming_call(&Request::AlterTopic { name: name.clone(), changes }).await? {
            Response::Topic(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    /// Gives and takes back grants (superusers only); returns every grant after the change.
    pub async fn change_acl(&self, grant: Vec<Grant>, revoke: Vec<Grant>) -> Result<AclView, Error> {
        match self.naming_call(&Request::ChangeAcl { grant, revoke }).await? {
            Response::Grants(view) => Ok(view),
            other => Err(unexpected(other)),
        }
    }

    /// Retires a dead server that holds no replica (superusers only).
    pub async fn remove_server(&self, server: ServerId) -> Result<(), Error> {
        match self.naming_call(&Request::RemoveServer { server }).await? {
            Response::Deleted => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Every grant and the superusers (superusers only).
    pub async fn list_grants(&self) -> Result<AclView, Error> {
        match self.naming_call(&Request::ListGrants).await? {
            Response::Grants(view) => Ok(view),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a topic and everything stored for it on every replica.
    pub async fn delete_topic(&self, name: &TopicName) -> Result<(), Error> {
        match self.naming_call(&Request::DeleteTopic { name: name.clone() }).await? {
            Response::Deleted => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// One attempt to look a topic up, within `limit`: for a producer that wonders whether
    /// its leader changed, and must not stop taking acks meanwhile if the naming server is
    /// slow or down.
    pub async fn lookup_once(&self, name: &TopicName, limit: Duration) -> Result<TopicInfo, Error> {
        self.topic_once(&Request::LookupTopic { name: name.clone() }, limit).await
    }

    /// One attempt to hear of `name`'s next leader: the naming group answers once the
    /// topic's epoch is past `past_epoch`, or after `wait` with the entry as it stands.
    pub async fn await_leader_once(
        &self,
        name: &TopicName,
        past_epoch: crate::types::Epoch,
        wait: Duration,
    ) -> Result<TopicInfo, Error> {
        let max_wait_ms = wait.as_millis().min(u32::MAX as u128) as u32;
        let req = Request::AwaitLeader { name: name.clone(), past_epoch, max_wait_ms };
        self.topic_once(&req, wait + STALL_LOOKUP_LIMIT).await
    }

    /// One attempt at a request answered with one topic's entry, within `limit`.
    async fn topic_once(&self, req: &Request, limit: Duration) -> Result<TopicInfo, Error> {
        let call = async {
            // Follows redirects to the naming leader, a few at most (a member names the
            // leader it knows; during an election, none).
            let mut answer = Err(Error::Unavailable { detail: "no naming member asked".into() });
            for _ in 0..MAX_REDIRECTS {
                let conn = self.naming_conn().await?;
                answer = conn.call(req).await;
                match &answer {
                    Err(e) if self.naming_route.redirected(e) => *self.naming.lock().await = None,
                    _ => break,
                }
            }
            answer
        };
        let answer = match tokio::time::timeout(limit, call).await {
            Ok(Ok(Response::Topic(t))) => {
                self.naming_stalls.store(0, Ordering::Relaxed);
                return Ok(t);
            }
            Ok(Ok(Response::Error(e))) | Ok(Err(e)) => e,
            Ok(Ok(other)) => return Err(unexpected(other)),
            Err(_) => Error::Unavailable { detail: format!("no answer from the naming server in {limit:?}") },
        };
        if matches!(answer, Error::Unavailable { .. }) {
            // A naming server killed without a word keeps its connection open until the idle
            // timeout: dial again instead of waiting it out. But only
            // after two such failures in a row: one slow answer is more often a busy member,
            // and every client dialling all of them at once would make it busier (F22).
            if self.naming_stalls.fetch_add(1, Ordering::Relaxed) >= 1 {
                self.naming_stalls.store(0, Ordering::Relaxed);
                *self.naming.lock().await = None;
            }
        }
        Err(answer)
    }

    /// The naming group's entry for a topic (replicas, leader, epoch, config), retrying
    /// while there is no leader.
    pub async fn lookup(&self, name: &TopicName) -> Result<TopicInfo, Error> {
        match self.naming_call(&Request::LookupTopic { name: name.clone() }).await? {
            Response::Topic(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    /// Every topic, in name order, read a page at a time.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>, Error> {
        let mut topics = Vec::new();
        let mut after = None;
        loop {
            let req = Request::ListTopicsPage { after: after.take(), limit: TOPIC_PAGE_SIZE };
            match self.naming_call(&req).await? {
                Response::TopicPage { topics: page, next } => {
                    topics.extend(page);
                    match next {
                        Some(n) => after = Some(n),
                        None => return Ok(topics),
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
    }

    /// The topic servers the naming group knows, alive or not.
    pub async fn list_servers(&self) -> Result<Vec<ServerInfo>, Error> {
        match self.naming_call(&Request::ListServers).await? {
            Response::Servers(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<TopicName, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, info: &TopicInfo) {
        let mut routes = self.routes();
        if routes.len() >= MAX_ROUTES && !routes.contains_key(&info.name) {
            routes.clear();
        }
        routes.insert(info.name.clone(), Route { info: info.clone(), suspect: false });
    }

    /// A call to `topic`'s leader failed in a way a new leader may explain (`NotLeader`, a
    /// stale epoch, a lost connection): its leader is looked up again before the next call.
    pub(crate) fn suspect(&self, topic: &TopicName) {
        if let Some(route) = self.routes().get_mut(topic) {
            route.suspect = true;
        }
    }

    /// `topic`'s leader: as last looked up unless a failure made it suspect; then looked up
    /// again, or, while the naming group does not answer, the last known one (it may well
    /// still lead).
    async fn leader_info(&self, topic: &TopicName) -> Result<TopicInfo, Error> {
        let cached = self.routes().get(topic).cloned();
        let info = match cached {
            Some(Route { info, suspect: false }) => info,
            Some(Route { info: known, suspect: true }) => match self.lookup_once(topic, RELOOKUP_LIMIT).await
            {
                Ok(info) => info,
                Err(e) if e.is_retriable() => {
                    debug!(%topic, error = %e, "naming group unreachable; trying the last known leader");
                    known
                }
                Err(e) => return Err(e),
            },
            None => self.lookup(topic).await?,
        };
        self.remember(&info);
        Ok(info)
    }

    /// Resolves once the book names a leader of `topic` other than `peer` (remembered for the
    /// next call), starting after `after`: for a client whose request the leader has not
    /// answered, since a killed leader says nothing and its connection stays open until the
    /// idle timeout. One lookup, then `AwaitLeader` requests that the naming group answers
    /// the moment it elects a new leader: the clients of a killed server each ask a few
    /// times, and hear at once (F22). Failed questions are asked again after
    /// [`Backoff::recheck`] waits.
    pub(crate) async fn leader_moved(&self, topic: &TopicName, peer: SocketAddr, after: Duration) {
        tokio::time::sleep(after).await;
        let mut recheck = Backoff::recheck();
        let mut known = None;
        loop {
            let answer = match known {
                None => self.lookup_once(topic, STALL_LOOKUP_LIMIT).await,
                Some(epoch) => self.await_leader_once(topic, epoch, AWAIT_LEADER_WAIT).await,
            };
            match answer {
                Ok(info) if info.leader_addr().is_some_and(|a| a != peer) => {
                    self.remember(&info);
                    return;
                }
                Ok(info) => known = Some(info.epoch),
                Err(_) => {
                    recheck.wait().await;
                }
            }
        }
    }

    /// Connects to the current leader of `topic`.
    async fn leader(&self, topic: &TopicName) -> Result<Connection, Error> {
        let info = self.leader_info(topic).await?;
        let addr = info.leader_addr().ok_or_else(|| Error::Unavailable {
            detail: format!("topic {topic:?} has no reachable leader (server {})", info.leader),
        })?;
        self.server_conn(addr).await
    }

    /// Sends `req` to the leader of `topic`, re-resolving and retrying retriable failures.
    pub async fn leader_call(&self, topic: &TopicName, req: &Request) -> Result<Response, Error> {
        let mut backoff = Backoff::new(self.retry_deadline);
        loop {
            let conn = self.leader(topic).await;
            let result = match &conn {
                Ok(conn) => conn.call(req).await,
                Err(e) => Err(e.clone()),
            };
            match result {
                Err(e) if e.is_retriable() => {
                    self.suspect(topic);
                    if let Ok(conn) = &conn {
                        if matches!(e, Error::Unavailable { .. }) {
                            self.forget_server(conn.addr()).await;
                        }
                    }
                    debug!(error = %e, %topic, "retrying at the leader");
                    if !backoff.wait().await {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    /// The leader's view of a topic: log start/end, commit offset, subscriptions.
    pub async fn topic_status(&self, topic: &TopicName) -> Result<TopicStatus, Error> {
        match self.leader_call(topic, &Request::TopicStatus { topic: topic.clone() }).await? {
            Response::TopicStatus(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// The leader's view of a topic in one attempt, without retries (for listings that must
    /// not hang on one unreachable server).
    pub async fn topic_status_once(&self, info: &TopicInfo) -> Result<TopicStatus, Error> {
        let addr = info
            .leader_addr()
            .ok_or_else(|| Error::Unavailable { detail: format!("no leader for {}", info.name) })?;
        let conn = self.server_conn(addr).await?;
        match conn.call(&Request::TopicStatus { topic: info.name.clone() }).await? {
            Response::TopicStatus(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Creates a subscription; returns its starting cursor.
    pub async fn create_subscription(
        &self,
        topic: &TopicName,
        subscription: &SubscriptionName,
        from: StartFrom,
        if_missing: bool,
    ) -> Result<Offset, Error> {
        let req = Request::CreateSubscription {
            topic: topic.clone(),
            subscription: subscription.clone(),
            from,
            if_missing,
        };
        match self.leader_call(topic, &req).await? {
            Response::Cursor { cursor } => Ok(cursor),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a subscription; returns how many records (and bytes) that freed.
    pub async fn delete_subscription(
        &self,
        topic: &TopicName,
        subscription: &SubscriptionName,
        force: bool,
    ) -> Result<(u64, u64), Error> {
        let req =
            Request::DeleteSubscription { topic: topic.clone(), subscription: subscription.clone(), force };
        match self.leader_call(topic, &req).await? {
            Response::SubscriptionDeleted { freed_records, freed_bytes } => Ok((freed_records, freed_bytes)),
            other => Err(unexpected(other)),
        }
    }

    /// Moves a subscription's cursor (or, without `execute`, says where it would go);
    /// `force` even while a consumer holds it.
    pub async fn reset_subscription(
        &self,
        topic: &TopicName,
        subscription: &SubscriptionName,
        to: ResetTo,
        execute: bool,
        force: bool,
    ) -> Result<ResetOutcome, Error> {
        let req = Request::ResetSubscription {
            topic: topic.clone(),
            subscription: subscription.clone(),
            to,
            execute,
            force,
        };
        match self.leader_call(topic, &req).await? {
            Response::Reset(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    /// A topic's subscriptions, with cursor, lag and holder, as its leader sees them.
    pub async fn subscriptions(&self, topic: &TopicName) -> Result<Vec<SubscriptionInfo>, Error> {
        Ok(self.topic_status(topic).await?.subscriptions)
    }

    /// Starts a producer for `topic`.
    pub fn producer(self: &Arc<Self>, topic: TopicName, max_inflight: usize) -> Producer {
        Producer::start(self.clone(), topic, max_inflight.clamp(1, MAX_INFLIGHT))
    }

    /// A consumer reading `topic` through `subscription`, creating the subscription at `from`
    /// if it does not exist (an existing one resumes at its cursor).
    pub async fn consumer(
        self: &Arc<Self>,
        topic: TopicName,
        subscription: SubscriptionName,
        from: StartFrom,
    ) -> Result<Consumer, Error> {
        self.create_subscription(&topic, &subscription, from, true).await?;
        Ok(self.existing_consumer(topic, subscription))
    }

    /// A consumer of a subscription that must exist already: none is created (its first
    /// poll fails with [`Error::UnknownSubscription`] otherwise).
    pub fn existing_consumer(self: &Arc<Self>, topic: TopicName, subscription: SubscriptionName) -> Consumer {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let name = format!("consumer pid {} on {}", std::process::id(), host.trim());
        Consumer::new(self.clone(), topic, subscription, ConsumerSession { id: fastrand::u64(1..), name })
    }

    /// Closes every connection and waits briefly for the close to reach the peers.
    pub async fn close(&self) {
        if let Some(c) = self.naming.lock().await.take() {
            c.close();
        }
        self.servers.close_all().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

fn unexpected(resp: Response) -> Error {
    Error::internal(format!("unexpected answer {resp:?}"))
}

/// The outcome of one acknowledged batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchAck {
    /// Offset of the batch's first record.
    pub base: Offset,
    /// Records in the batch: offsets `base..base + count`.
    pub count: u32,
    /// The epoch of the leader that acknowledged it.
    pub epoch: crate::types::Epoch,
    /// The leader had stored this batch already (a retry); nothing new was stored.
    pub duplicate: bool,
}

struct PendingBatch {
    records: Vec<Record>,
    reply: oneshot::Sender<Result<BatchAck, Error>>,
}

struct InFlight {
    sequence: u64,
    batch: PendingBatch,
}

/// A pipelined, retrying, deduplicated producer for one topic.
pub struct Producer {
    tx: mpsc::Sender<PendingBatch>,
    task: JoinHandle<()>,
}

impl Producer {
    fn start(client: Arc<Client>, topic: TopicName, max_inflight: usize) -> Self {
        let (tx, rx) = mpsc::channel(max_inflight);
        let task = tokio::spawn(ProducerTask::new(client, topic, max_inflight).run(rx));
        Self { tx, task }
    }

    /// Queues a batch; the returned receiver resolves when it is committed (or failed for good).
    /// Waits while `max_inflight` batches are already queued.
    pub async fn send(
        &self,
        records: Vec<Record>,
    ) -> Result<oneshot::Receiver<Result<BatchAck, Error>>, Error> {
        if records.is_empty() {
            return Err(Error::invalid("a produce batch needs at least one record"));
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(PendingBatch { records, reply })
            .await
            .map_err(|_| Error::internal("the producer has stopped"))?;
        Ok(rx)
    }

    /// Waits until every queued batch is acknowledged or failed.
    pub async fn close(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

struct Session {
    stream_writer: FrameWriter,
    responses: mpsc::UnboundedReceiver<Result<Response, Error>>,
    reader: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct ProducerTask {
    client: Arc<Client>,
    topic: TopicName,
    max_inflight: usize,
    producer: ProducerId,
    next_sequence: u64,
    inflight: VecDeque<InFlight>,
    /// When the oldest unacknowledged batch started failing.
    failing_since: Option<Instant>,
    /// A batch of this producer id was acknowledged. Until then one batch is in flight at a
    /// time: a leader that does not know a producer takes its first batch at any sequence,
    /// and a first batch that failed must not be overtaken by its successor.
    known: bool,
}

impl ProducerTask {
    fn new(client: Arc<Client>, topic: TopicName, max_inflight: usize) -> Self {
        Self {
            client,
            topic,
            max_inflight,
            producer: fastrand::u64(..),
            next_sequence: 0,
            inflight: VecDeque::new(),
            failing_since: None,
            known: false,
        }
    }

    fn request(&self, sequence: u64, records: &[Record]) -> Request {
        Request::Produce {
            topic: self.topic.clone(),
            producer: self.producer,
            sequence,
            records: records.to_vec(),
        }
    }

    /// Opens a stream to the leader and resends everything unacknowledged, in order.
    async fn open_session(&mut self) -> Result<Session, Error> {
        let conn = match self.client.leader(&self.topic).await {
            Ok(conn) => conn,
            Err(e) => {
                self.client.suspect(&self.topic);
                return Err(e);
            }
        };
        let stream = conn.open().await;
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                self.client.suspect(&self.topic);
                self.client.forget_server(conn.addr()).await;
                return Err(e);
            }
        };
        let (mut writer, mut reader) = stream.split();
        let (tx, responses) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let resp = reader.recv().await;
                let stop = resp.is_err();
                if tx.send(resp).is_err() || stop {
                    return;
                }
            }
        });
        for f in &self.inflight {
            writer.queue(&self.request(f.sequence, &f.batch.records))?;
        }
        writer.flush().await?;
        Ok(Session { stream_writer: writer, responses, reader })
    }

    /// Gives up on every in-flight batch; a fresh producer id keeps later sequences valid.
    fn fail_all(&mut self, err: Error) {
        for f in self.inflight.drain(..) {
            let _ = f.batch.reply.send(Err(err.clone()));
        }
        self.producer = fastrand::u64(..);
        self.next_sequence = 0;
        self.failing_since = None;
        self.known = false;
    }

    async fn run(mut self, mut rx: mpsc::Receiver<PendingBatch>) {
        let mut session: Option<Session> = None;
        let mut closed = false;
        let mut backoff = Backoff::new(self.client.retry_deadline);
        // When the producer last heard from the leader; while batches wait for an answer, a
        // watch on the book for a new leader (and the server it watches).
        let mut last_answer = tokio::time::Instant::now();
        type Watch = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        let mut watcher: Option<(SocketAddr, Watch)> = None;
        loop {
            if closed && self.inflight.is_empty() {
                break;
            }
            if session.is_none() && !self.inflight.is_empty() {
                match self.open_session().await {
                    Ok(s) => session = Some(s),
                    Err(e) if e.is_retriable() => {
                        let since = *self.failing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.client.retry_deadline || !backoff.wait().await {
                            self.fail_all(e);
                            backoff = Backoff::new(self.client.retry_deadline);
                        }
                        continue;
                    }
                    Err(e) => {
                        self.fail_all(e);
                        continue;
                    }
                }
            }
            let window = if self.known { self.max_inflight } else { 1 };
            let can_take = !closed && self.inflight.len() < window;
            // Batches in flight and no answer for STALL_CHECK: if the book names another
            // leader meanwhile, move there.
            let peer = session.as_ref().filter(|_| !self.inflight.is_empty()).map(|s| s.stream_writer.peer());
            if watcher.as_ref().map(|(p, _)| *p) != peer {
                watcher = peer.map(|peer| {
                    let (client, topic) = (self.client.clone(), self.topic.clone());
                    let after =
                        (last_answer + STALL_CHECK).saturating_duration_since(tokio::time::Instant::now());
                    let watch: Watch =
                        Box::pin(async move { client.leader_moved(&topic, peer, after).await });
                    (peer, watch)
                });
            }
            tokio::select! {
                () = async { watcher.as_mut().expect("a watch").1.as_mut().await }, if watcher.is_some() => {
                    debug!(topic = %self.topic, "the leader changed while batches were in flight");
                    if let Some((addr, _)) = watcher.take() {
                        self.client.forget_server(addr).await;
                    }
                    session = None;
                }
                resp = async { session.as_mut().expect("session").responses.recv().await }, if session.is_some() => {
                    match resp {
                        Some(Ok(Response::Produced { base, count, epoch, duplicate })) => {
                            self.known = true;
                            if let Some(f) = self.inflight.pop_front() {
                                let _ = f.batch.reply.send(Ok(BatchAck { base, count, epoch, duplicate }));
                            }
                            last_answer = tokio::time::Instant::now();
                            // The leader answers: watch afresh from this answer on.
                            watcher = None;
                            self.failing_since = None;
                            backoff = Backoff::new(self.client.retry_deadline);
                        }
                        Some(Ok(other)) => {
                            if let Some(f) = self.inflight.pop_front() {
                                let _ = f.batch.reply.send(Err(unexpected(other)));
                            }
                        }
                        Some(Err(e)) if e.is_retriable() => {
                            debug!(error = %e, topic = %self.topic, "produce failed; resending through the leader");
                            self.client.suspect(&self.topic);
                            if let Some(s) = session.take() {
                                if matches!(e, Error::Unavailable { .. }) {
                                    let addr = s.stream_writer.peer();
                                    self.client.forget_server(addr).await;
                                }
                            }
                            self.failing_since.get_or_insert_with(Instant::now);
                            if !backoff.wait().await {
                                self.fail_all(e);
                                backoff = Backoff::new(self.client.retry_deadline);
                            }
                        }
                        Some(Err(e)) => {
                            // Refused for good (e.g. a record over the limit); it used its
                            // sequence number, so the batches behind it stay in order.
                            if let Some(f) = self.inflight.pop_front() {
                                let _ = f.batch.reply.send(Err(e));
                            }
                        }
                        None => {
                            self.client.suspect(&self.topic);
                            session = None;
                        }
                    }
                }
                batch = rx.recv(), if can_take => match batch {
                    None => closed = true,
                    Some(batch) => {
                        let sequence = self.next_sequence;
                        self.next_sequence += 1;
                        if let Some(s) = session.as_mut() {
                            let sent = match s.stream_writer.queue(&self.request(sequence, &batch.records)) {
                                Ok(()) => s.stream_writer.flush().await,
                                Err(e) => Err(e),
                            };
                            if sent.is_err() {
                                self.client.suspect(&self.topic);
                                session = None;
                            }
                        }
                        if self.inflight.is_empty() {
                            // Silence is measured from the first batch in flight.
                            last_answer = tokio::time::Instant::now();
                        }
                        self.inflight.push_back(InFlight { sequence, batch });
                    }
                },
            }
        }
        if let Some(mut s) = session {
            s.stream_writer.finish();
        }
    }
}

/// Topics asked for per page of [`Client::list_topics`].
const TOPIC_PAGE_SIZE: u32 = 1000;

/// A topic's leader as the client last learned it.
#[derive(Debug, Clone)]
struct Route {
    info: TopicInfo,
    /// A call failed since: look the leader up again before the next.
    suspect: bool,
}

/// Redirects one lookup follows at most (one is the rule: a follower names the leader).
const MAX_REDIRECTS: usize = 3;

/// Topics whose leader a client remembers at most (a client of more starts over).
const MAX_ROUTES: usize = 4_096;

/// How long a suspect leader's new lookup may take before the client tries the last known
/// leader anyway (the naming group may be down while the topic's leader is fine).
const RELOOKUP_LIMIT: Duration = Duration::from_secs(2);

/// How long a naming dial waits before dialling the next member too (see
/// [`NamingRoute::connect`]): a TLS handshake on loopback takes a few milliseconds, so a
/// member that has not answered in this long is likely down or overloaded.
const DIAL_STAGGER: Duration = Duration::from_millis(250);

/// How long a naming dial waits for the member that answered last once another answered.
const PREFERRED_GRACE: Duration = Duration::from_millis(20);

/// How a client or a topic server finds the naming group's leader: the address a member
/// named as leader, if any, else every --naming address at once (the one that answered last
/// preferred).
pub(crate) struct NamingRoute {
    addrs: NamingAddrs,
    preferred: AtomicUsize,
    /// The leader's address, as the last redirect named it.
    leader: std::sync::Mutex<Option<SocketAddr>>,
    /// Some member answered once: failures after that are worth retrying.
    reached: AtomicBool,
}

impl NamingRoute {
    pub(crate) fn new(addrs: NamingAddrs) -> Self {
        Self {
            // A random first choice spreads new clients over the members.
            preferred: AtomicUsize::new(fastrand::usize(..addrs.list().len().max(1))),
            addrs,
            leader: std::sync::Mutex::new(None),
            reached: AtomicBool::new(false),
        }
    }

    pub(crate) fn addrs(&self) -> &NamingAddrs {
        &self.addrs
    }

    /// Whether any naming member ever answered this process.
    pub(crate) fn reached(&self) -> bool {
        self.reached.load(Ordering::Relaxed)
    }

    fn leader_hint(&self) -> Option<SocketAddr> {
        *self.leader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects to the leader if one was named, else to one of the addresses. The named
    /// leader, else the member that answered last, is dialled first and each other member
    /// [`DIAL_STAGGER`] after the one before, all still under way together (a member that is
    /// down costs no more than the connect timeout, however many are down); the first to
    /// answer is kept, the preferred one if it answers soon after. Staggered, a healthy group
    /// costs one TLS handshake per dial, not one per member: a thousand clients starting at
    /// once made the members' handshakes their bottleneck.
    pub(crate) async fn connect(&self, endpoint: &Endpoint) -> Result<Connection, Error> {
        let list = self.addrs.list();
        let hint = self.leader_hint();
        let preferred = hint.unwrap_or(list[self.preferred.load(Ordering::Relaxed) % list.len()]);
        let mut candidates = vec![preferred];
        candidates.extend(list.iter().copied().filter(|a| *a != preferred));
        let mut dials = tokio::task::JoinSet::new();
        for (k, addr) in candidates.into_iter().enumerate() {
            let endpoint = endpoint.clone();
            dials.spawn(async move {
                tokio::time::sleep(DIAL_STAGGER * k as u32).await;
                (addr, Connection::connect(&endpoint, addr).await)
            });
        }
        let mut failures = Vec::new();
        let mut connected: Option<(SocketAddr, Connection)> = None;
        while let Some(joined) = dials.join_next().await {
            let Ok((addr, result)) = joined else { continue };
            match result {
                Ok(conn) => {
                    connected = Some((addr, conn));
                    if addr == preferred || dials.is_empty() {
                        break;
                    }
                    // Give the preferred member a moment to answer too.
                    if let Ok(Some(Ok((addr, Ok(conn))))) =
                        tokio::time::timeout(PREFERRED_GRACE, dials.join_next()).await
                    {
                        if addr == preferred {
                            connected = Some((addr, conn));
                        }
                    }
                    break;
                }
                Err(Error::Unavailable { detail }) => {
                    if Some(addr) == hint {
                        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                    failures.push(format!("{addr}: {detail}"));
                }
                // Refused certificates and the like: asking elsewhere or again will not help.
                Err(e) => return Err(e),
            }
        }
        let Some((addr, conn)) = connected else {
            return Err(Error::Unavailable { detail: failures.join("; ") });
        };
        if let Some(at) = list.iter().position(|a| *a == addr) {
            self.preferred.store(at, Ordering::Relaxed);
        }
        self.reached.store(true, Ordering::Relaxed);
        Ok(conn)
    }

    /// Takes note of an answer that said another member leads (or that none is known yet,
    /// then the next address is asked). Returns whether `e` was such an answer.
    pub(crate) fn redirected(&self, e: &Error) -> bool {
        let Error::NamingNotLeader { leader, .. } = e else { return false };
        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = *leader;
        if leader.is_none() {
            self.preferred.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}
