//! `herald bench`: measures a running cluster (`--naming`) or one it starts (`--dev`).
//!
//! Workloads (DESIGN.md section 5): `produce` (one producer, N records of S bytes, W batches
//! in flight; records/s, MB/s, ack latency), `consume` (one subscription reading N records
//! back with acks), `latency` (a fixed produce rate while a consumer follows; end-to-end
//! latency), `failover` (kill -9 of the leader under load, with `--kill-naming-leader` the
//! naming group's leader at the same instant; time to the first ack from the new leader;
//! `--dev` only), `create` (time to create topics, one after another). `suite` runs the
//! standard set and prints a table.
//!
//! With `--dev` the naming group (`--naming-servers`, default 3) and three topic servers run
//! as separate processes of this
//! binary in a temporary directory (removed afterwards), so the CPU time (user + sys, from
//! `/proc/PID/stat`) and RSS of each server can be reported. Against a running cluster, the
//! CPU of every local process whose command line is a `herald naming|server|dev` is counted.
//! Progress and summaries go to stderr; `--json` prints one JSON object per result on stdout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::certs;
use crate::client::{self, BatchAck, Client};
use crate::error::Error;
use crate::types::{NamingAddrs, ServerId, StartFrom, SubscriptionName, TopicName};
use crate::wire::{Record, TopicConfig};

mod clients;
mod disk;
mod topics;

/// Linux reports process CPU time in clock ticks of 1/100 s (USER_HZ, fixed by the ABI).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// One producer writes N records of S bytes, W batches in flight.
    Produce(BenchArgs),
    /// One subscription reads N records back, acknowledging as it goes.
    Consume(BenchArgs),
    /// Produce at --rate records/s for --duration while a consumer follows.
    Latency(BenchArgs),
    /// kill -9 the leader under load and time the first ack from the new one (--dev only).
    Failover(BenchArgs),
    /// Create --topics topics of --replicas replicas, one after another, and time each.
    Create(BenchArgs),
    /// Many topics: create --topics in batches, leaders per server, idle CPU and RSS, produce
    /// on --producers topics at once against one topic, consume with --consumers, delete.
    Topics(BenchArgs),
    /// Many client connections to one server (--connections, half producing, half consuming,
    /// a topic each): memory per connection, then kill -9 of that server and the time until
    /// every client resumed at the new leaders, with the naming group's load (--dev only).
    Clients(BenchArgs),
    /// The standard set (what `make bench` runs), as a table.
    Suite(BenchArgs),
    /// The machine's own limit: appends of Herald's batch sizes to a file, fsynced after
    /// each, in fsyncs/s and MB/s; then, one per ms, 4 KiB fsynced appends and 600-byte redb
    /// commits, timed (no cluster needed).
    Disk(disk::DiskArgs),
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Start a naming group and three topic servers (release binary, temp dir) for the run.
    #[arg(long)]
    dev: bool,
    /// Naming servers of the --dev cluster (1, 3 or 5).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=5))]
    naming_servers: u16,
    /// `failover`: kill -9 the naming group's leader at the same instant as the topic leader.
    #[arg(long)]
    kill_naming_leader: bool,
    /// Topics for `create` and `topics`.
    #[arg(long, default_value_t = 20)]
    topics: usize,
    /// `topics`: producers, each on its own topic, at once (0: no produce phase).
    #[arg(long, default_value_t = 100)]
    producers: usize,
    /// `topics`: consumers sharing the produced topics.
    #[arg(long, default_value_t = 10)]
    consumers: usize,
    /// `clients`: client connections to one server (half producers, half consumers).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(2..=4000))]
    connections: u64,
    /// `clients`: milliseconds between one producer's records.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    interval_ms: u64,
    /// `consume`: subscriptions reading the topic at once, one consumer each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    subscriptions: u64,
    /// `consume`: where the consumers read (see `herald consume --help`).
    #[arg(long, value_enum, default_value = "leader")]
    read_from: client::ReadFrom,
    /// `topics`: seconds over which idle CPU is measured (default: one park poll's wait, so
    /// the window holds the poll round every server pair costs while idle)
    #[arg(long, default_value_t = crate::replica::PARK_WAIT.as_secs())]
    idle_secs: u64,
    /// Replication factor of the benchmark topic.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Records to produce or consume.
    #[arg(long, default_value_t = 500_000)]
    records: u64,
    /// Bytes of payload per record.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Batches in flight.
    #[arg(long, default_value_t = client::DEFAULT_INFLIGHT)]
    inflight: usize,
    /// Records per second for `latency`.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Seconds for `latency`.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Repetitions for `failover` (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// One JSON object per result on stdout.
    #[arg(long)]
    json: bool,
}

/// One benchmark result.
#[derive(Debug, Clone, Default)]
struct Outcome {
    workload: String,
    replicas: u32,
    records: u64,
    size: usize,
    seconds: f64,
    latency_ms: Option<(f64, f64, f64)>,
    /// `latency`: from a batch's send to its producer's ack (the commit path without the
    /// consumer), p50 / p99 / p999 in ms.
    ack_ms: Option<(f64, f64, f64)>,
    cpu_seconds: Option<f64>,
    server_rss_mb: Vec<(String, f64)>,
    extra: Option<serde_json::Value>,
}

/// `x` to `digits` decimals: measured figures carry no more precision than that, and JSON
/// readers should not see float noise (0.30000000000000004).
fn rounded(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

impl Outcome {
    fn records_per_sec(&self) -> f64 {
        self.records as f64 / self.seconds.max(1e-9)
    }

    fn to_json(&self) -> serde_json::Value {
        let mut v = json!({
            "workload": self.workload,
            "replicas": self.replicas,
            "records": self.records,
            "size": self.size,
            "seconds": rounded(self.seconds, 3),
            "records_per_sec": rounded(self.records_per_sec(), 0),
            "mb_per_sec": rounded(self.records_per_sec() * self.size as f64 / 1e6, 2),
        });
        if let Some((p50, p99, p999)) = self.latency_ms {
            v["latency_ms"] =
                json!({ "p50": rounded(p50, 3), "p99": rounded(p99, 3), "p999": rounded(p999, 3) });
        }
        if let Some((p50, p99, p999)) = self.ack_ms {
            v["ack_latency_ms"] =
                json!({ "p50": rounded(p50, 3), "p99": rounded(p99, 3), "p999": rounded(p999, 3) });
        }
        if let Some(cpu) = self.cpu_seconds {
            v["cpu_seconds"] = json!(rounded(cpu, 3));
            v["cpu_us_per_record"] = json!(rounded(cpu * 1e6 / self.records.max(1) as f64, 2));
        }
        if !self.server_rss_mb.is_empty() {
            let rss: serde_json::Map<String, serde_json::Value> =
                self.server_rss_mb.iter().map(|(name, mb)| (name.clone(), json!(mb))).collect();
            v["server_rss_mb"] = json!(rss);
        }
        if let Some(extra) = &self.extra {
            v["details"] = extra.clone();
        }
        v
    }

    fn summary(&self) -> String {
        let mut s = format!(
            "{:<9} R={} {:>8} x {:>5} B: {:>10.0} records/s {:>7.1} MB/s",
            self.workload,
            self.replicas,
            self.records,
            self.size,
            self.records_per_sec(),
            self.records_per_sec() * self.size as f64 / 1e6
        );
        if let Some((p50, p99, p999)) = self.latency_ms {
            s += &format!("  latency p50 {p50:.2} ms p99 {p99:.2} ms p999 {p999:.2} ms");
        }
        if let Some((p50, p99, _)) = self.ack_ms {
            s += &format!(" (produce ack p50 {p50:.2} ms p99 {p99:.2} ms)");
        }
        if let Some(cpu) = self.cpu_seconds {
            s += &format!("  CPU {:.1} us/record", cpu * 1e6 / self.records.max(1) as f64);
        }
        s
    }
}

/// A cluster of separate processes in a temporary directory, killed and removed on drop.
struct DevCluster {
    dir: PathBuf,
    certs: PathBuf,
    naming_addrs: NamingAddrs,
    /// Naming members: id, address, the arguments they run with, the process.
    naming: Vec<(u64, SocketAddr, Vec<String>, Child)>,
    /// Each naming member's metrics address (TCP), for counting the requests it served.
    naming_metrics: Vec<SocketAddr>,
    servers: Vec<(ServerId, SocketAddr, Child)>,
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        for (_, _, _, c) in &mut self.naming {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (_, _, c) in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn loopback_port() -> Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn spawn(dir: &Path, certs: &Path, name: &str, args: &[String]) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    Command::new(std::env::current_exe()?)
        .args(args)
        .env("HERALD_CERTS", certs)
        .env("HERALD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

impl DevCluster {
    async fn start(servers: usize, naming_servers: u16, lease_ms: u64) -> Result<DevCluster> {
        let dir =
            std::env::temp_dir().join(format!("herald-bench-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir)?;
        let certs = dir.join("certs");
        certs::generate(&certs, &certs::default_hosts(), servers as u16, false)?;
        let addrs: Vec<SocketAddr> = (0..naming_servers).map(|_| loopback_port()).collect::<Result<_>>()?;
        let peers: Vec<String> = (1..).zip(&addrs).map(|(id, a)| format!("{id}={a}")).collect();
        let mut naming = Vec::new();
        let mut naming_metrics = Vec::new();
        for (id, addr) in (1u64..).zip(addrs.iter().copied()) {
            let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            naming_metrics.push(metrics);
            let mut args: Vec<String> =
                ["naming", "--listen", &addr.to_string(), "--lease-ms", &lease_ms.to_string()]
                    .iter()
                    .map(|s| s.to_string())
                    .chain(["--data".to_string(), dir.join(format!("naming-{id}")).display().to_string()])
                    .chain(["--metrics-listen".to_string(), metrics.to_string()])
                    .collect();
            if naming_servers > 1 {
                args.extend(["--id".into(), id.to_string(), "--peers".into(), peers.join(",")]);
            }
            let child = spawn(&dir, &certs, &format!("naming-{id}"), &args)?;
            naming.push((id, addr, args, child));
        }
        let naming_addrs = NamingAddrs::new(addrs).context("--naming-servers is at least 1")?;
        let mut cluster =
            DevCluster { dir, certs, naming_addrs, naming, naming_metrics, servers: Vec::new() };
        for id in 1..=servers as ServerId {
            cluster.start_server(id, loopback_port()?)?;
        }
        let client = cluster.client()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.list_servers().await.map(|s| s.iter().filter(|s| s.alive).count()).unwrap_or(0) < servers
        {
            if Instant::now() > deadline {
                bail!("the bench cluster did not come up; logs in {}", cluster.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client.close().await;
        Ok(cluster)
    }

    fn start_server(&mut self, id: ServerId, addr: SocketAddr) -> Result<()> {
        let data = self.dir.join(format!("server-{id}"));
        let args: Vec<String> = [
            "server",
            "--id",
            &id.to_string(),
            "--listen",
            &addr.to_string(),
            "--naming",
            &self.naming_addrs.to_string(),
            "--data",
            &data.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let child = spawn(&self.dir, &self.certs, &format!("server-{id}"), &args)?;
        self.servers.retain(|(i, _, _)| *i != id);
        self.servers.push((id, addr, child));
        Ok(())
    }

    fn client(&self) -> Result<Arc<Client>> {
        Client::new(self.naming_addrs.clone(), &self.certs)
    }

    fn pids(&self) -> Vec<u32> {
        self.naming.iter().map(|n| n.3.id()).chain(self.servers.iter().map(|(_, _, c)| c.id())).collect()
    }

    /// kill -9 of the naming member that leads now; returns its id.
    async fn kill_naming_leader(&mut self, client: &Client) -> Result<u64> {
        let leader = client
            .naming_members()
            .await
            .into_iter()
            .find_map(|(_, s)| s.ok().filter(|s| s.role == crate::wire::MemberRole::Leader).map(|s| s.id))
            .context("no naming member leads")?;
        let (_, _, _, child) = self.naming.iter_mut().find(|n| n.0 == leader).context("naming member")?;
        let _ = child.kill();
        let _ = child.wait();
        Ok(leader)
    }

    /// Starts naming member `id` again with its data directory.
    fn restart_naming(&mut self, id: u64) -> Result<()> {
        let (dir, certs) = (self.dir.clone(), self.certs.clone());
        let (_, _, args, child) = self.naming.iter_mut().find(|n| n.0 == id).context("naming member")?;
        *child = spawn(&dir, &certs, &format!("naming-{id}"), args)?;
        Ok(())
    }

    fn kill(&mut self, id: ServerId) -> Option<SocketAddr> {
        let (_, addr, child) = self.servers.iter_mut().find(|(i, _, _)| *i == id)?;
        let _ = child.kill();
        let _ = child.wait();
        Some(*addr)
    }

    fn rss_mb(&self) -> Vec<(String, f64)> {
        self.servers
            .iter()
            .filter_map(|(id, _, c)| rss_kb(c.id()).map(|kb| (format!("server-{id}"), kb as f64 / 1024.0)))
            .collect()
    }
}

/// user + sys CPU seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Local processes running a Herald server (for a cluster the bench did not start).
fn server_pids() -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"herald"))
                && args.get(1).is_some_and(|a| matches!(*a, b"naming" | b"server" | b"dev"))
        })
        .collect()
}

fn total_cpu(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_seconds(*p)).sum()
}

/// What a Herald process runs (`naming`, `server` or `dev`), from its command line.
fn process_role(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let role = cmdline.split(|b| *b == 0).nth(1)?;
    Some(String::from_utf8_lossy(role).into_owned())
}

/// CPU seconds used so far by `pids`, summed per [`process_role`].
fn cpu_by_role(pids: &[u32]) -> BTreeMap<String, f64> {
    let mut by_role = BTreeMap::new();
    for pid in pids {
        if let (Some(role), Some(secs)) = (process_role(*pid), cpu_seconds(*pid)) {
            *by_role.entry(role).or_insert(0.0) += secs;
        }
    }
    by_role
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::default_bar()
        .template("{msg:>10} [{bar:30}] {human_pos}/{human_len} {rate} eta {eta}")
        .expect("static template")
        // indicatif's own {per_sec} prints fractions of a record ("59,125.0059/s").
        .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{}/s", indicatif::HumanCount(state.per_sec() as u64));
        })
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

fn quantiles_ms(h: &Histogram<u64>) -> (f64, f64, f64) {
    let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
    (q(0.5), q(0.99), q(0.999))
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds")
}

async fn new_topic(client: &Client, replicas: u32, subscribe: bool) -> Result<TopicName> {
    let topic = TopicName::new(format!("bench-{:08x}", fastrand::u32(..)))?;
    client.create_topic(&topic, replicas, TopicConfig::default()).await?;
    if subscribe {
        let sub = SubscriptionName::new("bench")?;
        client.create_subscription(&topic, &sub, StartFrom::Earliest, false).await?;
    }
    Ok(topic)
}

/// Records per batch: what fits the client's batch limits.
fn batch_len(size: usize) -> u64 {
    (client::MAX_BATCH_BYTES / size.max(1)).clamp(1, client::MAX_BATCH_RECORDS) as u64
}

/// Produces `records` records of `size` bytes; returns the ack-latency histogram (µs) and the
/// elapsed time.
async fn produce_records(
    client: &Arc<Client>,
    topic: &TopicName,
    records: u64,
    size: usize,
    inflight: usize,
    bar: &ProgressBar,
) -> Result<(Histogram<u64>, Duration)> {
    let producer = client.producer(topic.clone(), inflight);
    let per_batch = batch_len(size);
    let (tx, mut rx) =
        mpsc::unbounded_channel::<(Instant, u64, oneshot::Receiver<Result<BatchAck, Error>>)>();
    let bar2 = bar.clone();
    let collector = tokio::spawn(async move {
        let mut hist = new_histogram();
        while let Some((sent, n, ack)) = rx.recv().await {
            ack.await.map_err(|_| Error::internal("producer stopped"))??;
            hist.saturating_record(sent.elapsed().as_micros() as u64);
            bar2.inc(n);
        }
        Ok::<_, Error>(hist)
    });
    let payload = vec![b'x'; size];
    let start = Instant::now();
    let mut sent = 0;
    while sent < records {
        let n = per_batch.min(records - sent);
        let batch = (0..n).map(|_| Record { payload: payload.clone(), ..Record::default() }).collect();
        let ack = producer.send(batch).await?;
        tx.send((Instant::now(), n, ack)).map_err(|_| anyhow::anyhow!("ack collector stopped"))?;
        sent += n;
    }
    drop(tx);
    let hist = collector.await??;
    let elapsed = start.elapsed();
    producer.close().await;
    Ok((hist, elapsed))
}

struct Target {
    client: Arc<Client>,
    cluster: Option<DevCluster>,
}

impl Target {
    async fn new(args: &BenchArgs, naming: NamingAddrs, certs: &Path, lease_ms: u64) -> Result<Target> {
        if args.dev {
            let cluster = DevCluster::start(3, args.naming_servers, lease_ms).await?;
            Ok(Target { client: cluster.client()?, cluster: Some(cluster) })
        } else {
            Ok(Target { client: Client::new(naming, certs)?, cluster: None })
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.cluster.as_ref().map(|c| c.pids()).unwrap_or_else(server_pids)
    }

    fn rss(&self) -> Vec<(String, f64)> {
        self.cluster.as_ref().map(|c| c.rss_mb()).unwrap_or_default()
    }
}

async fn bench_produce(t: &Target, a: &BenchArgs) -> Result<Outcome> {
    let topic = new_topic(&t.client, a.replicas, true).await?;
    let bar = progress(a.records, "produce");
    let cpu = total_cpu(&t.pids());
    let (hist, elapsed) = produce_records(&t.client, &topic, a.records, a.size, a.inflight, &bar).await?;
    bar.finish_and_clear();
    Ok(Outcome {
        workload: "produce".into(),
        replicas: a.replicas,
        records: a.records,
        size: a.size,
        seconds: elapsed.as_secs_f64(),
        latency_ms: Some(quantiles_ms(&hist)),
        ack_ms: None,
        cpu_seconds: Some(total_cpu(&t.pids()) - cpu),
        server_rss_mb: t.rss(),
        extra: None,
    })
}

async fn bench_consume(t: &Target, a: &BenchArgs) -> Result<Outcome> {
    let topic = new_topic(&t.client, a.replicas, true).await?;
    let bar = progress(a.records, "fill");
    produce_records(&t.client, &topic, a.records, a.size, a.inflight, &bar).await?;
    bar.finish_and_clear();
    let subscriptions = a.subscriptions;
    let bar = progress(a.records * subscriptions, "consume");
    let mut consumers = Vec::new();
    for s in 0..subscriptions {
        let name = SubscriptionName::new(format!("bench-{s}"))?;
        let consumer = t.client.consumer(topic.clone(), name, StartFrom::Earliest).await?;
        consumers.push(consumer.read_from(a.read_from));
    }
    let cpu = total_cpu(&t.pids());
    let start = Instant::now();
    let mut reads = tokio::task::JoinSet::new();
    for mut consumer in consumers {
        let (records, bar) = (a.records, bar.clone());
        reads.spawn(async move {
            let (mut read, mut ack) = (0u64, None);
            while read < records {
                let got =
                    consumer.poll(client::MAX_BATCH_RECORDS as u32, Duration::from_secs(1), ack).await?;
                if let Some(last) = got.last() {
                    ack = Some(last.offset + 1);
                }
                read += got.len() as u64;
                bar.inc(got.len() as u64);
            }
            if let Some(next) = ack {
                consumer.ack(next).await?;
            }
            Ok::<_, Error>(read)
        });
    }
    let mut read = 0;
    while let Some(done) = reads.join_next().await {
        read += done??;
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    let workload = match (subscriptions, a.read_from) {
        (1, client::ReadFrom::Leader) => "consume".to_string(),
        (s, from) => format!(
            "consume x{s} from {}",
            if from == client::ReadFrom::Leader { "leader" } else { "replicas" }
        ),
    };
    Ok(Outcome {
        workload,
        replicas: a.replicas,
        records: read,
        size: a.size,
        seconds: elapsed.as_secs_f64(),
        latency_ms: None,
        ack_ms: None,
        cpu_seconds: Some(total_cpu(&t.pids()) - cpu),
        server_rss_mb: t.rss(),
        extra: None,
    })
}

async fn bench_latency(t: &Target, a: &BenchArgs) -> Result<Outcome> {
    let topic = new_topic(&t.client, a.replicas, true).await?;
    let total = a.rate * a.duration;
    let bar = progress(total, "latency");
    let epoch = Instant::now();
    let mut consumer =
        t.client.consumer(topic.clone(), SubscriptionName::new("bench")?, StartFrom::Earliest).await?;
    let reader = tokio::spawn(async move {
        let mut hist = new_histogram();
        let (mut read, mut ack) = (0u64, None);
        while read < total {
            let records = consumer.poll(10_000, Duration::from_secs(1), ack).await?;
            let now = epoch.elapsed().as_micros() as u64;
            for r in &records {
                let sent = u64::from_le_bytes(r.record.payload[..8].try_into().expect("8 bytes"));
                hist.saturating_record(now.saturating_sub(sent).max(1));
            }
            if let Some(last) = records.last() {
                ack = Some(last.offset + 1);
            }
            read += records.len() as u64;
        }
        Ok::<_, Error>(hist)
    });
    // A batch every millisecond carrying that millisecond's share of the rate.
    let producer = t.client.producer(topic, a.inflight);
    let cpu = total_cpu(&t.pids());
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut acks = Vec::new();
    while sent < total {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * a.rate as f64) as u64;
        let n = due.min(total).saturating_sub(sent);
        if n == 0 {
            continue;
        }
        let stamp = (epoch.elapsed().as_micros() as u64).to_le_bytes();
        let mut payload = vec![b'x'; a.size.max(8)];
        payload[..8].copy_from_slice(&stamp);
        let batch = (0..n).map(|_| Record { payload: payload.clone(), ..Record::default() }).collect();
        let queued = Instant::now();
        let ack = producer.send(batch).await?;
        // Timed as each ack arrives, apart from the consumer: the commit path alone.
        acks.push(tokio::spawn(async move { (ack.await, queued.elapsed().as_micros() as u64) }));
        sent += n;
        bar.inc(n);
    }
    let mut ack_hist = new_histogram();
    for ack in acks {
        let (ack, micros) = ack.await?;
        ack.map_err(|_| anyhow::anyhow!("producer stopped"))??;
        ack_hist.saturating_record(micros.max(1));
    }
    producer.close().await;
    let hist = reader.await??;
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    Ok(Outcome {
        workload: "latency".into(),
        replicas: a.replicas,
        records: total,
        size: a.size.max(8),
        seconds: elapsed.as_secs_f64(),
        latency_ms: Some(quantiles_ms(&hist)),
        ack_ms: Some(quantiles_ms(&ack_hist)),
        cpu_seconds: Some(total_cpu(&t.pids()) - cpu),
        server_rss_mb: t.rss(),
        extra: Some(json!({ "rate": a.rate, "duration_s": a.duration })),
    })
}

async fn bench_failover(t: &mut Target, a: &BenchArgs) -> Result<Outcome> {
    let Some(cluster) = t.cluster.as_mut() else {
        bail!("`bench failover` kills servers, so it only runs against its own cluster: add --dev");
    };
    let mut times = Vec::new();
    for run in 0..a.runs {
        let client = cluster.client()?;
        let topic = new_topic(&client, 3, false).await?;
        let info = client.lookup(&topic).await?;
        let producer = client.producer(topic.clone(), a.inflight);
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Receiver<Result<BatchAck, Error>>>();
        let collector = tokio::spawn(async move {
            let mut acks = Vec::new();
            while let Some(ack) = rx.recv().await {
                if let Ok(Ok(ack)) = ack.await {
                    acks.push((Instant::now(), ack));
                }
            }
            acks
        });
        let started = Instant::now();
        let mut killed_at = None;
        let mut naming_killed = None;
        // Small batches at a steady pace, so the first ack after the failover is prompt.
        while started.elapsed() < Duration::from_secs(6) {
            let batch =
                (0..10).map(|_| Record { payload: vec![b'x'; a.size], ..Record::default() }).collect();
            tx.send(producer.send(batch).await?).ok();
            if killed_at.is_none() && started.elapsed() > Duration::from_secs(1) {
                if a.kill_naming_leader {
                    naming_killed = Some(cluster.kill_naming_leader(&client).await?);
                }
                cluster.kill(info.leader);
                killed_at = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(tx);
        producer.close().await;
        let acks = collector.await?;
        let killed_at = killed_at.expect("killed");
        let first = acks.iter().filter(|(_, ack)| ack.epoch > info.epoch).map(|(at, _)| *at).min();
        let Some(first) = first else { bail!("run {run}: no ack from a new leader within 5 s of the kill") };
        times.push((first - killed_at).as_secs_f64());
        // Bring the killed server back for the next run.
        let addr =
            cluster.servers.iter().find(|(i, _, _)| *i == info.leader).map(|(_, a, _)| *a).expect("server");
        cluster.start_server(info.leader, addr)?;
        if let Some(id) = naming_killed {
            cluster.restart_naming(id)?;
        }
        client.close().await;
        let c = cluster.client()?;
        while c.list_servers().await.map(|s| s.iter().filter(|s| s.alive).count()).unwrap_or(0) < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.close().await;
        eprintln!("failover run {}: {:.0} ms", run + 1, times.last().expect("time") * 1000.0);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    Ok(Outcome {
        workload: "failover".into(),
        replicas: 3,
        records: 0,
        size: a.size,
        seconds: median,
        extra: Some(
            json!({ "median_ms": median * 1000.0, "runs_ms": times.iter().map(|t| t * 1000.0).collect::<Vec<_>>(), "naming_leader_killed": a.kill_naming_leader }),
        ),
        ..Outcome::default()
    })
}

/// Creates `a.topics` topics one after another; the time is the median of one create.
async fn bench_create(t: &Target, a: &BenchArgs) -> Result<Outcome> {
    let mut times = Vec::new();
    for _ in 0..a.topics {
        let started = Instant::now();
        new_topic(&t.client, a.replicas, false).await?;
        times.push(started.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let max = sorted.last().copied().unwrap_or_default();
    Ok(Outcome {
        workload: "create".into(),
        replicas: a.replicas,
        records: 0,
        size: 0,
        seconds: median,
        extra: Some(
            json!({ "topics": a.topics, "median_ms": rounded(median * 1000.0, 2), "max_ms": rounded(max * 1000.0, 2) }),
        ),
        ..Outcome::default()
    })
}

fn report(outcome: &Outcome, json: bool) -> Result<()> {
    if outcome.workload == "topics" || outcome.workload == "clients" {
        // bench_topics and bench_clients said it all as they went.
    } else if outcome.workload == "create" {
        eprintln!(
            "create    one `topic create` (R={}): median {:.1} ms",
            outcome.replicas,
            outcome.seconds * 1000.0
        );
    } else if outcome.workload == "failover" {
        eprintln!(
            "failover  kill -9 of the leader to the first ack from the new leader: median {:.0} ms",
            outcome.seconds * 1000.0
        );
    } else {
        eprintln!("{}", outcome.summary());
    }
    if json {
        println!("{}", serde_json::to_string(&outcome.to_json())?);
    }
    Ok(())
}

/// Runs `herald bench ...`.
pub async fn run(cmd: BenchCommand, naming: NamingAddrs, certs: &Path) -> Result<()> {
    // Benchmarks use a one-second lease so `failover` measures Herald, not a long default.
    let lease_ms = crate::naming::DEFAULT_LEASE.as_millis() as u64;
    match cmd {
        BenchCommand::Produce(a) => {
            report(&bench_produce(&Target::new(&a, naming, certs, lease_ms).await?, &a).await?, a.json)
        }
        BenchCommand::Consume(a) => {
            report(&bench_consume(&Target::new(&a, naming, certs, lease_ms).await?, &a).await?, a.json)
        }
        BenchCommand::Latency(a) => {
            report(&bench_latency(&Target::new(&a, naming, certs, lease_ms).await?, &a).await?, a.json)
        }
        BenchCommand::Failover(a) => {
            let mut t = Target::new(&a, naming.clone(), certs, lease_ms).await?;
            report(&bench_failover(&mut t, &a).await?, a.json)
        }
        BenchCommand::Create(a) => {
            report(&bench_create(&Target::new(&a, naming, certs, lease_ms).await?, &a).await?, a.json)
        }
        BenchCommand::Topics(a) => {
            report(&topics::bench_topics(&Target::new(&a, naming, certs, lease_ms).await?, &a).await?, a.json)
        }
        BenchCommand::Clients(a) => {
            let mut t = Target::new(&a, naming.clone(), certs, lease_ms).await?;
            report(&clients::bench_clients(&mut t, &a).await?, a.json)
        }
        BenchCommand::Suite(a) => suite(a, naming, certs, lease_ms).await,
        BenchCommand::Disk(a) => disk::bench_disk(&a),
    }
}

/// The standard set of issue 4 / DESIGN.md section 5, printed as a Markdown table.
async fn suite(a: BenchArgs, naming: NamingAddrs, certs: &Path, lease_ms: u64) -> Result<()> {
    let mut results = Vec::new();
    let t = Target::new(&a, naming.clone(), certs, lease_ms).await?;
    for (replicas, size, records) in
        [(3, 100, 500_000), (1, 100, 500_000), (3, 1000, 100_000), (1, 1000, 100_000)]
    {
        let args = BenchArgs { replicas, size, records, ..a.clone() };
        results.push(bench_produce(&t, &args).await?);
        report(results.last().expect("result"), a.json)?;
        results.push(bench_consume(&t, &args).await?);
        report(results.last().expect("result"), a.json)?;
    }
    let args = BenchArgs { replicas: 3, size: 100, rate: 5000, duration: 10, ..a.clone() };
    results.push(bench_latency(&t, &args).await?);
    report(results.last().expect("result"), a.json)?;
    drop(t);
    if a.dev {
        let mut t = Target::new(&a, naming.clone(), certs, lease_ms).await?;
        results.push(bench_failover(&mut t, &BenchArgs { runs: 5, ..a.clone() }).await?);
        report(results.last().expect("result"), a.json)?;
    }
    if !a.json {
        println!("| workload | R | records x size | records/s | MB/s | p50 / p99 / p999 ms | CPU us/record | server RSS MB |");
        println!("|---|---|---|---|---|---|---|---|");
        for r in &results {
            if r.workload == "failover" {
                println!(
                    "| failover (median of 5) | 3 | | | | kill to first new ack: {:.0} ms | | |",
                    r.seconds * 1000.0
                );
                continue;
            }
            let lat = r.latency_ms.map(|(a, b, c)| format!("{a:.2} / {b:.2} / {c:.2}")).unwrap_or_default();
            let cpu = r
                .cpu_seconds
                .map(|c| format!("{:.1}", c * 1e6 / r.records.max(1) as f64))
                .unwrap_or_default();
            let rss: Vec<String> = r.server_rss_mb.iter().map(|(_, mb)| format!("{mb:.0}")).collect();
            println!(
                "| {} | {} | {} x {} B | {:.0} | {:.1} | {} | {} | {} |",
                r.workload,
                r.replicas,
                r.records,
                r.size,
                r.records_per_sec(),
                r.records_per_sec() * r.size as f64 / 1e6,
                lat,
                cpu,
                rss.join(" / ")
            );
        }
    }
    Ok(())
}
