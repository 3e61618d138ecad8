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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::{Endpoint, RecvStream, SendStream, VarInt};
use rustls::RootCertStore;
use serde::de::DeserializeOwned;

use crate::certs::Identity;

use crate::error::Error;
use crate::types::ServerId;
use crate::wire::{self, Request, Response, LENGTH_PREFIX, PROTOCOL_VERSION};

pub mod limits;
mod serve;

pub use limits::{Limits, MAX_PIPELINED_PER_STREAM, MAX_STREAMS_PER_CONNECTION};
pub use serve::{ready, request_name, serve, Peer, ResponseFuture, Service};

/// Application protocol name; the `1` is the wire protocol version.
pub const ALPN: &[u8] = b"herald/1";

/// A connection with no traffic for this long is dead (keep-alives are sent well within it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Longest a dial (QUIC + TLS + version handshake) may take. A dead server does not answer
/// at all, so without this a dial would wait out the idle timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connection close codes.
pub mod close {
    /// Normal close by a client that is done.
    pub const DONE: u32 = 0;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 1;
    /// The peer broke the protocol (bad handshake).
    pub const PROTOCOL: u32 = 2;
    /// The connection had no stream open for `limits::IDLE_CONNECTION_LIMIT`.
    pub const IDLE: u32 = 3;
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
    // Raised per connection for servers (`limits::NODE_MAX_STREAMS`).
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
    let Some(len) = read_length(recv, peer, enforced_by).await? else { return Ok(None) };
    read_body(recv, buf, len, peer, enforced_by).await?;
    let msg = wire::decode_body(buf, enforced_by);
    release_large(buf);
    msg.map(Some)
}

/// Reads and checks a frame's length prefix: `Ok(None)` at a clean end of stream.
pub async fn read_length(
    recv: &mut RecvStream,
    peer: SocketAddr,
    enforced_by: &str,
) -> Result<Option<usize>, Error> {
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
    wire::frame_length(prefix, enforced_by).map(Some)
}

/// Reads a `len`-byte frame body into `buf`. The buffer grows as bytes arrive, never ahead of
/// them: a length prefix alone reserves nothing.
pub async fn read_body(
    recv: &mut RecvStream,
    buf: &mut Vec<u8>,
    len: usize,
    peer: SocketAddr,
    enforced_by: &str,
) -> Result<(), Error> {
    buf.clear();
    while buf.len() < len {
        match recv.read_chunk(len - buf.len(), true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(Error::Malformed {
                    detail: format!("stream ended {} bytes into a {len}-byte frame", buf.len()),
                    enforced_by: enforced_by.into(),
                })
            }
            Err(e) => return Err(read_error(peer, e)),
        }
    }
    Ok(())
}

/// A frame buffer kept between frames of a stream is kept small: a large one is given back
/// once its frame is decoded (a long-lived stream must not pin its largest frame).
const KEEP_BUFFER_BYTES: usize = 64 * 1024;

pub fn release_large(buf: &mut Vec<u8>) {
    if buf.capacity() > KEEP_BUFFER_BYTES {
        *buf = Vec::new();
    }
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
/// Clients use one for topic servers; topic servers use one for each other; the naming
/// server one for the topic servers it asks for promises.
pub struct Pool {
    endpoint: Endpoint,
    /// Each address's connection, or the dial under way: callers wanting the same address
    /// share one dial, and a slow dial (a dead address waits out the connect timeout) holds
    /// up only the callers of that address.
    conns: std::sync::Mutex<std::collections::HashMap<SocketAddr, Arc<tokio::sync::OnceCell<Connection>>>>,
}

impl Pool {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint, conns: std::sync::Mutex::default() }
    }

    /// The open connection to `addr`, or a new one.
    pub async fn get(&self, addr: SocketAddr) -> Result<Connection, Error> {
        let cell = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            let cell = conns.entry(addr).or_default();
            if cell.get().is_some_and(|c| c.is_closed()) {
                *cell = Arc::default();
            }
            cell.clone()
        };
        cell.get_or_try_init(|| Connection::connect(&self.endpoint, addr)).await.cloned()
    }

    /// Drops the connection to `addr` (it failed); the next `get` dials again.
    pub async fn forget(&self, addr: SocketAddr) {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
    }

    /// Closes every connection.
    pub async fn close_all(&self) {
        let conns: Vec<_> = self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
        for (_, cell) in conns {
            if let Some(c) = cell.get() {
                c.close();
            }
        }
    }
}
