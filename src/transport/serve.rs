//! The server side of the transport: admitting connections within the [`Limits`], the
//! version handshake, and each stream's request loop.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use super::limits::{
    answer_bound, Budget, Charge, ConnectionCount, Limits, LogLimiter, HANDSHAKE_LOG_EVERY,
    MAX_PIPELINED_PER_STREAM, NODE_MAX_STREAMS, REFUSAL_LOG_EVERY, SMALL_ANSWER_BYTES,
};
use super::{close, read_body, read_frame, read_length, release_large, STREAM_BAD_FRAME};
use crate::certs::Principal;
use crate::error::Error;
use crate::metrics::EndpointMetrics;
use crate::types::{mono_ms, ServerId};
use crate::wire::{self, Request, Response, LENGTH_PREFIX, PROTOCOL_VERSION};

/// Responses are gathered up to this many bytes per write.
const WRITE_COALESCE_BYTES: usize = 256 * 1024;

/// What a server knows about the peer of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    /// Who the peer's certificate names, read once per connection.
    pub principal: Principal,
}

impl Peer {
    /// A Herald server (a topic server or a naming member), trusted with cluster traffic.
    pub fn is_server(&self) -> bool {
        self.principal.is_server()
    }

    /// Refuses `what` unless the peer is `who`: a server acts only as itself.
    pub fn require(&self, who: &Principal, what: &str) -> Result<(), Error> {
        if self.principal == *who {
            return Ok(());
        }
        Err(Error::Unauthorized {
            detail: format!(
                "{what} needs the certificate of {who}; {} presented the certificate of {}",
                self.addr, self.principal
            ),
        })
    }
}

/// A boxed response future.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response> + Send + 'static>>;

/// Something that answers requests: the naming server or a topic server.
pub trait Service: Send + Sync + 'static {
    /// How this server names itself in errors ("topic server 2", "naming server").
    fn describe(&self) -> String;
    /// The id announced in the handshake.
    fn server_id(&self) -> Option<ServerId>;
    /// Starts handling `req`. Work that must happen in stream order (a producer's append)
    /// happens before this returns; the future then waits for the outcome.
    fn dispatch(self: &Arc<Self>, req: Request, peer: &Peer) -> ResponseFuture;
    /// Where connections, handshakes and requests are counted.
    fn metrics(&self) -> &Arc<EndpointMetrics>;
}

/// A response that is ready now.
pub fn ready(resp: Response) -> ResponseFuture {
    Box::pin(std::future::ready(resp))
}

/// What every connection of one server shares.
struct Shared<S> {
    service: Arc<S>,
    limits: Limits,
    /// The server's total budget, which every client connection's budget draws on too.
    server_budget: Arc<Semaphore>,
    /// Refused requests are logged at most this often (all are counted in the metrics).
    refusal_log: LogLimiter,
}

/// Accepts connections on `endpoint` until `shutdown`, serving each with `service` within
/// `limits`.
pub async fn serve<S: Service>(
    endpoint: Endpoint,
    service: Arc<S>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let tasks = tokio_util::task::TaskTracker::new();
    let count = Arc::new(ConnectionCount::default());
    let shared = Arc::new(Shared {
        service: service.clone(),
        limits,
        server_budget: Arc::new(Semaphore::new(limits.server_budget)),
        refusal_log: LogLimiter::new(REFUSAL_LOG_EVERY),
    });
    let handshake_log = Arc::new(LogLimiter::new(HANDSHAKE_LOG_EVERY));
    let refusal_log = LogLimiter::new(HANDSHAKE_LOG_EVERY);
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let addr = incoming.remote_address();
        let slot = match count.admit(addr.ip(), &limits) {
            Ok(slot) => slot,
            Err(limit) => {
                service.metrics().refused_connections.inc();
                if let Some(held_back) = refusal_log.allow() {
                    warn!(peer = %addr, limit, held_back, "connection refused");
                }
                incoming.refuse();
                continue;
            }
        };
        let (shared, shutdown, handshake_log) = (shared.clone(), shutdown.clone(), handshake_log.clone());
        let span = tracing::info_span!("connection", peer = %addr);
        tasks.spawn(
            async move {
                let _slot = slot;
                match incoming.await {
                    Ok(conn) => {
                        let metrics = shared.service.metrics().clone();
                        metrics.open_connections.inc();
                        metrics.accepted_connections.inc();
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = serve_connection(conn, shared) => {}
                        }
                        metrics.open_connections.dec();
                    }
                    Err(e) => {
                        shared.service.metrics().handshake_failures.inc();
                        // Anyone who reaches the port can fail a handshake: log a sample.
                        if let Some(held_back) = handshake_log.allow() {
                            warn!(peer = %addr, error = %e, held_back, "TLS handshake failed");
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
    endpoint.close(VarInt::from_u32(close::SHUTDOWN), b"server shutting down");
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
}

/// Who the peer's leaf certificate names (the handshake already checked it against the CA).
fn principal_of(conn: &quinn::Connection) -> Option<Principal> {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(Principal::of_certificate))
}

/// Streams open on a connection and when the last one closed, to close idle connections.
#[derive(Default)]
struct Activity {
    open: AtomicUsize,
    last_ms: AtomicU64,
}

/// Counts a stream as open until dropped.
struct StreamGuard(Arc<Activity>);

impl StreamGuard {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.last_ms.store(mono_ms(), Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Returns once the connection has had no stream open for `limit`.
async fn idle(activity: &Activity, limit: Duration) {
    let check = (limit / 10).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::time::sleep(check).await;
        let quiet = mono_ms().saturating_sub(activity.last_ms.load(Ordering::Relaxed));
        if activity.open.load(Ordering::Relaxed) == 0 && quiet >= limit.as_millis() as u64 {
            return;
        }
    }
}

async fn serve_connection<S: Service>(conn: quinn::Connection, shared: Arc<Shared<S>>) {
    let service = &shared.service;
    let addr = conn.remote_address();
    let principal = principal_of(&conn);
    // Servers replicate over one long-polling stream per topic and are not budgeted; clients
    // get the default stream limit and a byte budget.
    let budget = if principal.as_ref().is_some_and(Principal::is_server) {
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(NODE_MAX_STREAMS));
        None
    } else {
        Some(Budget::new(shared.limits.connection_budget, shared.server_budget.clone()))
    };
    let me = service.describe();
    // The first stream is the version handshake.
    let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
    let mut buf = Vec::new();
    let answer = match read_frame::<Request>(&mut recv, &mut buf, addr, &me).await {
        Ok(Some(Request::Hello { .. })) if principal.is_none() => Err(Error::Unauthorized {
            detail: format!(
                "the certificate presented to {me} names no Herald identity (a herald:client:NAME, herald:node:ID or herald:naming URI): `herald certs issue` makes one"
            ),
        }),
        Ok(Some(Request::Hello { min_version, max_version, .. })) => {
            if (min_version..=max_version).contains(&PROTOCOL_VERSION) {
                Ok(Response::Hello { version: PROTOCOL_VERSION, server: service.server_id() })
            } else {
                Err(Error::UnsupportedVersion {
                    offered_min: min_version,
                    offered_max: max_version,
                    supported: PROTOCOL_VERSION,
                    enforced_by: me.clone(),
                })
            }
        }
        Ok(Some(other)) => Err(Error::Malformed {
            detail: format!("expected Hello as the first request, got {}", request_name(&other)),
            enforced_by: me.clone(),
        }),
        Ok(None) => return,
        Err(e) => Err(e),
    };
    let ok = answer.is_ok();
    let mut out = Vec::new();
    let resp = answer.unwrap_or_else(Response::Error);
    if wire::encode_frame(&resp, &mut out).is_ok() {
        let _ = send.write_all(&out).await;
        let _ = send.finish();
    }
    let principal = match principal {
        Some(p) if ok => p,
        _ => {
            let _ = send.stopped().await;
            conn.close(VarInt::from_u32(close::PROTOCOL), b"handshake failed");
            return;
        }
    };
    let peer = Peer { addr, principal };
    debug!(peer = %peer.addr, principal = %peer.principal, "connection ready");
    let activity = Arc::new(Activity { open: AtomicUsize::new(0), last_ms: AtomicU64::new(mono_ms()) });
    let idle_limit = shared.limits.idle_connection;
    loop {
        let accepted = tokio::select! {
            accepted = conn.accept_bi() => accepted,
            _ = idle(&activity, idle_limit), if !peer.is_server() => {
                debug!(peer = %peer.addr, "closing a connection idle for {idle_limit:?}");
                conn.close(VarInt::from_u32(close::IDLE), b"idle");
                return;
            }
        };
        match accepted {
            Ok((send, recv)) => {
                let guard = StreamGuard::new(&activity);
                let (peer, budget) = (peer.clone(), budget.clone());
                let stream = serve_stream(shared.clone(), peer, budget, send, recv);
                tokio::spawn(
                    async move {
                        stream.await;
                        drop(guard);
                    }
                    .in_current_span(),
                );
            }
            Err(_) => return,
        }
    }
}

/// Short name of a request, for logs and errors.
pub fn request_name(req: &Request) -> &'static str {
    match req {
        Request::Hello { .. } => "Hello",
        Request::Register { .. } => "Register",
        Request::Heartbeat { .. } => "Heartbeat",
        Request::CreateTopic { .. } => "CreateTopic",
        Request::DeleteTopic { .. } => "DeleteTopic",
        Request::AlterTopic { .. } => "AlterTopic",
        Request::LookupTopic { .. } => "LookupTopic",
        Request::ListTopics => "ListTopics",
        Request::ListServers => "ListServers",
        Request::Produce { .. } => "Produce",
        Request::Fetch { .. } => "Fetch",
        Request::Ack { .. } => "Ack",
        Request::Release { .. } => "Release",
        Request::ResetSubscription { .. } => "ResetSubscription",
        Request::CreateSubscription { .. } => "CreateSubscription",
        Request::DeleteSubscription { .. } => "DeleteSubscription",
        Request::TopicStatus { .. } => "TopicStatus",
        Request::ReplicaFetch { .. } => "ReplicaFetch",
        Request::Promise { .. } => "Promise",
        Request::NamingRaft { .. } => "NamingRaft",
        Request::NamingStatus => "NamingStatus",
        Request::NamingAlive { .. } => "NamingAlive",
        Request::ListTopicsPage { .. } => "ListTopicsPage",
        Request::ChangeAcl { .. } => "ChangeAcl",
        Request::ListGrants => "ListGrants",
        Request::RemoveServer { .. } => "RemoveServer",
        Request::CreateTopics { .. } => "CreateTopics",
        Request::DeleteTopics { .. } => "DeleteTopics",
        Request::Rebalance => "Rebalance",
        Request::FollowerAlive { .. } => "FollowerAlive",
        Request::Park { .. } => "Park",
        Request::AwaitLeader { .. } => "AwaitLeader",
        Request::Read { .. } => "Read",
        Request::Locate { .. } => "Locate",
        Request::ReadChunk { .. } => "ReadChunk",
    }
}

/// An answer on its way, with what it holds of the connection's budget until written.
type Pending = (JoinHandle<Response>, Option<Charge>);

/// Reads the next request of a stream, charging the budget for its frame and its answer
/// before reading on: `Ok(None)` at the end of the stream.
async fn next_request(
    recv: &mut RecvStream,
    buf: &mut Vec<u8>,
    budget: Option<&Budget>,
    metrics: &EndpointMetrics,
    peer: &Peer,
    me: &str,
    frame_timeout: Duration,
) -> Result<Option<(Request, Option<Charge>)>, Error> {
    let Some(len) = read_length(recv, peer.addr, me).await? else { return Ok(None) };
    let mut charge = match budget {
        Some(b) => Some(b.charge(LENGTH_PREFIX + len + SMALL_ANSWER_BYTES, metrics).await),
        None => None,
    };
    match tokio::time::timeout(frame_timeout, read_body(recv, buf, len, peer.addr, me)).await {
        Ok(read) => read?,
        Err(_) => {
            return Err(Error::Malformed {
                detail: format!("the {len}-byte frame announced did not arrive within {frame_timeout:?}"),
                enforced_by: me.to_string(),
            })
        }
    }
    let req = wire::decode_body::<Request>(buf, me);
    release_large(buf);
    let req = req?;
    // Charged before the request runs, so its answer has room when it is ready. Requests
    // with large answers (fetches, metadata) have small frames, so what a stream holds while
    // it waits here is small.
    let more = answer_bound(&req).saturating_sub(SMALL_ANSWER_BYTES);
    if let (Some(b), Some(c), true) = (budget, charge.as_mut(), more > 0) {
        c.merge(b.charge(more, metrics).await);
    }
    Ok(Some((req, charge)))
}

/// Serves one stream: reads requests, runs them concurrently, answers in order.
async fn serve_stream<S: Service>(
    shared: Arc<Shared<S>>,
    peer: Peer,
    budget: Option<Budget>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let (service, frame_timeout) = (&shared.service, shared.limits.frame_timeout);
    let (tx, mut rx) = mpsc::channel::<Pending>(MAX_PIPELINED_PER_STREAM);
    let writer = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut charges = Vec::new();
        let mut next = None;
        loop {
            let (handle, charge) = match next.take() {
                Some(h) => h,
                None => match rx.recv().await {
                    Some(h) => h,
                    None => break,
                },
            };
            encode_response(handle.await, &mut out);
            charges.push(charge);
            // Coalesce answers that are already done into the same write.
            while out.len() < WRITE_COALESCE_BYTES {
                match rx.try_recv() {
                    Ok((h, c)) if h.is_finished() => {
                        encode_response(h.await, &mut out);
                        charges.push(c);
                    }
                    Ok(h) => {
                        next = Some(h);
                        break;
                    }
                    Err(_) => break,
                }
            }
            if send.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            release_large(&mut out);
            // Written: the budget they held is free again.
            charges.clear();
        }
        let _ = send.finish();
    });
    let me = service.describe();
    let metrics = service.metrics().clone();
    let mut buf = Vec::new();
    loop {
        match next_request(&mut recv, &mut buf, budget.as_ref(), &metrics, &peer, &me, frame_timeout).await {
            Ok(Some((req, charge))) => {
                let operation = request_name(&req);
                let fut = service.dispatch(req, &peer);
                let metrics = metrics.clone();
                let (shared, who) = (shared.clone(), peer.principal.clone());
                let counted = async move {
                    let resp = fut.await;
                    metrics.count(operation, &resp);
                    if let Response::Error(Error::NotAuthorized { operation: op, topic, .. }) = &resp {
                        // The audit trail of refusals (every one is in the request counter).
                        if let Some(held_back) = shared.refusal_log.allow() {
                            warn!(principal = %who, operation = %op, %topic, request = operation, held_back, "refused");
                        }
                    }
                    resp
                };
                if tx.send((tokio::spawn(counted.in_current_span()), charge)).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e @ (Error::Malformed { .. } | Error::FrameTooLarge { .. })) => {
                // Answer with the typed error, then close only this stream.
                debug!(peer = %peer.addr, error = %e, "bad frame; closing the stream");
                let _ = tx.send((tokio::spawn(ready(Response::Error(e))), None)).await;
                let _ = recv.stop(VarInt::from_u32(STREAM_BAD_FRAME));
                break;
            }
            Err(_) => break,
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn encode_response(joined: Result<Response, tokio::task::JoinError>, out: &mut Vec<u8>) {
    let resp =
        joined.unwrap_or_else(|e| Response::Error(Error::internal(format!("request handler failed: {e}"))));
    if let Err(e) = wire::encode_frame(&resp, out) {
        let _ = wire::encode_frame(&Response::Error(e), out);
    }
}
