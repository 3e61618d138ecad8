//! Test harness: a Herald cluster of real processes on 127.0.0.1.
//!
//! Each test gets its own temp dir (certificates, data, logs) and its own ports, so tests run
//! in parallel. Processes are killed (SIGKILL) when the cluster is dropped; if the test is
//! failing, the tail of every process log is printed first. Waiting is always on a
//! condition with a generous deadline, never a fixed sleep.

#![allow(dead_code)]

pub mod history;
pub mod proxy;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::client::Client;
use herald::types::{ServerId, TopicName};

pub const BIN: &str = env!("CARGO_BIN_EXE_herald");

/// Liveness lease of the test clusters' naming servers: short, so failovers are quick.
pub const LEASE_MS: u64 = 1500;

/// How long a replica may be dead before the test clusters' naming servers replace it.
pub const REPLACE_AFTER_MS: u64 = 3000;

/// Consumer session lease of the test servers (short, so a takeover test need not wait long).
pub const SESSION_LEASE_MS: u64 = 3000;

/// Generous deadline for conditions on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Picks a free UDP port on 127.0.0.1, below the ephemeral range so clients' own sockets
/// never take it, spread by process id so concurrently running test binaries do not collide.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 12000 + (std::process::id() % 400) as u16 * 40;
    loop {
        let port = 12000 + (base - 12000 + NEXT.fetch_add(1, Ordering::Relaxed)) % 16000;
        if UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

/// `n` consecutive free ports, the first returned (each taken through [`free_port`], so no
/// other test of this process gets one of them).
pub fn free_ports(n: u16) -> u16 {
    loop {
        let first = free_port();
        if (1..n).all(|i| free_port() == first + i) {
            return first;
        }
    }
}

/// Waits until `check` returns `Some`, polling every 20 ms, up to [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One `herald` process the test can kill and restart.
pub struct Proc {
    pub name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(name: &str, args: Vec<String>, dir: &Path, certs: &Path) -> Proc {
        let mut p = Proc { name: name.into(), args, log: dir.join(format!("{name}.log")), child: None };
        p.spawn(certs);
        p
    }

    pub fn spawn(&mut self, certs: &Path) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(BIN)
            .args(&self.args)
            .env("HERALD_CERTS", certs)
            .env("HERALD_LOG", "info,herald=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning herald");
        self.child = Some(child);
    }

    /// What the process wrote to stdout and stderr so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([&format!("-{sig}"), &pid]).status().unwrap();
        assert!(status.success(), "kill -{sig} {pid}");
    }

    /// Resident memory of the process now, in bytes (`VmRSS` of `/proc/PID/status`).
    pub fn rss(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        kb * 1024
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a test cluster is set up beyond its size.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Each topic server reaches the naming server through its own proxy, so a test can cut
    /// one server off the naming server only ([`Cluster::cut_from_naming`]).
    pub naming_proxies: bool,
    /// Topic servers hold writes in memory until fsynced (`--volatile-writes`): `kill -9`
    /// then loses what a power cut would.
    pub volatile_writes: bool,
    /// Members of the naming group (0 or 1: one naming server without `--peers`).
    pub naming_members: usize,
    /// More arguments for every topic server (e.g. limits).
    pub server_args: &'static [&'static str],
    /// More arguments for every naming member.
    pub naming_args: &'static [&'static str],
}

/// A naming server and `n` topic servers, each in its own process.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    /// Naming member 1 (the only one, without [`Options::naming_members`]).
    pub naming_addr: SocketAddr,
    pub naming: Proc,
    /// Naming members 2.. of a group.
    pub naming_peers: Vec<(u64, SocketAddr, Proc)>,
    /// Every naming member's address, as `--naming` takes them.
    pub naming_list: String,
    pub servers: Vec<(ServerId, SocketAddr, Proc)>,
    /// Proxies that can cut server 1 off (see [`Cluster::start_isolatable`]).
    pub proxies: Vec<proxy::UdpProxy>,
    /// Where each naming member serves its metrics (`--metrics-listen`), member 1 first.
    pub naming_metrics: Vec<SocketAddr>,
    /// Where each topic server serves its metrics.
    pub metrics: Vec<(ServerId, SocketAddr)>,
    pub options: Options,
    /// Each server's own way to the naming server, with [`Options::naming_proxies`].
    pub naming_links: Vec<(ServerId, proxy::UdpProxy)>,
}

impl Cluster {
    /// Starts the cluster and waits until every server has registered.
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, Options::default()).await
    }

    /// [`start`](Self::start) with [`Options`].
    pub async fn start_with(n: usize, options: Options) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let out = Command::new(BIN).args(["certs", "--servers", "8", "--dir"]).arg(&certs).output().unwrap();
        assert!(out.status.success(), "herald certs: {}", String::from_utf8_lossy(&out.stderr));
        let members = options.naming_members.max(1) as u64;
        let addrs: Vec<SocketAddr> =
            (0..members).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
        let peers: Vec<String> = addrs.iter().zip(1..).map(|(a, id)| format!("{id}={a}")).collect();
        let naming_metrics: Vec<SocketAddr> =
            (0..members).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
        let naming_args = |id: u64| -> Vec<String> {
            let dir_name = if members == 1 { "naming".to_string() } else { format!("naming-{id}") };
            let mut args: Vec<String> = vec![
                "naming".into(),
                "--listen".into(),
                addrs[id as usize - 1].to_string(),
                "--data".into(),
                dir.path().join(dir_name).display().to_string(),
                "--lease-ms".into(),
                LEASE_MS.to_string(),
                "--replace-after-ms".into(),
                REPLACE_AFTER_MS.to_string(),
                // The naming server logs JSON lines (checked by a test); topic servers log text.
                "--log-format".into(),
                "json".into(),
            ];
            args.extend(["--metrics-listen".into(), naming_metrics[id as usize - 1].to_string()]);
            args.extend(options.naming_args.iter().map(|a| a.to_string()));
            if members > 1 {
                args.extend(["--id".into(), id.to_string(), "--peers".into(), peers.join(",")]);
            }
            args
        };
        let naming = Proc::start("naming", naming_args(1), dir.path(), &certs);
        let naming_peers = (2..=members)
            .map(|id| {
                (
                    id,
                    addrs[id as usize - 1],
                    Proc::start(&format!("naming-{id}"), naming_args(id), dir.path(), &certs),
                )
            })
            .collect();
        let naming_list = addrs.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(",");
        let mut cluster = Cluster {
            dir,
            certs,
            naming_addr: addrs[0],
            naming,
            naming_peers,
            naming_list,
            servers: Vec::new(),
            proxies: Vec::new(),
            naming_metrics,
            metrics: Vec::new(),
            options,
            naming_links: Vec::new(),
        };
        for i in 1..=n {
            cluster.add_server(i as ServerId).await;
        }
        cluster.wait_alive(n).await;
        cluster
    }

    /// Like [`start`](Self::start), but server 1 can be cut off the network: everyone reaches
    /// it through a proxy (it advertises the proxy's address), and it reaches the naming
    /// server through another. [`isolate`](Self::isolate) drops both. Its real address stays
    /// reachable for a test that talks to it directly.
    pub async fn start_isolatable(n: usize) -> Cluster {
        let mut cluster = Cluster::start(0).await;
        let real: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let to_naming: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        cluster.proxies.push(proxy::UdpProxy::start(front, real).await);
        cluster.proxies.push(proxy::UdpProxy::start(to_naming, cluster.naming_addr).await);
        let data = cluster.dir.path().join("server-1");
        let args: Vec<String> = [
            "server",
            "--id",
            "1",
            "--listen",
            &real.to_string(),
            "--advertise",
            &front.to_string(),
            "--naming",
            &to_naming.to_string(),
            "--data",
            &data.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::start("server-1", args, cluster.dir.path(), &cluster.certs);
        cluster.servers.push((1, real, proc));
        for i in 2..=n {
            cluster.add_server(i as ServerId).await;
        }
        cluster.wait_alive(n).await;
        cluster
    }

    /// Cuts server 1 off (true) or reconnects it (false).
    pub fn isolate(&self, cut: bool) {
        for p in &self.proxies {
            p.block(cut);
        }
    }

    /// Cuts server `id` off the naming server only (true), or reconnects it (false); it keeps
    /// talking to the other servers. Needs [`Options::naming_proxies`].
    pub fn cut_from_naming(&self, id: ServerId, cut: bool) {
        let link = self.naming_links.iter().find(|(s, _)| *s == id).expect("a naming proxy for the server");
        link.1.block(cut);
    }

    /// Starts topic server `id` on a new port.
    pub async fn add_server(&mut self, id: ServerId) -> SocketAddr {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let data = self.dir.path().join(format!("server-{id}"));
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let naming = if self.options.naming_proxies {
            let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            self.naming_links.push((id, proxy::UdpProxy::start(front, self.naming_addr).await));
            front.to_string()
        } else {
            self.naming_list.clone()
        };
        let mut args = vec![
            "server".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            addr.to_string(),
            "--naming".into(),
            naming.to_string(),
            "--data".into(),
            data.display().to_string(),
            "--session-lease-ms".into(),
            SESSION_LEASE_MS.to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
        ];
        if self.options.volatile_writes {
            args.push("--volatile-writes".into());
        }
        args.extend(self.options.server_args.iter().map(|a| a.to_string()));
        self.metrics.push((id, metrics));
        let proc = Proc::start(&format!("server-{id}"), args, self.dir.path(), &self.certs);
        self.servers.push((id, addr, proc));
        addr
    }

    pub fn server(&mut self, id: ServerId) -> &mut Proc {
        &mut self.servers.iter_mut().find(|(i, _, _)| *i == id).expect("server id").2
    }

    pub fn server_addr(&self, id: ServerId) -> SocketAddr {
        self.servers.iter().find(|(i, _, _)| *i == id).expect("server id").1
    }

    /// `kill -9` then start again with the same data directory and port.
    pub fn restart_server(&mut self, id: ServerId) {
        let certs = self.certs.clone();
        let p = self.server(id);
        p.kill();
        p.spawn(&certs);
    }

    /// Naming member `id`'s process (1: [`Cluster::naming`]).
    pub fn naming_member(&mut self, id: u64) -> &mut Proc {
        if id == 1 {
            return &mut self.naming;
        }
        &mut self.naming_peers.iter_mut().find(|(i, _, _)| *i == id).expect("naming member").2
    }

    /// Starts naming member `id` again after [`Proc::kill`] (same data and port).
    pub fn start_naming_member(&mut self, id: u64) {
        let certs = self.certs.clone();
        self.naming_member(id).spawn(&certs);
    }

    /// How each naming member sees the group, by `herald naming status --json`.
    pub fn naming_status(&self) -> serde_json::Value {
        let out = self.cli(&["naming", "status", "--json"], None);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("naming status: {e}: {}", String::from_utf8_lossy(&out.stderr)))
    }

    /// Whether every naming member answered `naming status` with the same, non-empty book.
    pub fn naming_books_agree(status: &serde_json::Value) -> bool {
        let Some(members) = status["members"].as_array() else { return false };
        let versions: Vec<u64> = members.iter().filter_map(|m| m["book_version"].as_u64()).collect();
        versions.len() == members.len() && versions.iter().all(|v| *v == versions[0] && *v > 0)
    }

    /// The naming member that leads now, once one does.
    pub async fn naming_leader(&self) -> u64 {
        wait_for("a naming leader", || async { self.naming_status()["leader"].as_u64() }).await
    }

    /// Starts the naming server again after [`Proc::kill`] (same data and port).
    pub fn start_naming(&mut self) {
        let certs = self.certs.clone();
        self.naming.spawn(&certs);
    }

    pub fn restart_naming(&mut self) {
        let certs = self.certs.clone();
        self.naming.kill();
        self.naming.spawn(&certs);
    }

    /// Scrapes a process's metrics endpoint (`None`: naming member 1's); returns the body.
    pub fn scrape(&self, server: Option<ServerId>) -> String {
        let addr = match server {
            None => self.naming_metrics[0],
            Some(id) => self.metrics.iter().find(|(s, _)| *s == id).expect("a server with metrics").1,
        };
        scrape(addr)
    }

    /// Scrapes naming member `id`'s metrics endpoint; returns the body.
    pub fn scrape_naming(&self, id: u64) -> String {
        scrape(self.naming_metrics[id as usize - 1])
    }

    /// A client library handle on this cluster.
    pub fn client(&self) -> Arc<Client> {
        Client::new(self.naming_list.parse::<herald::types::NamingAddrs>().unwrap(), &self.certs).unwrap()
    }

    /// Waits until the naming server counts `n` live servers.
    pub async fn wait_alive(&self, n: usize) {
        let client = self.client();
        wait_for(&format!("{n} live topic servers"), || async {
            let servers = client.list_servers().await.ok()?;
            (servers.iter().filter(|s| s.alive).count() >= n).then_some(())
        })
        .await;
        client.close().await;
    }

    /// Runs the CLI against this cluster.
    pub fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        self.cli_spawn(args, stdin).wait_with_output().unwrap()
    }

    /// Starts the CLI against this cluster; stdin (if any) is written from a thread.
    pub fn cli_spawn(&self, args: &[&str], stdin: Option<&[u8]>) -> Child {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("HERALD_NAMING", &self.naming_list)
            .env("HERALD_CERTS", &self.certs)
            // Never the contexts of whoever runs the tests.
            .env("HERALD_CONFIG", self.dir.path().join("config.toml"))
            .env_remove("HERALD_CONTEXT")
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            let mut pipe = child.stdin.take().unwrap();
            let input = input.to_vec();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
        child
    }

    /// Runs the CLI and asserts it succeeded; returns stdout.
    pub fn cli_ok(&self, args: &[&str], stdin: Option<&[u8]>) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "herald {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Creates a topic through the CLI, with as many replicas as the cluster has servers (at
    /// most the default of 3).
    pub fn create_topic(&self, name: &str) -> TopicName {
        let replicas = self.servers.len().min(3).to_string();
        self.cli_ok(&["topic", "create", name, "--replicas", &replicas], None);
        TopicName::new(name).unwrap()
    }

    /// The id of the server that leads `topic` now, by the naming server's book.
    pub async fn leader_of(&self, topic: &TopicName) -> ServerId {
        let client = self.client();
        let leader = client.lookup(topic).await.unwrap().leader;
        client.close().await;
        leader
    }

    /// Every record `server` holds for `topic` up to its commit offset (offset, timestamp,
    /// key, headers, payload), read straight from that replica through `subscription`.
    pub async fn replica_records(
        &self,
        server: ServerId,
        topic: &TopicName,
        subscription: &str,
    ) -> Vec<herald::wire::StoredRecord> {
        use herald::wire::{Request, Response};
        let identity = herald::certs::load(&self.certs, herald::certs::CertRole::Client).unwrap();
        let addr = self.server_addr(server);
        let config = herald::transport::client_config(&identity).unwrap();
        let endpoint = herald::transport::client_endpoint(addr, config).unwrap();
        let conn = herald::transport::Connection::connect(&endpoint, addr).await.unwrap();
        let status = match conn.call(&Request::TopicStatus { topic: topic.clone() }).await.unwrap() {
            Response::TopicStatus(s) => s,
            other => panic!("{other:?}"),
        };
        let mut out = Vec::new();
        let mut from = status.log_start;
        while from < status.commit {
            let req = Request::Fetch {
                topic: topic.clone(),
                subscription: herald::types::SubscriptionName::new(subscription).unwrap(),
                from: Some(from),
                max_records: 10_000,
                max_bytes: 4 << 20,
                max_wait_ms: 0,
                session: None,
            };
            match conn.call(&req).await.unwrap() {
                Response::Records { records, .. } => {
                    let records = records.decode().unwrap();
                    if records.is_empty() {
                        break;
                    }
                    from = records.last().unwrap().offset + 1;
                    out.extend(records);
                }
                other => panic!("{other:?}"),
            }
        }
        conn.close();
        out
    }

    /// With `HERALD_TEST_LOGS=DIR` set, copies every process's whole log into a new folder
    /// of DIR (a failed test's tails are often not enough to tell what happened).
    fn keep_logs(&self) {
        let Some(root) = std::env::var_os("HERALD_TEST_LOGS") else { return };
        let test = std::thread::current().name().unwrap_or("test").replace("::", "-");
        let to = Path::new(&root).join(format!("{test}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&to);
        let procs = std::iter::once(&self.naming)
            .chain(self.naming_peers.iter().map(|(_, _, p)| p))
            .chain(self.servers.iter().map(|(_, _, p)| p));
        for p in procs {
            let _ = std::fs::copy(&p.log, to.join(format!("{}.log", p.name)));
            // Where each live process's threads are (with gdb, where installed): tells a
            // hung process from a slow one.
            if let Some(pid) = p.child.as_ref().map(|c| c.id().to_string()) {
                if let Ok(out) =
                    Command::new("gdb").args(["-p", &pid, "-batch", "-ex", "thread apply all bt"]).output()
                {
                    let _ = std::fs::write(to.join(format!("{}.stacks", p.name)), out.stdout);
                }
            }
        }
        eprintln!("---- whole logs in {} ----", to.display());
    }

    /// `topic describe --json`, parsed.
    pub fn describe(&self, topic: &str) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["topic", "describe", topic, "--json"], None)).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.keep_logs();
            eprintln!("---- naming log ----\n{}", self.naming.log_tail());
            for (id, _, p) in &self.naming_peers {
                eprintln!("---- naming {id} log ----\n{}", p.log_tail());
            }
            for (id, _, p) in &self.servers {
                eprintln!("---- server {id} log ----\n{}", p.log_tail());
            }
        }
    }
}

/// Creates a three-replica topic with a subscription (`keep`) that holds every record.
pub async fn replicated_topic(client: &Arc<Client>, name: &str) -> TopicName {
    use herald::types::{StartFrom, SubscriptionName};
    let topic = TopicName::new(name).unwrap();
    client.create_topic(&topic, 3, herald::wire::TopicConfig::default()).await.unwrap();
    let keep = SubscriptionName::new("keep").unwrap();
    client.create_subscription(&topic, &keep, StartFrom::Earliest, false).await.unwrap();
    topic
}

/// Reads a whole topic through a new (or existing) subscription, from its cursor to the
/// committed end, as (offset, payload).
/// The value of one sample in OpenMetrics text: `name` with exactly `labels` (e.g.
/// `topic="t",subscription="s"`, or empty).
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() { format!("{name} ") } else { format!("{name}{{{labels}}} ") };
    text.lines().find_map(|l| l.strip_prefix(&key)).map(|v| v.trim().parse().expect("a number"))
}

pub async fn read_all(client: &Arc<Client>, topic: &TopicName, subscription: &str) -> Vec<(u64, String)> {
    use herald::types::{StartFrom, SubscriptionName};
    let name = SubscriptionName::new(subscription).unwrap();
    let mut consumer = client.consumer(topic.clone(), name, StartFrom::Earliest).await.unwrap();
    let mut out = Vec::new();
    loop {
        let records = consumer.poll(10_000, Duration::ZERO, None).await.unwrap();
        if records.is_empty() {
            break;
        }
        out.extend(records.into_iter().map(|r| (r.offset, String::from_utf8(r.record.payload).unwrap())));
    }
    consumer.release().await;
    out
}

/// Produces `batches` batches of `size` records through one pipelined producer and checks
/// the acks: in order, dense offsets from 0, no duplicates. Returns the records acked.
pub async fn produce_in_order(client: &Arc<Client>, topic: &TopicName, batches: usize, size: usize) -> u64 {
    use herald::wire::Record;
    let producer = client.producer(topic.clone(), 16);
    let mut acks = Vec::new();
    for b in 0..batches {
        let records =
            (0..size).map(|i| Record { payload: format!("{b}-{i}").into_bytes(), ..Record::default() });
        acks.push(producer.send(records.collect()).await.unwrap());
    }
    producer.close().await;
    let mut next = 0;
    for ack in acks {
        let ack = ack.await.unwrap().unwrap();
        assert_eq!(ack.base, next, "batches are acked in order with dense offsets");
        assert!(!ack.duplicate);
        next += ack.count as u64;
    }
    next
}

/// Lines `prefix-0 .. prefix-(n-1)`, newline-terminated, as stdin for `herald produce`.
pub fn numbered_lines(prefix: &str, n: usize) -> Vec<u8> {
    (0..n).map(|i| format!("{prefix}-{i}\n")).collect::<String>().into_bytes()
}

/// Checks a consumed history against what was acknowledged: every acked payload read exactly
/// once, offsets strictly increasing and dense from `first_offset`.
pub fn assert_history(read: &[(u64, String)], acked: &[String], first_offset: u64) {
    for (i, (offset, _)) in read.iter().enumerate() {
        assert_eq!(*offset, first_offset + i as u64, "offsets must be dense and in order (read #{i})");
    }
    let payloads: Vec<&String> = read.iter().map(|(_, p)| p).collect();
    let mut seen = std::collections::HashSet::new();
    for p in &payloads {
        assert!(seen.insert(*p), "payload {p:?} read twice");
    }
    for a in acked {
        assert!(seen.contains(a), "acknowledged payload {a:?} was not read");
    }
}

/// GETs `/metrics` from `addr`; returns the body.
pub fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(DEADLINE)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_string()
}
