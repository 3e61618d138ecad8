//! `herald dev`: a whole cluster on loopback in one process, for trying Herald out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::client::Client;
use crate::naming::NamingConfig;
use crate::server::ServerConfig;
use crate::storage::Medium;
use crate::types::{NamingAddrs, ServerId};
use crate::{certs, naming, server};

use super::{shutdown_on_signal, usage, Common, DEFAULT_CERTS, DEFAULT_NAMING, DEV_NAMING_PORT_STEP};

/// The addresses of `herald dev`'s naming members, from the first --naming address.
fn dev_naming_addrs(first: SocketAddr, members: u16) -> Vec<SocketAddr> {
    (0..members).map(|i| SocketAddr::new(first.ip(), first.port() + i * DEV_NAMING_PORT_STEP)).collect()
}

/// Checks that `herald dev` can have its ports and data directory before it starts anything:
/// a second dev cluster must fail at once and say why, not print a banner for the first one.
fn dev_preflight(dir: &Path, naming: &[SocketAddr], servers: u16) -> Result<()> {
    let first = naming[0];
    let topic_servers = (1..=servers).map(|i| SocketAddr::new(first.ip(), first.port() + i));
    for addr in naming.iter().copied().chain(topic_servers) {
        if let Err(e) = std::net::UdpSocket::bind(addr) {
            bail!("cannot listen on {addr} ({e}): is another `herald dev` running? Stop it, or give this one other ports with --naming HOST:PORT");
        }
    }
    let files = (1..=naming.len())
        .map(|i| dir.join(format!("naming-{i}")).join(naming::BOOK_FILE))
        .chain((1..=servers).map(|i| dir.join(format!("server-{i}")).join("herald.redb")));
    for file in files.filter(|f| f.exists()) {
        if let Err(redb::DatabaseError::DatabaseAlreadyOpen) = redb::Database::open(&file) {
            bail!(
                "{} is in use by another herald process (another `herald dev`?): stop it, or give this one another --dir",
                file.display()
            );
        }
    }
    Ok(())
}

/// `herald dev`: a naming group of `naming_servers` members and `servers` topic servers on
/// loopback, in this process.
pub(super) async fn dev(common: &Common, servers: u16, naming_servers: u16, dir: &Path) -> Result<ExitCode> {
    if servers == 0 || servers >= DEV_NAMING_PORT_STEP {
        return Err(usage(format!("--servers must be 1..={}", DEV_NAMING_PORT_STEP - 1)));
    }
    let made = !certs::exist(&common.certs);
    certs::ensure_dev(&common.certs, servers)
        .with_context(|| format!("making certificates in {}", common.certs.display()))?;
    if made {
        eprintln!("made certificates in {}", common.certs.display());
    }
    let first = common.naming.first();
    let naming_addrs = dev_naming_addrs(first, naming_servers);
    dev_preflight(dir, &naming_addrs, servers)?;
    let naming_list = NamingAddrs::new(naming_addrs.clone()).context("--naming-servers is at least 1")?;
    let shutdown = shutdown_on_signal();
    let mut tasks = tokio::task::JoinSet::new();
    let peers: BTreeMap<u64, SocketAddr> = (1..).zip(naming_addrs.iter().copied()).collect();
    for (&id, &listen) in &peers {
        let naming_config = NamingConfig {
            id,
            peers: peers.clone(),
            ..NamingConfig::alone(listen, dir.join(format!("naming-{id}")), common.certs.clone())
        };
        tasks.spawn(naming::run(naming_config, shutdown.clone()));
    }
    for i in 1..=servers {
        let listen = SocketAddr::new(first.ip(), first.port() + i);
        let config = ServerConfig {
            id: Some(i as ServerId),
            listen,
            advertise: None,
            naming: naming_list.clone(),
            data_dir: dir.join(format!("server-{i}")),
            certs_dir: common.certs.clone(),
            session_lease: server::DEFAULT_SESSION_LEASE,
            metrics_listen: None,
            medium: Medium::File,
            limits: Default::default(),
        };
        tasks.spawn(server::run(config, shutdown.clone()));
    }
    // Wait until every server has registered, so the printed commands work right away.
    let client = Client::new(naming_list.clone(), &common.certs)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alive = client.list_servers().await.map(|s| s.iter().filter(|s| s.alive).count()).unwrap_or(0);
        if alive >= servers as usize {
            break;
        }
        if Instant::now() > deadline || shutdown.is_cancelled() {
            bail!("the dev cluster did not come up: {alive} of {servers} servers registered");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            Some(r) = tasks.join_next() => { r??; bail!("a dev cluster process stopped early"); }
        }
    }
    client.close().await;
    let last = first.port() + servers;
    eprintln!(
        "Herald dev cluster: naming {} {naming_list}, topic servers {}:{}-{last}; data in {}, certificates in {}",
        if naming_servers == 1 { "server" } else { "group" },
        first.ip(),
        first.port() + 1,
        dir.display(),
        common.certs.display()
    );
    eprintln!("Try, in another terminal (with ./target/release on your PATH):");
    if naming_list.to_string() != DEFAULT_NAMING.parse::<NamingAddrs>().map_err(|e| anyhow!(e))?.to_string() {
        eprintln!("  export HERALD_NAMING={naming_list}");
    }
    if common.certs != Path::new(DEFAULT_CERTS) {
        let certs = std::fs::canonicalize(&common.certs).unwrap_or_else(|_| common.certs.clone());
        eprintln!("  export HERALD_CERTS={}", certs.display());
    }
    eprintln!("  herald topic create demo");
    eprintln!("  seq 1 100000 | herald produce demo");
    eprintln!("  herald consume demo --subscription s1 --count 100000");
    let certs = std::fs::canonicalize(&common.certs).unwrap_or_else(|_| common.certs.clone());
    eprintln!(
        "To use it from any directory: herald context add dev --naming {naming_list} --certs {} --use",
        certs.display()
    );
    eprintln!("Ctrl-C stops the cluster.");
    let mut failure = None;
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) | Err(e) = r.map_err(anyhow::Error::from) {
            failure.get_or_insert(e);
            shutdown.cancel();
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    eprintln!("dev cluster stopped");
    Ok(ExitCode::SUCCESS)
}
