//! QUIC endpoints, TLS, framed streams and the request loop.
//!
//! Connection model: a client opens one QUIC connection per server and keeps it. The first
//! bidirectional stream carries the version handshake; every later stream carries a sequence
//! of request frames and gets the responses back in the same order. Short admin calls open a
//! stream each (streams are cheap); producers and consumers keep one long-lived stream and
//! pipeline requests on it, so ordering (and the producer's sequence numbers) follows the
//! stream. The server handles each request of a stream concurrently and writes answers in
//! order, coalescing ready answers into one write.
//!
//! TLS: TLS 1.3 only, ring provider (FACTS.md: aws-lc-rs handshakes were 10x slower here),
//! ALPN [`ALPN`], both sides present a certificate from the cluster CA (see `certs`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::{Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::certs::{self, Identity};
use tracing::Instrument;

use crate::error::Error;
use crate::metrics::EndpointMetrics;
use crate::types::ServerId;
use crate::wire::{self, Request, Response, LENGTH_PREFIX, PROTOCOL_VERSION};

/// Application protocol name; the `1` is the wire protocol version.
pub const ALPN: &[u8] = b"herald/1";

/// Concurrent bidirectional streams a peer may open on one connection. Well above any
/// pipelining depth, so opening a stream never waits for credit (see FACTS.md traps).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Requests a server works on at once for one stream; the reader stops reading further frames
/// past this, which pushes back on the client through QUIC flow control.
pub const MAX_PIPELINED_PER_STREAM: usize = 256;

/// A connection with no traffic for this long is dead (keep-alives are sent well within it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Longest a dial (QUIC + TLS + version handshake) may take. A dead server does not answer
/// at all, so without this a dial would wait out the idle timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Responses are gathered up to this many bytes per write.
const WRITE_COALESCE_BYTES: usize = 256 * 1024;

/// Connection close codes.
pub mod close {
    /// Normal close by a client that is done.
    pub const DONE: u32 = 0;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 1;
    /// The peer broke the protocol (bad handshake).
    pub const PROTOCOL: u32 = 2;
}

/// Stream reset code used when a stream is closed because of a bad frame.
pub const STREAM_BAD_FRAME: u32 = 1;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(identity: &Identity) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca.clone()).context("adding the cluster CA to the trust store")?;
    Ok(Arc::new(roots))
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // Larger windows than the defaults so a pipelined producer is not flow-control bound.
    t.stream_receive_window(VarInt::from_u32(8 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(32 * 1024 * 1024);
    Arc::new(t)
}

/// Server-side QUIC config: our certificate, and a client certificate from the CA required.
pub fn server_config(identity: &Identity) -> anyhow::Result<quinn::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(identity)?, provider())
        .build()
        .context("building the client certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .context("loading the server certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// Client-side QUIC config: verify the server against the CA, present our certificate.
pub fn client_config(identity: &Identity) -> anyhow::Result<quinn::ClientConfig> {
    client_config_with_alpn(identity, ALPN)
}

/// As [`client_config`] with another ALPN; exists so tests can check that a wrong one fails.
pub fn client_config_with_alpn(identity: &Identity, alpn: &[u8]) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(identity)?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .context("loading the client certificate")?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// An endpoint that serves on `addr` and can also dial other servers (with the same identity).
///
/// The stateless-reset key is derived from the node key and the bound address rather than
/// drawn at random: a server restarted after `kill -9` then resets its old connections at
/// their next packet, and clients fail over at once instead of after the idle timeout.
pub fn server_endpoint(addr: SocketAddr, identity: &Identity) -> anyhow::Result<Endpoint> {
    let socket = std::net::UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
    let bound = socket.local_addr()?;
    let seed =
        [b"herald stateless reset\0".as_slice(), identity.key.secret_der(), bound.to_string().as_bytes()]
            .concat();
    let digest = ring::digest::digest(&ring::digest::SHA256, &seed);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, digest.as_ref());
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    let mut endpoint = Endpoint::new(
        quinn::EndpointConfig::new(Arc::new(reset_key)),
        Some(server_config(identity)?),
        socket,
        runtime,
    )?;
    endpoint.set_default_client_config(client_config(identity)?);
    Ok(endpoint)
}

/// A client-only endpoint, bound on the loopback or unspecified address matching `target`.
pub fn client_endpoint(target: SocketAddr, config: quinn::ClientConfig) -> anyhow::Result<Endpoint> {
    let bind: SocketAddr = match (target.is_ipv4(), target.ip().is_loopback()) {
        (true, true) => "127.0.0.1:0",
        (true, false) => "0.0.0.0:0",
        (false, true) => "[::1]:0",
        (false, false) => "[::]:0",
    }
    .parse()
    .expect("static address");
    let mut endpoint = Endpoint::client(bind).context("binding a UDP socket")?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Maps a QUIC connection failure to the error a caller acts on: a TLS failure is
/// `Unauthorized` (retrying will not help), anything else `Unavailable` (retry elsewhere).
pub fn connection_error(addr: SocketAddr, err: &quinn::ConnectionError) -> Error {
    let tls_code = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match err {
        quinn::ConnectionError::TransportError(e) if tls_code(e.code) => {
            let text = e.to_string();
            // The peer's certificate is not signed by our CA: two clusters' certificates.
            let why = if text.contains("BadSignature") || text.contains("UnknownIssuer") {
                "; its certificate is not from the CA in use here, so these certificates belong to another cluster: point --certs / HERALD_CERTS at this cluster's certs directory"
            } else {
                ""
            };
            Error::Unauthorized { detail: format!("TLS handshake with {addr} failed: {e}{why}") }
        }
        quinn::ConnectionError::ConnectionClosed(c) if tls_code(c.error_code) => Error::Unauthorized {
            detail: format!(
                "{addr} refused the TLS handshake ({c}); is the certificate from the cluster CA and the protocol herald/1?"
            ),
        },
        other => Error::Unavailable { detail: format!("connection to {addr}: {other}") },
    }
}

fn read_error(addr: SocketAddr, err: quinn::ReadError) -> Error {
    match err {
        quinn::ReadError::ConnectionLost(e) => connection_error(addr, &e),
        other => Error::Unavailable { detail: format!("stream from {addr}: {other}") },
    }
}

fn write_error(addr: SocketAddr, err: quinn::WriteError) -> Error {
    match err {
        quinn::WriteError::ConnectionLost(e) => connection_error(addr, &e),
        other => Error::Unavailable { detail: format!("stream to {addr}: {other}") },
    }
}

/// Reads one frame: `Ok(None)` at a clean end of stream (between frames).
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    buf: &mut Vec<u8>,
    peer: SocketAddr,
    enforced_by: &str,
) -> Result<Option<T>, Error> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(Error::Malformed {
                detail: format!("stream ended {n} bytes into a frame's length prefix"),
                enforced_by: enforced_by.into(),
            })
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(peer, e)),
    }
    let len = wire::frame_length(prefix, enforced_by)?;
    buf.clear();
    buf.resize(len, 0);
    match recv.read_exact(buf).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(Error::Malformed {
                detail: format!("stream ended {n} bytes into a {len}-byte frame"),
                enforced_by: enforced_by.into(),
            })
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(peer, e)),
    }
    wire::decode_body(buf, enforced_by).map(Some)
}

/// The writing half of a client stream: requests are queued, then flushed in one write.
pub struct FrameWriter {
    send: SendStream,
    peer: SocketAddr,
    out: Vec<u8>,
}

impl FrameWriter {
    /// Encodes `req` into the outgoing buffer; [`flush`](Self::flush) sends it.
    pub fn queue(&mut self, req: &Request) -> Result<(), Error> {
        wire::encode_frame(req, &mut self.out)
    }

    /// Writes everything queued in one go.
    pub async fn flush(&mut self) -> Result<(), Error> {
        if self.out.is_empty() {
            return Ok(());
        }
        let res = self.send.write_all(&self.out).await;
        self.out.clear();
        res.map_err(|e| write_error(self.peer, e))
    }

    /// Tells the server no more requests come on this stream.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }

    /// The server at the other end.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

/// The reading half of a client stream.
pub struct FrameReader {
    recv: RecvStream,
    peer: SocketAddr,
    buf: Vec<u8>,
}

impl FrameReader {
    /// Reads the next response; a server-side error comes back as `Err`. Not cancel safe:
    /// keep the call running (in its own task) rather than racing it in a `select!`.
    pub async fn recv(&mut self) -> Result<Response, Error> {
        let enforced_by = format!("the client (reading from {})", self.peer);
        match read_frame::<Response>(&mut self.recv, &mut self.buf, self.peer, &enforced_by).await? {
            Some(resp) => resp.into_result(),
            None => Err(Error::Unavailable { detail: format!("{} closed the stream", self.peer) }),
        }
    }
}

/// The client half of a bidirectional stream: requests out, responses in, in order.
pub struct FramedStream {
    writer: FrameWriter,
    reader: FrameReader,
}

impl FramedStream {
    pub fn queue(&mut self, req: &Request) -> Result<(), Error> {
        self.writer.queue(req)
    }

    pub async fn flush(&mut self) -> Result<(), Error> {
        self.writer.flush().await
    }

    pub async fn send(&mut self, req: &Request) -> Result<(), Error> {
        self.queue(req)?;
        self.flush().await
    }

    pub async fn recv(&mut self) -> Result<Response, Error> {
        self.reader.recv().await
    }

    pub async fn call(&mut self, req: &Request) -> Result<Response, Error> {
        self.send(req).await?;
        self.recv().await
    }

    pub fn finish(&mut self) {
        self.writer.finish();
    }

    pub fn peer(&self) -> SocketAddr {
        self.writer.peer
    }

    /// Splits into halves, so a pipelining client can read answers in one task while it
    /// writes requests in another.
    pub fn split(self) -> (FrameWriter, FrameReader) {
        (self.writer, self.reader)
    }
}

/// A handshaken connection to a Herald server.
#[derive(Clone)]
pub struct Connection {
    conn: quinn::Connection,
    addr: SocketAddr,
    server: Option<ServerId>,
}

impl Connection {
    /// Dials `addr`, completes TLS and the version handshake, within [`CONNECT_TIMEOUT`].
    pub async fn connect(endpoint: &Endpoint, addr: SocketAddr) -> Result<Self, Error> {
        match tokio::time::timeout(CONNECT_TIMEOUT, Self::dial(endpoint, addr)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable {
                detail: format!("no answer from {addr} within {CONNECT_TIMEOUT:?}"),
            }),
        }
    }

    async fn dial(endpoint: &Endpoint, addr: SocketAddr) -> Result<Self, Error> {
        let server_name = addr.ip().to_string();
        let connecting = endpoint
            .connect(addr, &server_name)
            .map_err(|e| Error::Unavailable { detail: format!("connecting to {addr}: {e}") })?;
        let conn = connecting.await.map_err(|e| connection_error(addr, &e))?;
        let mut me = Self { conn, addr, server: None };
        let mut stream = me.open().await?;
        let resp = stream
            .call(&Request::Hello {
                min_version: PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                agent: format!("herald/{}", env!("CARGO_PKG_VERSION")),
            })
            .await?;
        match resp {
            Response::Hello { server, .. } => me.server = server,
            other => return Err(Error::internal(format!("unexpected handshake answer {other:?}"))),
        }
        stream.finish();
        Ok(me)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server id the peer announced in the handshake (topic servers only).
    pub fn server_id(&self) -> Option<ServerId> {
        self.server
    }

    /// Whether the connection is gone (then make a new one).
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Opens a stream for a pipelined conversation.
    pub async fn open(&self) -> Result<FramedStream, Error> {
        let (send, recv) = self.conn.open_bi().await.map_err(|e| connection_error(self.addr, &e))?;
        Ok(FramedStream {
            writer: FrameWriter { send, peer: self.addr, out: Vec::new() },
            reader: FrameReader { recv, peer: self.addr, buf: Vec::new() },
        })
    }

    /// One request on a fresh stream.
    pub async fn call(&self, req: &Request) -> Result<Response, Error> {
        let mut stream = self.open().await?;
        let resp = stream.call(req).await;
        stream.finish();
        resp
    }

    pub fn close(&self) {
        self.conn.close(VarInt::from_u32(close::DONE), b"done");
    }

    /// The underlying QUIC connection, for tools and tests that speak the protocol by hand.
    pub fn raw(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// Connections to servers, one per address, made on first use and remade once closed.
/// Clients use one for topic servers; topic servers use one for each other.
pub struct Pool {
    endpoint: Endpoint,
    conns: tokio::sync::Mutex<std::collections::HashMap<SocketAddr, Connection>>,
}

impl Pool {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint, conns: tokio::sync::Mutex::new(std::collections::HashMap::new()) }
    }

    /// The open connection to `addr`, or a new one.
    pub async fn get(&self, addr: SocketAddr) -> Result<Connection, Error> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&addr).filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let conn = Connection::connect(&self.endpoint, addr).await?;
        conns.insert(addr, conn.clone());
        Ok(conn)
    }

    /// Drops the connection to `addr` (it failed); the next `get` dials again.
    pub async fn forget(&self, addr: SocketAddr) {
        self.conns.lock().await.remove(&addr);
    }

    /// Closes every connection.
    pub async fn close_all(&self) {
        for (_, c) in self.conns.lock().await.drain() {
            c.close();
        }
    }
}

/// What a server knows about the peer of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The peer presented the cluster's node certificate (it is a Herald server).
    pub is_node: bool,
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

/// Accepts connections on `endpoint` until `shutdown`, serving each with `service`.
pub async fn serve<S: Service>(endpoint: Endpoint, service: Arc<S>, shutdown: CancellationToken) {
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let service = service.clone();
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("connection", peer = %incoming.remote_address());
        tasks.spawn(
            async move {
                let addr = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => {
                        let metrics = service.metrics().clone();
                        metrics.open_connections.inc();
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = serve_connection(conn, service) => {}
                        }
                        metrics.open_connections.dec();
                    }
                    Err(e) => {
                        service.metrics().handshake_failures.inc();
                        warn!(peer = %addr, error = %e, "TLS handshake failed");
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

fn peer_is_node(conn: &quinn::Connection) -> bool {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(certs::common_name))
        .is_some_and(|cn| cn == certs::NODE_COMMON_NAME)
}

async fn serve_connection<S: Service>(conn: quinn::Connection, service: Arc<S>) {
    let peer = Peer { addr: conn.remote_address(), is_node: peer_is_node(&conn) };
    let me = service.describe();
    // The first stream is the version handshake.
    let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
    let mut buf = Vec::new();
    let answer = match read_frame::<Request>(&mut recv, &mut buf, peer.addr, &me).await {
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
    if !ok {
        let _ = send.stopped().await;
        conn.close(VarInt::from_u32(close::PROTOCOL), b"handshake failed");
        return;
    }
    debug!(peer = %peer.addr, node = peer.is_node, "connection ready");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(service.clone(), peer.clone(), send, recv).in_current_span());
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
    }
}

/// Serves one stream: reads requests, runs them concurrently, answers in order.
async fn serve_stream<S: Service>(service: Arc<S>, peer: Peer, mut send: SendStream, mut recv: RecvStream) {
    let (tx, mut rx) = mpsc::channel::<JoinHandle<Response>>(MAX_PIPELINED_PER_STREAM);
    let writer = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut next = None;
        loop {
            let handle = match next.take() {
                Some(h) => h,
                None => match rx.recv().await {
                    Some(h) => h,
                    None => break,
                },
            };
            encode_response(handle.await, &mut out);
            // Coalesce answers that are already done into the same write.
            while out.len() < WRITE_COALESCE_BYTES {
                match rx.try_recv() {
                    Ok(h) if h.is_finished() => encode_response(h.await, &mut out),
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
        }
        let _ = send.finish();
    });
    let me = service.describe();
    let mut buf = Vec::new();
    loop {
        match read_frame::<Request>(&mut recv, &mut buf, peer.addr, &me).await {
            Ok(Some(req)) => {
                let operation = request_name(&req);
                let fut = service.dispatch(req, &peer);
                let metrics = service.metrics().clone();
                let counted = async move {
                    let resp = fut.await;
                    metrics.count(operation, &resp);
                    resp
                };
                if tx.send(tokio::spawn(counted.in_current_span())).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e @ (Error::Malformed { .. } | Error::FrameTooLarge { .. })) => {
                // Answer with the typed error, then close only this stream.
                debug!(peer = %peer.addr, error = %e, "bad frame; closing the stream");
                let _ = tx.send(tokio::spawn(ready(Response::Error(e)))).await;
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
