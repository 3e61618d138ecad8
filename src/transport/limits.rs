//! What one peer may hold of a server: connections, streams, and bytes of frames being read
//! and answers not yet sent. Every limit is here with its reason; `herald server` and
//! `herald naming` take flags for the ones an operator sizes to the machine.
//!
//! Memory a client can make a server hold is bounded by construction: a frame's buffer grows
//! only as its bytes arrive, a request is charged its frame and the largest answer it can get
//! before it is read on, and the charge is returned once its answer is written. A peer that
//! does not read its answers stalls its own connection, nobody else's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::EndpointMetrics;
use crate::wire::{Request, LENGTH_PREFIX, RECORDS_ANSWER_OVERHEAD};

/// Connections a server keeps at once. Each costs a task, QUIC state and up to
/// [`CONNECTION_BUDGET`] of frames; 4,096 leaves room above the thousand clients a cluster
/// is sized for.
pub const MAX_CONNECTIONS: usize = 4096;

/// Connections one IP address may keep at once, so one host cannot take every slot. High,
/// because tests, benchmarks and NAT gateways put many honest clients behind one address.
pub const MAX_CONNECTIONS_PER_IP: usize = 1024;

/// Bytes of frames being read and answers not yet sent that one client connection may hold.
/// Fits the largest fetch answer (a frame) four times over, and 64 long-polling consumers
/// (`client::FETCH_BYTES` each).
pub const CONNECTION_BUDGET: usize = 64 * 1024 * 1024;

/// The same, summed over every client connection of a server: the most memory clients can
/// make it hold in frames, whatever their number.
pub const SERVER_BUDGET: usize = 1024 * 1024 * 1024;

/// Concurrent streams a client may open on one connection: above our clients' pipelining
/// (one long-lived stream per producer and consumer, plus a stream per admin call and up to
/// 32 acks sent ahead), so opening a stream never waits for credit (FACTS.md), yet small
/// enough that half-open streams cannot pile up.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// Concurrent streams between two servers: replication keeps one long-polling stream per
/// topic the pair shares, and a server pair may share every topic of the cluster (one server
/// leading all of them after failovers), so this covers
/// [`MAX_TOPICS`](crate::naming::core::MAX_TOPICS) plus [`NODE_CALL_STREAMS`] for the
/// pair's other requests. With fewer, the topics past the limit did not replicate at all
/// (their fetch streams waited for credit that never came) and `FollowerAlive` waited with
/// them. quinn keeps state for every stream a peer may open: about 0.5 KB each, ~5.5 MB per
/// server connection at this limit (65,536 took a dev cluster from 31 MB to 240 MB). Node
/// peers carry the cluster's node certificate and are not budgeted.
pub const NODE_MAX_STREAMS: u32 = crate::naming::core::MAX_TOPICS as u32 + NODE_CALL_STREAMS;

/// Streams between two servers for requests other than replication fetches
/// (`FollowerAlive`, elections' promises, catch-up reads) on top of one per shared topic.
pub const NODE_CALL_STREAMS: u32 = 1024;

/// Requests a server works on at once for one stream: our producer pipelines up to 64
/// batches (`client::MAX_INFLIGHT`); past this the reader stops, which pushes back on the
/// client through QUIC flow control.
pub const MAX_PIPELINED_PER_STREAM: usize = 128;

/// Longest a frame may take to arrive once its length did. 16 MiB at 1 MB/s takes 16 s; a
/// peer slower than that is holding memory, not sending.
pub const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// A client connection with no stream open for this long is closed (keep-alives would hold
/// it forever); our clients dial again on their next request.
pub const IDLE_CONNECTION_LIMIT: Duration = Duration::from_secs(300);

/// What an answer to most requests may take: an ack, a cursor, an error.
pub const SMALL_ANSWER_BYTES: usize = 4 * 1024;

/// What a metadata answer may take (a topic's status with its subscriptions, a page of
/// topics, the server list); the naming book's own limits keep them below it.
pub const METADATA_ANSWER_BYTES: usize = 1024 * 1024;

/// What one topic's entry may take: its schema at most and room for the rest (a replica
/// set of at most 16, learners, the limits).
pub const TOPIC_ANSWER_BYTES: usize = crate::naming::core::MAX_SCHEMA_BYTES + 16 * 1024;

/// Failed handshakes are logged at most once per this interval, with a count of those not
/// logged: anyone who can reach the port can cause them.
pub const HANDSHAKE_LOG_EVERY: Duration = Duration::from_secs(10);

/// At most one WARN line per this long for refused requests (`NotAuthorized`), with how many
/// were held back: a client retrying a refused request must not flood the log. Every refusal
/// is counted in `herald_requests_total{result="not_authorized"}`.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_millis(100);

/// The limits an operator may size to the machine, as `herald server` and `herald naming`
/// flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Connections served at once; more are refused before their handshake.
    #[arg(long, default_value_t = MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Connections one IP address may keep at once.
    #[arg(long, default_value_t = MAX_CONNECTIONS_PER_IP)]
    pub max_connections_per_ip: usize,
    /// MiB of frames being read and answers not yet sent one client connection may hold
    /// (at least 17: a whole frame and its answer).
    #[arg(long, default_value_t = (CONNECTION_BUDGET >> 20) as u64, value_parser = clap::value_parser!(u64).range(17..=4096))]
    pub connection_budget_mib: u64,
    /// MiB of the same, over every client connection together.
    #[arg(long, default_value_t = (SERVER_BUDGET >> 20) as u64, value_parser = clap::value_parser!(u64).range(17..=1 << 20))]
    pub server_budget_mib: u64,
    /// Seconds a client connection may stay open with no stream before it is closed.
    #[arg(long, default_value_t = IDLE_CONNECTION_LIMIT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_connection_secs: u64,
    /// Seconds a frame's body may take to arrive once its length did.
    #[arg(long, default_value_t = FRAME_BODY_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub frame_timeout_secs: u64,
}

impl From<&LimitArgs> for Limits {
    fn from(a: &LimitArgs) -> Self {
        Self {
            max_connections: a.max_connections,
            max_connections_per_ip: a.max_connections_per_ip,
            connection_budget: (a.connection_budget_mib << 20) as usize,
            server_budget: (a.server_budget_mib << 20) as usize,
            idle_connection: Duration::from_secs(a.idle_connection_secs),
            frame_timeout: Duration::from_secs(a.frame_timeout_secs),
        }
    }
}

/// The limits one server applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub connection_budget: usize,
    pub server_budget: usize,
    pub idle_connection: Duration,
    pub frame_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            max_connections_per_ip: MAX_CONNECTIONS_PER_IP,
            connection_budget: CONNECTION_BUDGET,
            server_budget: SERVER_BUDGET,
            idle_connection: IDLE_CONNECTION_LIMIT,
            frame_timeout: FRAME_BODY_TIMEOUT,
        }
    }
}

/// The most a request's answer can take, charged before the request is read on. A fetch's
/// answer is at most its `max_bytes` of records (the store stops before it) and framing.
pub fn answer_bound(req: &Request) -> usize {
    match req {
        Request::Fetch { max_bytes, .. } => {
            let records = (*max_bytes).clamp(1, crate::server::MAX_FETCH_BYTES) as usize;
            records + RECORDS_ANSWER_OVERHEAD + LENGTH_PREFIX
        }
        // The whole book (or every grant) fits in a frame (`naming::core::MAX_TOPICS`,
        // `acl::MAX_GRANTS`), and is asked for rarely.
        Request::ListTopics | Request::ChangeAcl { .. } | Request::ListGrants => {
            crate::wire::MAX_FRAME_BYTES + LENGTH_PREFIX
        }
        Request::TopicStatus { .. } | Request::ListServers | Request::ListTopicsPage { .. } => {
            METADATA_ANSWER_BYTES
        }
        // One topic's entry; a thousand clients waiting for new leaders hold 80 MB, not the
        // server's whole budget.
        Request::LookupTopic { .. } | Request::AwaitLeader { .. } => TOPIC_ANSWER_BYTES,
        _ => SMALL_ANSWER_BYTES,
    }
}

/// Bytes of memory a connection may hold, and the server's total they are also drawn from.
#[derive(Clone)]
pub struct Budget {
    connection: Arc<Semaphore>,
    server: Arc<Semaphore>,
}

/// A charge against a [`Budget`], returned when dropped (once the answer is written).
pub struct Charge {
    permits: Vec<OwnedSemaphorePermit>,
    bytes: i64,
    gauge: Gauge,
}

impl Charge {
    /// Adds `other` (from the same budget) to this charge.
    pub fn merge(&mut self, mut other: Charge) {
        self.permits.append(&mut other.permits);
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.gauge.dec_by(self.bytes);
    }
}

impl Budget {
    /// A new connection's budget, drawing on `server`'s total.
    pub fn new(bytes: usize, server: Arc<Semaphore>) -> Self {
        Self { connection: Arc::new(Semaphore::new(bytes)), server }
    }

    /// Waits until `bytes` are free on both the connection and the server, and takes them.
    /// Callers never ask for more than a frame and an answer, both below a connection's
    /// whole budget.
    pub async fn charge(&self, bytes: usize, metrics: &EndpointMetrics) -> Charge {
        let n = u32::try_from(bytes).unwrap_or(u32::MAX);
        // Connection first, then server: always in this order, so no two waiters hold what
        // the other needs.
        let connection = self.connection.clone().acquire_many_owned(n).await.expect("never closed");
        let server = self.server.clone().acquire_many_owned(n).await.expect("never closed");
        metrics.budget_bytes.inc_by(n as i64);
        Charge { permits: vec![connection, server], bytes: n as i64, gauge: metrics.budget_bytes.clone() }
    }

    /// Bytes the connection holds now, of its whole `budget`.
    pub fn held(&self, budget: usize) -> usize {
        budget.saturating_sub(self.connection.available_permits())
    }
}

/// Counts open connections, in total and per IP address.
#[derive(Default)]
pub struct ConnectionCount {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; uncounted when dropped.
pub struct ConnectionSlot {
    count: Arc<ConnectionCount>,
    ip: IpAddr,
}

impl ConnectionCount {
    /// Takes a slot for a connection from `ip`, or says which limit refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Result<ConnectionSlot, &'static str> {
        let mut per_ip = self.per_ip.lock().expect("connection count lock");
        let total: usize = per_ip.values().sum();
        if total >= limits.max_connections {
            return Err("the server's connection limit");
        }
        let mine = per_ip.entry(ip).or_default();
        if *mine >= limits.max_connections_per_ip {
            return Err("the per-address connection limit");
        }
        *mine += 1;
        Ok(ConnectionSlot { count: self.clone(), ip })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut per_ip = self.count.per_ip.lock().expect("connection count lock");
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Lets one log line through per interval and counts the ones held back.
pub struct LogLimiter {
    every_ms: u64,
    next_ms: AtomicU64,
    held_back: AtomicU64,
}

impl LogLimiter {
    pub fn new(every: Duration) -> Self {
        Self { every_ms: every.as_millis() as u64, next_ms: AtomicU64::new(0), held_back: AtomicU64::new(0) }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let now = crate::types::mono_ms();
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + self.every_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_total_and_per_address() {
        let count = Arc::new(ConnectionCount::default());
        let limits = Limits { max_connections: 3, max_connections_per_ip: 2, ..Limits::default() };
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = count.admit(a, &limits).unwrap();
        let _a2 = count.admit(a, &limits).unwrap();
        assert_eq!(count.admit(a, &limits).err(), Some("the per-address connection limit"));
        let _b1 = count.admit(b, &limits).unwrap();
        assert_eq!(count.admit(b, &limits).err(), Some("the server's connection limit"));
        drop(a1);
        assert!(count.admit(b, &limits).is_ok(), "a closed connection frees its slot");
    }

    #[tokio::test]
    async fn a_charge_waits_for_room_and_is_returned_when_dropped() {
        let server = Arc::new(Semaphore::new(1000));
        let budget = Budget::new(100, server.clone());
        let metrics = EndpointMetrics::default();
        let first = budget.charge(80, &metrics).await;
        assert_eq!(budget.held(100), 80);
        let waiting = tokio::spawn({
            let (budget, metrics) = (budget.clone(), metrics.clone());
            async move { budget.charge(40, &metrics).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "over the connection's budget: waits");
        drop(first);
        let mut second = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
        assert_eq!(budget.held(100), 40);
        assert_eq!(server.available_permits(), 960, "drawn from the server's total too");
        second.merge(budget.charge(10, &metrics).await);
        assert_eq!(metrics.budget_bytes.get(), 50);
        drop(second);
        assert_eq!((budget.held(100), metrics.budget_bytes.get()), (0, 0), "a merged charge returns all");
    }

    #[test]
    fn the_log_limiter_lets_one_line_through_per_interval() {
        let limiter = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
    }
}
