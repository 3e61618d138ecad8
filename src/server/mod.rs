//! A topic server: hosts topic replicas, answers producers, consumers and other servers,
//! follows the naming server's book.
//!
//! Each hosted topic is a [`Replica`] over a [`TopicLog`] in the server's [`Store`]. The
//! server registers with the naming server and keeps a long-poll heartbeat open; each answer
//! carries the topics this server must host, with their replica set, leader and epoch, which
//! it reconciles with what it hosts (create what is new, apply new assignments, drop what the
//! book deleted). A produce is answered once its batch is committed (on a majority); a
//! consumer's ack once the cursor move is. A consumer waiting for records waits on the
//! topic's state watch, so it wakes at the commit that makes records readable, with no
//! polling.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;
use quinn::Endpoint;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::{debug, error, info, warn};

use crate::acl::{AclView, Operation};
use crate::certs::{self, CertRole, Principal};
use crate::error::Error;
use crate::metrics::{registered, EndpointMetrics, ReplicaLabels, SubscriptionLabels, TopicLabels};
use crate::policy::Policy;
use crate::replica::{Assignment, Node, Replica};
use crate::replication::AliveOutcome;
use crate::storage::{ChangeReader, LogState, Medium, Store, TopicLog};
use crate::transport::{self, ready, Peer, ResponseFuture, Service};
use crate::types::{mono_ms, now_ms, NamingAddrs, Offset, ServerId, SubscriptionName, TopicName};
mod alive;
mod hosted;
mod repair;
mod reports;

pub use self::alive::{Followed, Told};
use self::hosted::{Hosted, HostedTopics};
pub use self::repair::{read_chunk_for, repair_peers, REPAIR_RETRY};
pub use self::reports::{topic_report, ReportLedger};
use crate::wire::{
    Assignments, Evicted, FetchedRecords, ReplicaInfo, Reports, Request, Response, Role, TopicInfo,
    TopicStatus,
};

/// Most records one fetch returns.
pub const MAX_FETCH_RECORDS: u32 = 10_000;
/// Most record bytes (as encoded) one fetch may ask for: a whole frame, so every stored
/// record can be fetched (a record is at most `MAX_RECORD_BYTES_LIMIT`, half a frame).
pub const MAX_FETCH_BYTES: u32 = (crate::wire::MAX_FRAME_BYTES - crate::wire::RECORDS_ANSWER_OVERHEAD) as u32;
/// Longest a fetch waits for records.
pub const MAX_FETCH_WAIT: Duration = Duration::from_secs(30);

/// Settings of `herald server`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub id: Option<ServerId>,
    pub listen: SocketAddr,
    /// The address other processes reach this server at (defaults to `listen`).
    pub advertise: Option<SocketAddr>,
    pub naming: NamingAddrs,
    pub data_dir: PathBuf,
    pub certs_dir: PathBuf,
    /// How long a consumer keeps its subscription after its last request.
    pub session_lease: Duration,
    /// Where to serve Prometheus metrics (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// What the store is kept on (a file, or for power-loss tests a volatile one).
    pub medium: Medium,
    /// What clients may hold of this server.
    pub limits: transport::Limits,
}

/// How long past a heartbeat's long poll the server waits for the answer before it takes the
/// naming server for gone and dials again (`naming::core::RECONNECT_BOUND_MS` counts on it).
pub const NAMING_ANSWER_GRACE: Duration = Duration::from_secs(1);

/// Longest pause between two dials of the naming server (plus up to half of it in jitter).
pub const NAMING_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The first pause before dialing the naming group again (after a redirect, the next dial
/// goes to the leader it named).
pub const NAMING_BACKOFF_MIN: Duration = Duration::from_millis(50);

/// How long a consumer keeps its subscription after its last request, by default.
pub const DEFAULT_SESSION_LEASE: Duration = Duration::from_secs(10);

pub struct TopicServer {
    node: Arc<Node>,
    topics: RwLock<HostedTopics>,
    session_lease: Duration,
    metrics: Arc<EndpointMetrics>,
    /// The naming server's liveness lease, as it last said (ms).
    lease_ms: AtomicU64,
    /// Who may do what, as the last heartbeat answer that carried it said (`None`: not heard).
    acl: RwLock<Option<Arc<AclView>>>,
}

/// Leases a leader may go without hearing from a majority of its replicas and still serve
/// consumers: past that a newer leader may exist, so they should look again.
const LEADER_CONTACT_LEASES: u64 = 2;

impl TopicServer {
    /// Everything `--metrics-listen` shows, read now. Every replica reports its log; the
    /// leader also reports subscriptions and how far each follower is behind.
    pub fn render_metrics(&self) -> String {
        let mut registry = Registry::default();
        self.metrics.register(&mut registry);
        registry.register(
            "herald_storage_commit_seconds",
            "Storage group commits (one write transaction and its fsync), in seconds",
            self.node.store.commit_seconds().clone(),
        );
        let damaged = self.node.store.damaged();
        let found = Gauge::<i64>::default();
        found.set(damaged.list().len() as i64);
        registry.register(
            "herald_damaged_chunks",
            "Stored chunks that fail their checksum, not served, waiting for a peer's copy",
            found,
        );
        let repaired = Counter::<u64>::default();
        repaired.inc_by(damaged.repaired_count());
        registry.register(
            "herald_chunks_repaired",
            "Damaged chunks replaced by another replica's good copy since the server started",
            repaired,
        );
        let parked = Gauge::<i64>::default();
        parked.set(self.node.parking.parked_here() as i64);
        registry.register(
            "herald_parked_fetches",
            "Idle followers' fetches parked on this server as their leader, over all topics",
            parked,
        );
        let r = &mut registry;
        let log_start: Family<TopicLabels, Gauge> =
            registered(r, "herald_log_start", "Oldest offset still stored");
        let log_end: Family<TopicLabels, Gauge> =
            registered(r, "herald_log_end", "One past the newest offset stored");
        let commit: Family<TopicLabels, Gauge> =
            registered(r, "herald_commit_offset", "One past the newest committed offset");
        let backlog: Family<TopicLabels, Gauge> =
            registered(r, "herald_backlog_bytes", "Bytes stored for the topic");
        let leading: Family<TopicLabels, Gauge> =
            registered(r, "herald_leader", "1 where this server leads the topic");
        let appended: Family<TopicLabels, Counter> =
            registered(r, "herald_records_appended", "Records appended since the server started");
        let deleted: Family<TopicLabels, Counter> = registered(
            r,
            "herald_records_deleted",
            "Records deleted since the server started, once every subscription had read them",
        );
        let cursor: Family<SubscriptionLabels, Gauge> =
            registered(r, "herald_subscription_cursor", "Next offset a subscription reads");
        let lag: Family<SubscriptionLabels, Gauge> =
            registered(r, "herald_subscription_lag_records", "Committed records not yet acknowledged");
        let lag_bytes: Family<SubscriptionLabels, Gauge> =
            registered(r, "herald_subscription_lag_bytes", "Stored bytes of those records");
        let replica_lag: Family<ReplicaLabels, Gauge> = registered(
            r,
            "herald_replica_lag_records",
            "Records the leader holds that a follower has not acknowledged",
        );
        let hosted: Vec<Arc<Hosted>> = self.topics.read().expect("topics lock").values().cloned().collect();
        for h in hosted {
            let log = &h.replica.log;
            let state = log.state();
            let topic = TopicLabels { topic: log.name.to_string() };
            log_start.get_or_create(&topic).set(state.log_start as i64);
            log_end.get_or_create(&topic).set(state.log_end as i64);
            commit.get_or_create(&topic).set(state.commit as i64);
            backlog.get_or_create(&topic).set(state.bytes as i64);
            appended.get_or_create(&topic).inc_by(state.appended_records);
            deleted.get_or_create(&topic).inc_by(state.freed_records);
            let leads = h.replica.role() == Role::Leader;
            leading.get_or_create(&topic).set(leads as i64);
            if !leads {
                continue;
            }
            for r in h.replica.replica_statuses().iter().filter(|r| r.server != self.node.id) {
                let labels = ReplicaLabels { topic: topic.topic.clone(), replica: r.server.to_string() };
                let behind = state.log_end.saturating_sub(r.log_end.unwrap_or(state.log_start));
                replica_lag.get_or_create(&labels).set(behind as i64);
            }
            match self.node.store.subscriptions(log.id, &state) {
                Ok(subs) => {
                    for sub in subs {
                        let labels = SubscriptionLabels {
                            topic: topic.topic.clone(),
                            subscription: sub.name.to_string(),
                        };
                        cursor.get_or_create(&labels).set(sub.cursor as i64);
                        lag.get_or_create(&labels).set(sub.lag as i64);
                        lag_bytes.get_or_create(&labels).set(sub.lag_bytes as i64);
                    }
                }
                Err(e) => warn!(topic = %log.name, error = %e, "reading subscriptions for metrics failed"),
            }
        }
        crate::metrics::encode(&registry)
    }

    fn hosted(&self, name: &TopicName) -> Result<Arc<Hosted>, Error> {
        self.topics.read().expect("topics lock").get(name).cloned().ok_or_else(|| Error::NotLeader {
            topic: name.to_string(),
            server: self.node.id,
            leader: None,
        })
    }

    fn replica(&self, name: &TopicName) -> Result<Arc<Replica>, Error> {
        Ok(self.hosted(name)?.replica.clone())
    }

    /// The replica of `name`, if it is the incarnation `id` (a server-to-server request
    /// about a deleted and re-created topic must not touch the new one).
    fn replica_with_id(&self, name: &TopicName, id: u64) -> Result<Arc<Replica>, Error> {
        let replica = self.replica(name)?;
        if replica.log.id != id {
            return Err(Error::NotLeader { topic: name.to_string(), server: self.node.id, leader: None });
        }
        Ok(replica)
    }

    fn topic(&self, name: &TopicName) -> Result<Arc<TopicLog>, Error> {
        Ok(self.replica(name)?.log.clone())
    }

    fn leader_and_policy(&self, name: &TopicName) -> Result<(Arc<Replica>, Arc<Policy>), Error> {
        let hosted = self.hosted(name)?;
        hosted.replica.check_leader()?;
        Ok((hosted.replica.clone(), hosted.policy()))
    }

    /// The replica of `name` once it may serve consumers and cursor changes: it leads, it
    /// is ready (knows every committed entry), and it still hears from a majority.
    async fn serving(&self, name: &TopicName) -> Result<Arc<Replica>, Error> {
        let replica = self.replica(name)?;
        let contact = self.lease_ms.load(Ordering::Relaxed) * LEADER_CONTACT_LEASES;
        replica.wait_serving(contact, &self.node.alive).await?;
        Ok(replica)
    }

    fn produce(
        &self,
        topic: &TopicName,
        producer: u64,
        sequence: u64,
        records: Vec<crate::wire::Record>,
    ) -> ResponseFuture {
        if let Err(e) = check_batch(&records) {
            return ready(Response::Error(e));
        }
        let (replica, policy) = match self.leader_and_policy(topic) {
            Ok(r) => r,
            Err(e) => return ready(Response::Error(e)),
        };
        // A refused batch still uses its sequence number, on every replica: the refusal is an
        // entry of the log too.
        let refused = policy.check(topic.as_str(), &records).err();
        // Queued now, in stream order; the future waits for the group commit, then for a
        // majority of the replicas.
        let appended = self.node.store.append_or_refuse(replica.log.id, producer, sequence, records, refused);
        Box::pin(async move {
            let result = async {
                let a = appended.await?;
                replica.wait_for(a.at, false).await?;
                if let Some(e) = a.refused {
                    return Err(e);
                }
                Ok(Response::Produced {
                    base: a.base,
                    count: a.count,
                    epoch: a.at.epoch,
                    duplicate: a.duplicate,
                })
            };
            result.await.unwrap_or_else(Response::Error)
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        &self,
        topic: &TopicName,
        read: Reading<'_>,
        max_records: u32,
        max_bytes: u32,
        max_wait: Duration,
    ) -> Result<Response, Error> {
        let log = self.topic(topic)?;
        let unknown_sub = |subscription: &SubscriptionName| Error::UnknownSubscription {
            topic: topic.to_string(),
            subscription: subscription.to_string(),
        };
        let mut evicted = None;
        let (mut from, subscription, consumer) = match read {
            Reading::Subscription { name, from, consumer } => {
                let cursor = self.node.store.cursor(log.id, name)?.ok_or_else(|| unknown_sub(name))?;
                let mut from = from.unwrap_or(cursor.next);
                if consumer {
                    from = self.catch_up(&log, name, from, cursor, &mut evicted).await?;
                }
                (from, Some(name), consumer)
            }
            Reading::Offset(from) => (from, None, false),
        };
        let max_records = max_records.clamp(1, MAX_FETCH_RECORDS);
        let max_bytes = max_bytes.clamp(1, MAX_FETCH_BYTES);
        let deadline = tokio::time::Instant::now() + max_wait.min(MAX_FETCH_WAIT);
        let mut watch = log.watch();
        loop {
            let state = watch.borrow_and_update().clone();
            // Reads are short and mostly served from redb's cache, so they run inline.
            let read = match read_committed(
                &self.node.store,
                &log,
                &state,
                subscription,
                from,
                max_records,
                max_bytes,
            ) {
                // The backlog policy moved this consumer's subscription on (and deleted
                // what it skipped) while it read: go on from its cursor.
                Err(Error::CursorBeforeLogStart { .. }) if consumer => {
                    let subscription = subscription.expect("a consumer reads through a subscription");
                    let cursor = self
                        .node
                        .store
                        .cursor(log.id, subscription)?
                        .ok_or_else(|| unknown_sub(subscription))?;
                    if cursor.next <= from {
                        return Err(Error::CursorBeforeLogStart {
                            topic: topic.to_string(),
                            subscription: Some(subscription.to_string()),
                            offset: from,
                            log_start: state.log_start,
                        });
                    }
                    from = self.catch_up(&log, subscription, from, cursor, &mut evicted).await?;
                    continue;
                }
                other => other?,
            };
            if let Some(records) = read {
                return Ok(Response::Records {
                    records,
                    log_start: state.log_start,
                    commit: state.commit,
                    evicted,
                });
            }
            if tokio::time::timeout_at(deadline, watch.changed()).await.is_err() {
                return Ok(Response::Records {
                    records: FetchedRecords::default(),
                    log_start: state.log_start,
                    commit: state.commit,
                    evicted,
                });
            }
        }
    }

    /// A consumer reads from `from`, or from its subscription's cursor if the backlog policy
    /// (or a reset while no one held it) moved the cursor past that. What the policy skipped
    /// goes into `evicted`: told with every read until the consumer acknowledges past it, so
    /// a lost answer does not lose the notice.
    async fn catch_up(
        &self,
        _log: &TopicLog,
        _subscription: &SubscriptionName,
        from: Offset,
        cursor: crate::storage::Cursor,
        evicted: &mut Option<Evicted>,
    ) -> Result<Offset, Error> {
        if cursor.unreported > 0 {
            *evicted = Some(Evicted {
                records: cursor.unreported,
                at_ms: cursor.evicted_at_ms,
                resume_at: cursor.next,
            });
        }
        Ok(from.max(cursor.next))
    }

    /// Answers `Locate`: the first committed offset stamped at or after `time_ms`.
    fn locate(&self, topic: &TopicName, time_ms: u64) -> Result<Response, Error> {
        let log = self.topic(topic)?;
        let state = log.state();
        let offset = self.node.store.offset_at_time(&log, state.log_start, state.commit, time_ms)?;
        Ok(Response::Located { offset, log_start: state.log_start, commit: state.commit })
    }

    fn status(&self, topic: &TopicName) -> Result<Response, Error> {
        let hosted = self.hosted(topic)?;
        let replica = &hosted.replica;
        let log = &replica.log;
        let state = log.state();
        let mut subscriptions = self.node.store.subscriptions(log.id, &state)?;
        for sub in &mut subscriptions {
            sub.consumer = hosted.holder(sub.name.as_str());
            sub.last_ack_ms = hosted.last_acks.lock().expect("acks lock").get(sub.name.as_str()).copied();
        }
        Ok(Response::TopicStatus(TopicStatus {
            id: log.id,
            name: log.name.clone(),
            server: self.node.id,
            role: replica.role(),
            epoch: state.epoch,
            log_start: state.log_start,
            log_end: state.log_end,
            commit: state.commit,
            backlog_bytes: state.bytes,
            subscriptions,
            replicas: replica.replica_statuses(),
        }))
    }

    /// Makes the hosted topics match the book's assignments for this server: all of them, or
    /// what changed since the version it knew.
    async fn reconcile(self: &Arc<Self>, assignments: Assignments, may_delete: bool) -> Result<(), Error> {
        let hosted: Vec<Arc<Hosted>> = self.topics.read().expect("topics lock").values().cloned().collect();
        let (gone, assignments): (Vec<Arc<Hosted>>, Vec<TopicInfo>) = match assignments {
            Assignments::All(all) => {
                let assigned: HashSet<u64> = all.iter().map(|t| t.id).collect();
                (hosted.into_iter().filter(|h| !assigned.contains(&h.replica.log.id)).collect(), all)
            }
            Assignments::Since { changed, dropped, .. } => {
                let dropped: HashSet<u64> = dropped.into_iter().collect();
                (hosted.into_iter().filter(|h| dropped.contains(&h.replica.log.id)).collect(), changed)
            }
        };
        if !may_delete {
            for h in &gone {
                warn!(topic = %h.replica.log.name, "the naming server does not list this topic, but its book is not the one this data belongs to; keeping the data");
            }
        }
        let gone = gone.into_iter().filter(|_| may_delete).map(|h| self.clone().drop_topic(h));
        let taken = assignments.into_iter().map(|info| self.clone().take_on(info));
        // Topics are independent: drop and take them on side by side, so the storage writer
        // commits them in shared groups (one fsync for many topics). Drops first: a name
        // deleted and made again under a new id must be free before it is taken on.
        run_bounded(gone).await?;
        run_bounded(taken).await
    }

    /// Stops hosting a topic deleted from the book, and deletes its data.
    async fn drop_topic(self: Arc<Self>, h: Arc<Hosted>) -> Result<(), Error> {
        let log = &h.replica.log;
        info!(topic = %log.name, id = log.id, "dropping topic deleted from the book");
        self.node.store.delete_topic(log.id).await?;
        self.topics.write().expect("topics lock").remove(log.id);
        self.node.store.changed_topics().mark(log.id); // no longer followed
        self.node.parking.wake_topic(log.id);
        self.node.parking.unpark(log.id);
        Ok(())
    }

    /// Hosts one topic as `info` assigns it, or applies its new assignment and policies.
    async fn take_on(self: Arc<Self>, info: TopicInfo) -> Result<(), Error> {
        let assignment = Assignment::of(&info);
        let current = self.topics.read().expect("topics lock").get(&info.name).cloned();
        let hosted = match current {
            Some(h) if h.replica.log.id == info.id => {
                if h.policy().config != info.config {
                    self.node.store.set_config(info.id, info.config.clone()).await?;
                    *h.policy.write().expect("policy lock") = Arc::new(Policy::new(info.config.clone()));
                    info!(topic = %info.name, schema = info.config.schema.is_some(), "topic policies changed");
                }
                if h.applied.lock().expect("applied lock").as_ref() == Some(&assignment) {
                    return Ok(());
                }
                h
            }
            _ => {
                let meta = assignment.new_meta(&info);
                let log = self.node.store.create_topic(meta).await?;
                info!(topic = %info.name, id = info.id, epoch = info.epoch, leader = info.leader, "hosting topic");
                let config = info.config.clone();
                let hosted = Hosted::new(Replica::new(log, self.node.id, assignment.clone()), None, config);
                self.topics.write().expect("topics lock").insert(hosted.clone());
                hosted
            }
        };
        let refused = match hosted.replica.apply(&self.node, assignment.clone()).await {
            Ok(()) => {
                debug!(topic = %info.name, epoch = info.epoch, leader = info.leader, "assignment applied");
                None
            }
            // E.g. told to lead an epoch it held before a restart: it reports the refusal,
            // and the naming server elects anew.
            Err(e) => {
                warn!(topic = %info.name, epoch = info.epoch, leader = info.leader, error = %e, "assignment not taken");
                (info.leader == self.node.id).then_some(info.epoch)
            }
        };
        *hosted.refused.lock().expect("refused lock") = refused;
        hosted.replica.log.mark_changed(); // its report may have changed
        *hosted.applied.lock().expect("applied lock") = Some(assignment);
        Ok(())
    }

    /// What this server's replicas tell the naming server in the next heartbeat (see
    /// [`ReportLedger`]), and whether that is all of it.
    fn reports(&self, ledger: &mut ReportLedger) -> Reports {
        let changed = self.node.store.changed_topics().take(ChangeReader::Reports);
        let low_space = self.node.store.low_on_space();
        let topics = self.topics.read().expect("topics lock");
        let report = |h: &Hosted| {
            let refused = *h.refused.lock().expect("refused lock");
            topic_report(&h.replica, refused, low_space)
        };
        ledger.next(
            low_space,
            changed,
            || topics.values().filter_map(|h| report(h)).collect(),
            |id| topics.by_id(id).and_then(|h| report(h)),
        )
    }
}

/// Topic changes a server applies at once when the book hands it many (a batch create,
/// a full list after a restart): enough for the storage writer to commit hundreds of topics
/// per fsync, few enough to bound the tasks and memory of a 10,000-topic list.
const RECONCILE_CONCURRENCY: usize = 256;

/// Runs `jobs` with at most [`RECONCILE_CONCURRENCY`] at a time; the first error, after all ran.
async fn run_bounded(
    jobs: impl Iterator<Item = impl std::future::Future<Output = Result<(), Error>> + Send + 'static>,
) -> Result<(), Error> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut result = Ok(());
    let mut take = |done: Option<Result<Result<(), Error>, tokio::task::JoinError>>| {
        if let Some(done) = done {
            result =
                std::mem::replace(&mut result, Ok(())).and(done.map_err(Error::internal).and_then(|r| r));
        }
    };
    for job in jobs {
        if tasks.len() >= RECONCILE_CONCURRENCY {
            take(tasks.join_next().await);
        }
        tasks.spawn(job);
    }
    while let Some(done) = tasks.join_next().await {
        take(Some(done));
    }
    result
}

/// What a client request does to which topic, for the grants; `None` for server requests.
fn client_operation(req: &Request) -> Option<(Operation, &TopicName)> {
    match req {
        Request::Produce { topic, .. } => Some((Operation::Produce, topic)),
        Request::Fetch { topic, .. }
        | Request::Read { topic, .. }
        | Request::Ack { topic, .. }
        | Request::Release { topic, .. }
        | Request::CreateSubscription { topic, .. } => Some((Operation::Consume, topic)),
        Request::ResetSubscription { topic, .. } | Request::DeleteSubscription { topic, .. } => {
            Some((Operation::Admin, topic))
        }
        Request::TopicStatus { topic } | Request::Locate { topic, .. } => Some((Operation::Describe, topic)),
        _ => None,
    }
}

impl TopicServer {
    /// Refuses a client request its principal was not granted (servers act only as servers:
    /// their requests are checked where they are handled). Until the first heartbeat answer
    /// brings the grants, clients are asked to retry.
    fn allow(&self, peer: &Peer, req: &Request) -> Result<(), Error> {
        if peer.is_server() {
            return Ok(());
        }
        let Some((operation, topic)) = client_operation(req) else { return Ok(()) };
        let acl = self.acl.read().expect("acl lock").clone();
        match acl {
            Some(view) => view.check(&peer.principal, operation, topic.as_str()),
            None => Err(Error::Unavailable {
                detail: format!(
                    "topic server {} has not heard the cluster's grants from the naming server yet",
                    self.node.id
                ),
            }),
        }
    }
}

impl Service for TopicServer {
    fn describe(&self) -> String {
        format!("topic server {}", self.node.id)
    }

    fn server_id(&self) -> Option<ServerId> {
        Some(self.node.id)
    }

    fn metrics(&self) -> &Arc<EndpointMetrics> {
        &self.metrics
    }

    fn dispatch(self: &Arc<Self>, req: Request, peer: &Peer) -> ResponseFuture {
        if let Err(e) = self.allow(peer, &req) {
            return ready(Response::Error(e));
        }
        if let Request::Fetch { session: Some(s), .. } | Request::Ack { session: Some(s), .. } = &req {
            let name = "consumer session name";
            if let Err(e) = crate::types::check_text(name, &s.name, crate::types::MAX_SESSION_NAME_BYTES) {
                return ready(Response::Error(e));
            }
        }
        let me = self.clone();
        let by = peer.principal.to_string();
        let answer = |r: Result<Response, Error>| ready(r.unwrap_or_else(Response::Error));
        match req {
            Request::Produce { topic, producer, sequence, records } => {
                self.produce(&topic, producer, sequence, records)
            }
            Request::Fetch { topic, subscription, from, max_records, max_bytes, max_wait_ms, session } => {
                let peer = peer.addr;
                Box::pin(async move {
                    let wait = Duration::from_millis(max_wait_ms as u64).min(MAX_FETCH_WAIT);
                    let result = async {
                        let hosted = match &session {
                            Some(s) => {
                                // A consumer reads at the leader, which alone moves cursors
                                // (and so records that an eviction was told).
                                me.serving(&topic).await?;
                                let hosted = me.hosted(&topic)?;
                                hosted.claim(&subscription, s, peer, wait + me.session_lease)?;
                                Some(hosted)
                            }
                            None => None,
                        };
                        let read =
                            Reading::Subscription { name: &subscription, from, consumer: session.is_some() };
                        let answer = me.fetch(&topic, read, max_records, max_bytes, wait).await;
                        if let (Some(h), Some(s)) = (hosted, &session) {
                            h.renew(&subscription, s.id, me.session_lease);
                        }
                        answer
                    };
                    result.await.unwrap_or_else(Response::Error)
                })
            }
            Request::Read { topic, from, max_records, max_bytes, max_wait_ms } => Box::pin(async move {
                let wait = Duration::from_millis(max_wait_ms as u64);
                let read = me.fetch(&topic, Reading::Offset(from), max_records, max_bytes, wait).await;
                read.unwrap_or_else(Response::Error)
            }),
            Request::Locate { topic, time_ms } => answer(self.locate(&topic, time_ms)),
            Request::Ack { topic, subscription, next, session } => {
                let peer = peer.addr;
                Box::pin(async move {
                    let result = async {
                        // Cursors move at the leader, which replicates them.
                        let replica = me.serving(&topic).await?;
                        let hosted = me.hosted(&topic)?;
                        match &session {
                            Some(s) => hosted.claim(&subscription, s, peer, me.session_lease)?,
                            // An ack from no consumer must not move a held cursor past records
                            // its holder has not seen.
                            None => hosted.refuse_if_held(subscription.as_str())?,
                        }
                        let sub = subscription.to_string();
                        let change = me.node.store.ack(replica.log.id, subscription, next).await?;
                        hosted.last_acks.lock().expect("acks lock").insert(sub, now_ms());
                        if let Some(at) = change.pending {
                            replica.wait_for(at, true).await?;
                        }
                        Ok(Response::Cursor { cursor: change.cursor })
                    };
                    result.await.unwrap_or_else(Response::Error)
                })
            }
            Request::Release { topic, subscription, session } => answer(self.hosted(&topic).map(|h| {
                h.release(&subscription, session);
                Response::Deleted
            })),
            Request::ResetSubscription { topic, subscription, to, execute, force } => Box::pin(async move {
                let result = async {
                    let replica = me.serving(&topic).await?;
                    let hosted = me.hosted(&topic)?;
                    if execute {
                        // The consumer would ack from its own position right after the move.
                        hosted.take_over(subscription.as_str(), force, &by)?;
                    }
                    let name = subscription.to_string();
                    let (outcome, pending) =
                        me.node.store.reset_cursor(replica.log.id, subscription, to, execute).await?;
                    if let Some(at) = pending {
                        info!(principal = %by, topic = %topic, subscription = %name, from = outcome.before, to = outcome.after, force, "subscription reset");
                        hosted.last_acks.lock().expect("acks lock").insert(name, now_ms());
                        replica.wait_for(at, true).await?;
                    }
                    Ok(Response::Reset(outcome))
                };
                result.await.unwrap_or_else(Response::Error)
            }),
            Request::CreateSubscription { topic, subscription, from, if_missing } => Box::pin(async move {
                let result = async {
                    let replica = me.serving(&topic).await?;
                    let change = me
                        .node
                        .store
                        .create_subscription(replica.log.id, subscription, from, if_missing)
                        .await?;
                    if let Some(at) = change.pending {
                        replica.wait_for(at, true).await?;
                    }
                    Ok(Response::Cursor { cursor: change.cursor })
                };
                result.await.unwrap_or_else(Response::Error)
            }),
            Request::DeleteSubscription { topic, subscription, force } => Box::pin(async move {
                let result = async {
                    let replica = me.serving(&topic).await?;
                    // Like a reset: the holder would go on reading a subscription that is gone.
                    me.hosted(&topic)?.take_over(subscription.as_str(), force, &by)?;
                    let before = replica.log.state();
                    let name = subscription.to_string();
                    let change = me.node.store.delete_subscription(replica.log.id, subscription).await?;
                    if let Ok(h) = me.hosted(&topic) {
                        h.forget_subscription(&name);
                    }
                    if let Some(at) = change.pending {
                        info!(principal = %by, topic = %topic, subscription = %name, force, "subscription deleted");
                        replica.wait_for(at, true).await?;
                    }
                    let after = replica.log.state();
                    Ok(Response::SubscriptionDeleted {
                        freed_records: after.log_start.saturating_sub(before.log_start),
                        freed_bytes: after.freed_bytes.saturating_sub(before.freed_bytes),
                    })
                };
                result.await.unwrap_or_else(Response::Error)
            }),
            Request::TopicStatus { topic } => Box::pin(async move {
                // It reads storage (subscriptions and their lag): off the async workers.
                let status = tokio::task::spawn_blocking(move || me.status(&topic)).await;
                status.map_err(Error::internal).and_then(|r| r).unwrap_or_else(Response::Error)
            }),
            Request::ReplicaFetch {
                topic,
                topic_id,
                replica: follower,
                fetch,
                known_commit,
                max_bytes,
                max_wait_ms,
            } => {
                if let Err(e) = peer.require(&Principal::Node(follower), "replicating") {
                    return ready(Response::Error(e));
                }
                Box::pin(async move {
                    let result = async {
                        let replica = me.replica_with_id(&topic, topic_id)?;
                        let wait = Duration::from_millis(max_wait_ms as u64)
                            .min(crate::replica::MAX_REPLICA_FETCH_WAIT);
                        let bytes = max_bytes.min(crate::replica::REPLICA_FETCH_BYTES);
                        let answer =
                            replica.serve_fetch(&me.node, follower, fetch, known_commit, bytes, wait).await?;
                        Ok(Response::Replica(answer))
                    };
                    result.await.unwrap_or_else(Response::Error)
                })
            }
            Request::FollowerAlive { replica: follower, digest, topics } => {
                if let Err(e) = peer.require(&Principal::Node(follower), "replicating") {
                    return ready(Response::Error(e));
                }
                let now = mono_ms();
                let outcome =
                    self.node.alive.lock().expect("alive lock").on_alive(follower, digest, topics, now);
                match outcome {
                    AliveOutcome::Noted(changed) => {
                        // Only what changed needs a look: a newer epoch deposes.
                        let hosted = self.topics.read().expect("topics lock");
                        for (id, epoch) in changed {
                            if let Some(h) = hosted.by_id(id) {
                                h.replica.follower_alive(follower, epoch, now);
                            }
                        }
                        ready(Response::Noted)
                    }
                    AliveOutcome::ListWanted => ready(Response::ListWanted),
                }
            }
            Request::Park { replica: follower, poll: sent, parked, max_wait_ms } => {
                if let Err(e) = peer.require(&Principal::Node(follower), "replicating") {
                    return ready(Response::Error(e));
                }
                let poll = {
                    let hosted = self.topics.read().expect("topics lock");
                    self.node
                        .parking
                        .hold(follower, sent, parked, |id| hosted.by_id(id).map(|h| h.replica.log.state()))
                };
                let Some(poll) = poll else { return ready(Response::Error(crate::replica::Parking::repeated(sent))) };
                Box::pin(async move {
                    let wait = Duration::from_millis(max_wait_ms as u64);
                    Response::Woken(me.node.parking.answer(follower, poll, wait).await)
                })
            }
            Request::ReadChunk { topic, topic_id, replica: asker, base, end } => {
                if let Err(e) = peer.require(&Principal::Node(asker), "repairing a chunk") {
                    return ready(Response::Error(e));
                }
                answer((|| {
                    let replica = me.replica_with_id(&topic, topic_id)?;
                    let bytes = read_chunk_for(&me.node.store, &replica, me.node.id, asker, base, end)?;
                    Ok(Response::StoredChunk { bytes })
                })())
            }
            Request::Promise { topic, topic_id, epoch } => {
                if let Err(e) = peer.require(&Principal::Naming, "an election") {
                    return ready(Response::Error(e));
                }
                Box::pin(async move {
                    let result = async {
                        let replica = me.replica_with_id(&topic, topic_id)?;
                        let (last_epoch, log_end) = replica.promise(&me.node, epoch).await?;
                        Ok(Response::Promised { last_epoch, log_end })
                    };
                    result.await.unwrap_or_else(Response::Error)
                })
            }
            other => answer(Err(Error::invalid(format!(
                "{} went to topic server {}, which is not a naming server: point --naming (HERALD_NAMING) at the naming group's members",
                transport::request_name(&other),
                self.node.id
            )))),
        }
    }
}

/// Refuses a batch no honest producer sends, before it takes a sequence number: an empty one
/// (it would keep producer state for a day and store nothing) or one over
/// [`MAX_PRODUCE_BATCH_BYTES`](crate::wire::MAX_PRODUCE_BATCH_BYTES).
fn check_batch(records: &[crate::wire::Record]) -> Result<(), Error> {
    if records.is_empty() {
        return Err(Error::invalid("a produce batch needs at least one record"));
    }
    let bytes: usize = records.iter().map(crate::wire::Record::encoded_size).sum();
    if bytes > crate::wire::MAX_PRODUCE_BATCH_BYTES {
        return Err(Error::invalid(format!(
            "a produce batch of {bytes} bytes is over the limit of {} bytes: send smaller batches",
            crate::wire::MAX_PRODUCE_BATCH_BYTES
        )));
    }
    Ok(())
}

/// Reads committed records of `log` from `from` (as the state `state` says what is
/// committed and stored); `None` when there is nothing to read yet.
/// What a fetch reads through.
#[derive(Debug, Clone, Copy)]
enum Reading<'a> {
    /// A subscription, from `from` or else its cursor; `consumer` when the reader holds it
    /// (it then follows the cursor where the backlog policy moved it).
    Subscription { name: &'a SubscriptionName, from: Option<Offset>, consumer: bool },
    /// No subscription (`Request::Read`): from this offset, holding and moving nothing.
    Offset(Offset),
}

/// Committed records of `log` from `from`, as a fetch answers them (`None`: nothing past
/// `from` is committed yet). `subscription` names the reader in errors.
pub fn read_committed(
    store: &Store,
    log: &TopicLog,
    state: &LogState,
    subscription: Option<&SubscriptionName>,
    from: Offset,
    max_records: u32,
    max_bytes: u32,
) -> Result<Option<FetchedRecords>, Error> {
    let before_start = |log_start| Error::CursorBeforeLogStart {
        topic: log.name.to_string(),
        subscription: subscription.map(|s| s.to_string()),
        offset: from,
        log_start,
    };
    if from < state.log_start {
        return Err(before_start(state.log_start));
    }
    if from > state.commit {
        return Err(Error::OffsetBeyondEnd {
            topic: log.name.to_string(),
            offset: from,
            log_end: state.commit,
        });
    }
    if from == state.commit {
        return Ok(None);
    }
    let records = store.read_chunks(log, from, state.commit, max_records, max_bytes)?;
    if records.chunks.first().map(|(base, _)| *base) != Some(from) {
        // Deleted between the state snapshot and the read.
        return Err(before_start(log.state().log_start));
    }
    Ok(Some(records))
}

/// Registers with the naming server and follows its book until `shutdown`.
/// Tells naming member `addr` every third of a lease that this server is alive, so a member
/// that becomes leader knows which servers are (and takes one that died with the old leader
/// for dead a lease after it went silent, not after a grace period).
async fn ping_naming(
    server: Arc<TopicServer>,
    endpoint: Endpoint,
    addr: SocketAddr,
    shutdown: CancellationToken,
) {
    let mut conn: Option<crate::transport::Connection> = None;
    loop {
        let every = Duration::from_millis(server.lease_ms.load(Ordering::Relaxed) / 3);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let req = Request::NamingAlive { server: server.node.id };
        let sent = tokio::time::timeout(every.max(Duration::from_millis(100)), async {
            if conn.as_ref().is_none_or(|c| c.is_closed()) {
                conn = Some(crate::transport::Connection::connect(&endpoint, addr).await?);
            }
            conn.as_ref().expect("connected").call(&req).await
        })
        .await;
        if !matches!(sent, Ok(Ok(_))) {
            debug!(naming = %addr, outcome = ?sent.map(|r| r.map(|_| ())), "naming member not told this server is alive");
            conn = None;
        }
    }
}

async fn follow_naming(
    server: Arc<TopicServer>,
    endpoint: Endpoint,
    naming: NamingAddrs,
    advertise: SocketAddr,
    shutdown: CancellationToken,
) {
    let mut backoff = NAMING_BACKOFF_MIN;
    if naming.list().len() > 1 {
        for addr in naming.list().iter().copied() {
            let ping = ping_naming(server.clone(), endpoint.clone(), addr, shutdown.clone());
            tokio::spawn(ping.in_current_span());
        }
    }
    let route = crate::client::NamingRoute::new(naming.clone());
    while !shutdown.is_cancelled() {
        let session = async {
            let conn = route.connect(&endpoint).await?;
            let (lease_ms, cluster) = match conn
                .call(&Request::Register { server: server.node.id, addr: advertise })
                .await?
            {
                Response::Registered { lease_ms, cluster } => {
                    server.lease_ms.store(lease_ms as u64, Ordering::Relaxed);
                    (lease_ms, cluster)
                }
                other => return Err(Error::internal(format!("unexpected answer to Register: {other:?}"))),
            };
            // The first book this data directory follows becomes its book.
            let may_delete = match server.node.store.meta("cluster_id")? {
                Some(c) => c == cluster,
                None => {
                    server.node.store.set_meta("cluster_id", cluster).await?;
                    true
                }
            };
            if !may_delete {
                error!(naming = %naming, "this data directory belongs to another naming server's book; topics it does not list are kept");
            }
            info!(naming = %naming, "registered with the naming server");
            backoff = NAMING_BACKOFF_MIN;
            let (mut known, mut applied) = (0u64, 0u64);
            let mut ledger = ReportLedger::default();
            loop {
                if !server.node.store.is_writing() {
                    // A server that cannot write must not look healthy: its leases lapse and
                    // the naming server moves its topics to replicas that can.
                    error!("the storage writer has stopped; no longer heartbeating");
                    std::future::pending::<()>().await;
                }
                let wait_ms = lease_ms / 3;
                let req = Request::Heartbeat {
                    server: server.node.id,
                    known_version: known,
                    applied_version: applied,
                    wait_ms,
                    reports: server.reports(&mut ledger),
                };
                // A naming server that went away sends nothing: notice it within a grace past
                // the long poll, not after the connection's idle timeout.
                let limit = Duration::from_millis(wait_ms as u64) + NAMING_ANSWER_GRACE;
                let answer = tokio::time::timeout(limit, conn.call(&req)).await.map_err(|_| {
                    Error::Unavailable { detail: format!("no heartbeat answer in {limit:?}") }
                })??;
                match answer {
                    Response::Heartbeat { version, assignments, acl, send_all_reports } => {
                        if send_all_reports {
                            ledger.send_all();
                        }
                        if let Some(view) = acl {
                            *server.acl.write().expect("acl lock") = Some(Arc::new(view));
                        }
                        if let Some(assignments) = assignments {
                            if let Assignments::Since { known: since, .. } = &assignments {
                                if *since != known {
                                    return Err(Error::internal(format!(
                                        "heartbeat answer has the changes since version {since}, this server knows {known}"
                                    )));
                                }
                            }
                            server.reconcile(assignments, may_delete).await?;
                            applied = version;
                        }
                        known = version;
                    }
                    other => {
                        return Err(Error::internal(format!("unexpected answer to Heartbeat: {other:?}")))
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), Error>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            result = session => if let Err(e) = result {
                if matches!(e, Error::Unauthorized { .. }) {
                    // Retrying will not help: the operator must fix the certificates.
                    warn!(error = %e, "the naming server refused this server's certificate; retrying");
                } else {
                    debug!(error = %e, "naming session ended; retrying");
                }
                if route.redirected(&e) {
                    // Another member leads (or an election is under way): ask again soon.
                    backoff = NAMING_BACKOFF_MIN;
                }
            },
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(NAMING_BACKOFF_MAX);
    }
}

/// Runs a topic server until `shutdown`.
pub async fn run(config: ServerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (store, logs) = Store::open_on(&config.data_dir, config.id, &config.medium)?;
    let identity = certs::load(&config.certs_dir, CertRole::Node(store.server_id()))?;
    // Every log line of this server (its tasks included) carries `node`.
    let span = tracing::info_span!("node", node = %format!("server-{}", store.server_id()));
    run_node(config, shutdown, identity, store, logs).instrument(span).await
}

async fn run_node(
    config: ServerConfig,
    shutdown: CancellationToken,
    identity: certs::Identity,
    store: Store,
    logs: Vec<crate::storage::HostedTopic>,
) -> anyhow::Result<()> {
    let id = store.server_id();
    let endpoint = transport::server_endpoint(config.listen, &identity)
        .with_context(|| format!("starting topic server {id} on {}", config.listen))?;
    let advertise = config.advertise.unwrap_or(endpoint.local_addr()?);
    let node = Arc::new(Node::new(id, store, endpoint.clone()));
    let mut topics = HostedTopics::default();
    for (log, meta) in logs {
        let info =
            |ids: &[ServerId]| ids.iter().map(|s| ReplicaInfo { server: *s, addr: advertise }).collect();
        let assignment = Assignment {
            leader: meta.leader,
            epoch: meta.epoch,
            voters: info(&meta.voters),
            learners: info(&meta.learners),
        };
        let replica = Replica::new(log, id, assignment.clone());
        let mut applied = None;
        if meta.is_solo() && meta.leader == id {
            // A single replica is its own majority: it leads again at once, with or without
            // the naming server.
            replica.apply(&node, assignment.clone()).await?;
            applied = Some(assignment);
        }
        topics.insert(Hosted::new(replica, applied, meta.config.clone()));
    }
    let server = Arc::new(TopicServer {
        node,
        topics: RwLock::new(topics),
        session_lease: config.session_lease,
        metrics: Arc::default(),
        lease_ms: AtomicU64::new(crate::naming::DEFAULT_LEASE.as_millis() as u64),
        acl: RwLock::new(None),
    });
    if let Some(addr) = config.metrics_listen {
        let me = server.clone();
        crate::metrics::spawn(addr, Arc::new(move || me.render_metrics()), shutdown.clone());
    }
    info!(id, listen = %config.listen, data = %config.data_dir.display(), "topic server ready");
    let naming = tokio::spawn(
        follow_naming(server.clone(), endpoint.clone(), config.naming, advertise, shutdown.clone())
            .in_current_span(),
    );
    let alive = tokio::spawn(alive::tell_leaders_alive(server.clone(), shutdown.clone()).in_current_span());
    let repair = tokio::spawn(repair::repair_damaged(server.clone(), shutdown.clone()).in_current_span());
    let scrub = tokio::spawn(repair::scrub(server.clone(), shutdown.clone()).in_current_span());
    transport::serve(endpoint, server, config.limits, shutdown).await;
    let _ = naming.await;
    let _ = alive.await;
    let _ = repair.await;
    let _ = scrub.await;
    Ok(())
}
