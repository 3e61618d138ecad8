//! A topic server: hosts topic logs, answers producers and consumers, follows the naming
//! server's book.
//!
//! Each hosted topic is a [`TopicLog`] in the server's [`Store`]. The server registers with
//! the naming server and keeps a long-poll heartbeat open; each answer carries the topics
//! this server must host, which it reconciles with its store (create what is new, drop what
//! the book deleted). A consumer waiting for records waits on the topic's committed-state
//! watch, so it wakes at the commit that makes records readable, with no polling.
//!
//! Replication is not here yet: every topic has one replica, which leads, and the commit
//! offset is the durable log end. The protocol already carries epochs and commit offsets.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use quinn::Endpoint;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::certs::{self, CertRole};
use crate::error::Error;
use crate::storage::{Store, TopicLog, TopicMeta};
use crate::transport::{self, ready, Connection, Peer, ResponseFuture, Service};
use crate::types::{Epoch, Offset, ServerId, SubscriptionName, TopicName};
use crate::wire::{Request, Response, Role, TopicInfo, TopicStatus};

/// Most records one fetch returns.
pub const MAX_FETCH_RECORDS: u32 = 10_000;
/// Most payload bytes one fetch returns (beyond its first record), so an answer always fits a
/// frame next to one maximal record.
pub const MAX_FETCH_BYTES: u32 = 4 * 1024 * 1024;
/// Longest a fetch waits for records.
pub const MAX_FETCH_WAIT: Duration = Duration::from_secs(30);

/// Settings of `herald server`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub id: Option<ServerId>,
    pub listen: SocketAddr,
    /// The address other processes reach this server at (defaults to `listen`).
    pub advertise: Option<SocketAddr>,
    pub naming: SocketAddr,
    pub data_dir: PathBuf,
    pub certs_dir: PathBuf,
}

/// The naming server's word on one topic, as this server last applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Assignment {
    leader: ServerId,
    epoch: Epoch,
    replicas: Vec<ServerId>,
}

/// A topic this server holds a replica of.
struct Hosted {
    log: Arc<TopicLog>,
    assignment: RwLock<Assignment>,
}

impl Hosted {
    fn role(&self, me: ServerId) -> Role {
        if self.assignment.read().expect("assignment lock").leader == me {
            Role::Leader
        } else {
            Role::Follower
        }
    }
}

pub struct TopicServer {
    id: ServerId,
    store: Store,
    topics: RwLock<HashMap<TopicName, Arc<Hosted>>>,
}

impl TopicServer {
    fn hosted(&self, name: &TopicName) -> Result<Arc<Hosted>, Error> {
        self.topics.read().expect("topics lock").get(name).cloned().ok_or_else(|| Error::NotLeader {
            topic: name.to_string(),
            server: self.id,
            leader: None,
        })
    }

    fn topic(&self, name: &TopicName) -> Result<Arc<TopicLog>, Error> {
        Ok(self.hosted(name)?.log.clone())
    }

    fn leader_of(&self, name: &TopicName) -> Result<Arc<TopicLog>, Error> {
        let hosted = self.hosted(name)?;
        match hosted.role(self.id) {
            Role::Leader => Ok(hosted.log.clone()),
            Role::Follower => {
                let leader = Some(hosted.assignment.read().expect("assignment lock").leader);
                Err(Error::NotLeader { topic: name.to_string(), server: self.id, leader })
            }
        }
    }

    fn produce(
        &self,
        topic: &TopicName,
        producer: u64,
        sequence: u64,
        records: Vec<crate::wire::Record>,
    ) -> ResponseFuture {
        let log = match self.leader_of(topic) {
            Ok(log) => log,
            Err(e) => return ready(Response::Error(e)),
        };
        // Queued now, in stream order; the future waits for the group commit.
        let appended = self.store.append(log.id, producer, sequence, records);
        Box::pin(async move {
            match appended.await {
                Ok(a) => Response::Produced {
                    base: a.base,
                    count: a.count,
                    epoch: a.epoch,
                    duplicate: a.duplicate,
                },
                Err(e) => Response::Error(e),
            }
        })
    }

    async fn fetch(
        &self,
        topic: &TopicName,
        subscription: &SubscriptionName,
        from: Option<Offset>,
        max_records: u32,
        max_bytes: u32,
        max_wait: Duration,
    ) -> Result<Response, Error> {
        let log = self.topic(topic)?;
        let unknown_sub = || Error::UnknownSubscription {
            topic: topic.to_string(),
            subscription: subscription.to_string(),
        };
        let cursor = self.store.cursor(log.id, subscription)?.ok_or_else(unknown_sub)?;
        let from = from.unwrap_or(cursor);
        let max_records = max_records.clamp(1, MAX_FETCH_RECORDS);
        let max_bytes = max_bytes.clamp(1, MAX_FETCH_BYTES);
        let deadline = tokio::time::Instant::now() + max_wait.min(MAX_FETCH_WAIT);
        let mut watch = log.watch();
        loop {
            let state = watch.borrow_and_update().clone();
            let before_start = || Error::CursorBeforeLogStart {
                topic: topic.to_string(),
                subscription: Some(subscription.to_string()),
                offset: from,
                log_start: state.log_start,
            };
            if from < state.log_start {
                return Err(before_start());
            }
            if from > state.commit {
                return Err(Error::OffsetBeyondEnd {
                    topic: topic.to_string(),
                    offset: from,
                    log_end: state.commit,
                });
            }
            if from < state.commit {
                // Reads are short and mostly served from redb's cache, so they run inline.
                let records = self.store.read(&log, from, state.commit, max_records, max_bytes)?;
                if records.first().map(|r| r.offset) != Some(from) {
                    // Deleted between the state snapshot and the read.
                    let log_start = log.state().log_start;
                    return Err(Error::CursorBeforeLogStart {
                        topic: topic.to_string(),
                        subscription: Some(subscription.to_string()),
                        offset: from,
                        log_start,
                    });
                }
                return Ok(Response::Records { records, log_start: state.log_start, commit: state.commit });
            }
            if tokio::time::timeout_at(deadline, watch.changed()).await.is_err() {
                return Ok(Response::Records {
                    records: Vec::new(),
                    log_start: state.log_start,
                    commit: state.commit,
                });
            }
        }
    }

    fn status(&self, topic: &TopicName) -> Result<Response, Error> {
        let hosted = self.hosted(topic)?;
        let log = &hosted.log;
        let state = log.state();
        Ok(Response::TopicStatus(TopicStatus {
            id: log.id,
            name: log.name.clone(),
            server: self.id,
            role: hosted.role(self.id),
            epoch: state.epoch,
            log_start: state.log_start,
            log_end: state.log_end,
            commit: state.commit,
            subscriptions: self.store.subscriptions(log.id, state.commit)?,
        }))
    }

    /// Makes the hosted topics match the book's assignments for this server.
    async fn reconcile(&self, assignments: Vec<TopicInfo>, may_delete: bool) -> Result<(), Error> {
        let assigned: HashSet<u64> = assignments.iter().map(|t| t.id).collect();
        let hosted: Vec<Arc<Hosted>> = self.topics.read().expect("topics lock").values().cloned().collect();
        for h in hosted {
            let log = &h.log;
            if !assigned.contains(&log.id) {
                if !may_delete {
                    warn!(topic = %log.name, "the naming server does not list this topic, but its book is not the one this data belongs to; keeping the data");
                    continue;
                }
                info!(topic = %log.name, id = log.id, "dropping topic deleted from the book");
                self.store.delete_topic(log.id).await?;
                let mut topics = self.topics.write().expect("topics lock");
                if topics.get(&log.name).is_some_and(|l| l.log.id == log.id) {
                    topics.remove(&log.name);
                }
            }
        }
        for info in assignments {
            let assignment = Assignment {
                leader: info.leader,
                epoch: info.epoch,
                replicas: info.replicas.iter().map(|r| r.server).collect(),
            };
            let current = self.topics.read().expect("topics lock").get(&info.name).cloned();
            match current {
                Some(h) if h.log.id == info.id => {
                    if *h.assignment.read().expect("assignment lock") == assignment {
                        continue;
                    }
                    self.store
                        .assign(info.id, assignment.replicas.clone(), assignment.leader, assignment.epoch)
                        .await?;
                    if assignment.leader == self.id {
                        self.store.become_leader(info.id, assignment.epoch).await?;
                    }
                    info!(topic = %info.name, epoch = info.epoch, leader = info.leader, "new assignment");
                    *h.assignment.write().expect("assignment lock") = assignment;
                }
                _ => {
                    let meta = TopicMeta {
                        id: info.id,
                        name: info.name.clone(),
                        config: info.config,
                        replicas: assignment.replicas.clone(),
                        leader: assignment.leader,
                        epoch: assignment.epoch,
                        promised: assignment.epoch,
                        log_start: 0,
                    };
                    let log = self.store.create_topic(meta).await?;
                    info!(topic = %info.name, id = info.id, epoch = info.epoch, leader = info.leader, "hosting topic");
                    let hosted = Arc::new(Hosted { log, assignment: RwLock::new(assignment) });
                    self.topics.write().expect("topics lock").insert(info.name, hosted);
                }
            }
        }
        Ok(())
    }
}

impl Service for TopicServer {
    fn describe(&self) -> String {
        format!("topic server {}", self.id)
    }

    fn server_id(&self) -> Option<ServerId> {
        Some(self.id)
    }

    fn dispatch(self: &Arc<Self>, req: Request, _peer: &Peer) -> ResponseFuture {
        let me = self.clone();
        let answer = |r: Result<Response, Error>| ready(r.unwrap_or_else(Response::Error));
        match req {
            Request::Produce { topic, producer, sequence, records } => {
                self.produce(&topic, producer, sequence, records)
            }
            Request::Fetch { topic, subscription, from, max_records, max_bytes, max_wait_ms } => {
                Box::pin(async move {
                    me.fetch(
                        &topic,
                        &subscription,
                        from,
                        max_records,
                        max_bytes,
                        Duration::from_millis(max_wait_ms as u64),
                    )
                    .await
                    .unwrap_or_else(Response::Error)
                })
            }
            Request::Ack { topic, subscription, next } => Box::pin(async move {
                let result = async {
                    // Cursors move at the leader, which will replicate them.
                    let log = me.leader_of(&topic)?;
                    let (cursor, _) = me.store.ack(log.id, subscription, next).await?;
                    Ok(Response::Cursor { cursor })
                };
                result.await.unwrap_or_else(Response::Error)
            }),
            Request::CreateSubscription { topic, subscription, from, if_missing } => Box::pin(async move {
                let result = async {
                    let log = me.leader_of(&topic)?;
                    let (cursor, _) =
                        me.store.create_subscription(log.id, subscription, from, if_missing).await?;
                    Ok(Response::Cursor { cursor })
                };
                result.await.unwrap_or_else(Response::Error)
            }),
            Request::DeleteSubscription { topic, subscription } => Box::pin(async move {
                let result = async {
                    let log = me.leader_of(&topic)?;
                    let (_, freed_records) = me.store.delete_subscription(log.id, subscription).await?;
                    Ok(Response::SubscriptionDeleted { freed_records })
                };
                result.await.unwrap_or_else(Response::Error)
            }),
            Request::TopicStatus { topic } => answer(self.status(&topic)),
            other => answer(Err(Error::invalid(format!(
                "{} is a naming server request; send it to the naming server",
                transport::request_name(&other)
            )))),
        }
    }
}

/// Registers with the naming server and follows its book until `shutdown`.
async fn follow_naming(
    server: Arc<TopicServer>,
    endpoint: Endpoint,
    naming: SocketAddr,
    advertise: SocketAddr,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    while !shutdown.is_cancelled() {
        let session = async {
            let conn = Connection::connect(&endpoint, naming).await?;
            let (lease_ms, cluster) = match conn
                .call(&Request::Register { server: server.id, addr: advertise })
                .await?
            {
                Response::Registered { lease_ms, cluster } => (lease_ms, cluster),
                other => return Err(Error::internal(format!("unexpected answer to Register: {other:?}"))),
            };
            // The first book this data directory follows becomes its book.
            let may_delete = match server.store.meta("cluster_id")? {
                Some(c) => c == cluster,
                None => {
                    server.store.set_meta("cluster_id", cluster).await?;
                    true
                }
            };
            if !may_delete {
                error!(naming = %naming, "this data directory belongs to another naming server's book; topics it does not list are kept");
            }
            info!(naming = %naming, "registered with the naming server");
            backoff = Duration::from_millis(50);
            let (mut known, mut applied) = (0u64, 0u64);
            loop {
                let req = Request::Heartbeat {
                    server: server.id,
                    known_version: known,
                    applied_version: applied,
                    wait_ms: lease_ms / 3,
                };
                match conn.call(&req).await? {
                    Response::Heartbeat { version, assignments } => {
                        if let Some(assignments) = assignments {
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
                debug!(error = %e, "naming session ended; retrying");
            },
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Runs a topic server until `shutdown`.
pub async fn run(config: ServerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let identity = certs::load(&config.certs_dir, CertRole::Node)?;
    let (store, logs) = Store::open(&config.data_dir, config.id)?;
    let id = store.server_id();
    let topics = logs
        .into_iter()
        .map(|(log, meta)| {
            let assignment = Assignment { leader: meta.leader, epoch: meta.epoch, replicas: meta.replicas };
            (log.name.clone(), Arc::new(Hosted { log, assignment: RwLock::new(assignment) }))
        })
        .collect();
    let server = Arc::new(TopicServer { id, store, topics: RwLock::new(topics) });
    let endpoint = transport::server_endpoint(config.listen, &identity)
        .with_context(|| format!("starting topic server {id} on {}", config.listen))?;
    let advertise = config.advertise.unwrap_or(endpoint.local_addr()?);
    info!(id, listen = %config.listen, data = %config.data_dir.display(), "topic server ready");
    let naming = tokio::spawn(follow_naming(
        server.clone(),
        endpoint.clone(),
        config.naming,
        advertise,
        shutdown.clone(),
    ));
    transport::serve(endpoint, server, shutdown).await;
    let _ = naming.await;
    Ok(())
}
