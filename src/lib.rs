//! Herald: a replicated, durable publish/subscribe log over QUIC and TLS.
//!
//! Layers, from the bytes up: [`wire`] (frames and messages), [`transport`] (QUIC, TLS,
//! request loop), [`storage`] (redb: records, cursors, producer state; group commit),
//! [`naming`] (the book of servers and topics), [`server`] (a topic server), [`client`]
//! (producer, consumer, admin) and [`cli`] (the `herald` command).

pub mod acl;
pub mod bench;
pub mod certs;
pub mod cli;
// The library's face to applications: every public item documented.
#[warn(missing_docs)]
pub mod client;
pub mod error;
pub mod files;
pub mod metrics;
pub mod naming;
pub mod policy;
pub mod replica;
pub mod replication;
pub mod server;
pub mod sim;
pub mod storage;
pub mod transport;
#[warn(missing_docs)]
pub mod types;
pub mod wire;

pub use error::Error;
