//! Prometheus metrics for `--metrics-listen` (OpenMetrics text, encoded by
//! `prometheus-client`).
//!
//! Counters that requests and connections update as they happen live in [`EndpointMetrics`];
//! figures that are state (offsets, cursors, lag) are read when scraped, so the hot paths pay
//! nothing for them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::wire::Response;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    /// `ok`, or the error's kind (e.g. `not_leader`).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubscriptionLabels {
    pub topic: String,
    pub subscription: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub topic: String,
    pub replica: String,
}

/// What a QUIC endpoint counts as it serves: connections, handshakes, requests.
#[derive(Clone, Debug, Default)]
pub struct EndpointMetrics {
    pub open_connections: Gauge,
    /// Connections whose handshake succeeded, ever: a count that climbs with the traffic
    /// shows peers dialling again and again instead of keeping their connections.
    pub accepted_connections: Counter,
    pub handshake_failures: Counter,
    /// Connections refused at a connection limit, before their handshake.
    pub refused_connections: Counter,
    /// Bytes client connections hold now in frames being read and answers not yet sent.
    pub budget_bytes: Gauge,
    pub requests: Family<RequestLabels, Counter>,
}

impl EndpointMetrics {
    pub fn count(&self, operation: &'static str, response: &Response) {
        let result = match response {
            Response::Error(e) => e.kind(),
            _ => "ok",
        };
        self.requests.get_or_create(&RequestLabels { operation, result }).inc();
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "herald_open_connections",
            "QUIC connections open now",
            self.open_connections.clone(),
        );
        registry.register(
            "herald_accepted_connections",
            "QUIC connections accepted (handshake done) since the process started",
            self.accepted_connections.clone(),
        );
        registry.register(
            "herald_tls_handshake_failures",
            "Incoming connections whose QUIC/TLS handshake failed",
            self.handshake_failures.clone(),
        );
        registry.register(
            "herald_refused_connections",
            "Connections refused at a connection limit (--max-connections, --max-connections-per-ip)",
            self.refused_connections.clone(),
        );
        registry.register(
            "herald_budget_bytes",
            "Bytes client connections hold in frames being read and answers not yet sent",
            self.budget_bytes.clone(),
        );
        registry.register(
            "herald_requests",
            "Requests served, by operation and result",
            self.requests.clone(),
        );
    }
}

/// A new metric registered under `name`, returned for filling in at scrape time.
pub fn registered<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

/// Latency of a storage group commit (the write transaction and its fsync), in seconds.
pub fn commit_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Encodes `registry` as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String");
    out
}

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Largest request head the metrics endpoint reads.
const MAX_REQUEST_BYTES: usize = 8192;

/// Runs [`serve`] in the background (in the caller's span), logging if it fails.
pub fn spawn(addr: SocketAddr, render: Arc<dyn Fn() -> String + Send + Sync>, shutdown: CancellationToken) {
    tokio::spawn(
        async move {
            if let Err(e) = serve(addr, render, shutdown).await {
                tracing::error!(%addr, error = %e, "the metrics endpoint failed");
            }
        }
        .in_current_span(),
    );
}

/// Serves `GET /metrics` on `addr` (plain HTTP/1.1, one request per connection) with what
/// `render` returns, until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(listen = %listener.local_addr()?, "metrics endpoint ready (GET /metrics)");
    loop {
        let (mut conn, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let render = render.clone();
        tokio::spawn(async move {
            let answered = tokio::time::timeout(Duration::from_secs(5), async {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
                    let n = conn.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
                let (status, kind, body) = if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ") {
                    // Rendering reads storage: keep it off the async workers.
                    let body = tokio::task::spawn_blocking(move || render()).await.map_err(std::io::Error::other)?;
                    ("200 OK", CONTENT_TYPE, body)
                } else {
                    ("404 Not Found", "text/plain", "only GET /metrics is served here\n".to_string())
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(response.as_bytes()).await?;
                conn.shutdown().await
            })
            .await;
            if !matches!(answered, Ok(Ok(()))) {
                debug!(%peer, "metrics request failed or timed out");
            }
        });
    }
}
