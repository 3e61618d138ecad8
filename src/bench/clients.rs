//! `herald bench clients`: many client connections to one topic server, then a reconnect
//! storm (matrix F22). Half the connections produce and half consume, each on its own topic,
//! every topic led by the same server; that server's RSS before and after they connect gives
//! the memory per connection. Then it is killed: every client loses its leader at once, asks
//! the naming group again and must resume at the new leader. Reported: how long resuming
//! took (median, p99, the last), how many questions about leaders (`LookupTopic`,
//! `AwaitLeader`) the naming group answered for it, and its
//! CPU meanwhile. A client that does not resume fails the run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{progress, rounded, rss_kb, total_cpu, BenchArgs, Outcome, Target};
use crate::certs::{self, CertRole};
use crate::client::Client;
use crate::types::{ServerId, StartFrom, SubscriptionName, TopicName, MAX_TOPICS_PER_REQUEST};
use crate::wire::{Record, TopicConfig};

/// The server every client connects to (it leads all their topics) and the one killed.
const TARGET: ServerId = 1;

/// How long the clients may take to make their first request each: a thousand handshakes on
/// a loaded two-core machine take seconds, not minutes.
const CONNECT_DEADLINE: Duration = Duration::from_secs(120);

/// How long every client may take to resume after the kill: a new leader is elected within a
/// few leases; a client that has not resumed long after that is stuck.
const RESUME_DEADLINE: Duration = Duration::from_secs(60);

/// Clients making their first request at once. A fleet ramps up; a thousand TLS handshakes
/// in the same millisecond on a two-core machine that also runs the cluster measure the
/// machine, not Herald (the storm, where every client is already connected, is the test).
const CONNECTING_AT_ONCE: usize = 64;

/// How long a consumer's poll waits for records.
const POLL_WAIT: Duration = Duration::from_secs(1);

/// How long the connected clients run before the target's RSS is read, so the figure holds
/// steady-state buffers, not only handshakes.
const STEADY: Duration = Duration::from_secs(5);

/// What every client task shares with the run: a stop signal, the instant of the kill, and
/// counts of who has started and who has resumed.
struct Shared {
    /// Microseconds since `epoch` are stamped into each record, so a consumer knows a record
    /// was produced after the kill (only a new leader can have stored it).
    epoch: Instant,
    killed_at_us: OnceLock<u64>,
    started: AtomicUsize,
    resumed: AtomicUsize,
    /// Each client's time from the kill to resuming, in microseconds (0: not yet).
    resume_us: Vec<AtomicU64>,
    /// Records consumed, and records a consumer was given below its committed cursor (a
    /// cursor going backwards).
    consumed: AtomicU64,
    backwards: AtomicU64,
    /// Held by the clients making their first request ([`CONNECTING_AT_ONCE`]).
    connecting: tokio::sync::Semaphore,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Client `i` saw a record stamped `stamp` stored or read: it has resumed if the record
    /// was produced after the kill.
    fn saw(&self, i: usize, stamp: u64) {
        let Some(&killed) = self.killed_at_us.get() else { return };
        if stamp > killed && self.resume_us[i].load(Ordering::Relaxed) == 0 {
            let took = self.now_us().saturating_sub(killed).max(1);
            if self.resume_us[i].compare_exchange(0, took, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                self.resumed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub async fn bench_clients(t: &mut Target, a: &BenchArgs) -> Result<Outcome> {
    let Some(cluster) = t.cluster.as_mut() else {
        bail!("`bench clients` kills a server, so it only runs against its own cluster: add --dev");
    };
    if a.replicas < 2 {
        bail!("`bench clients` kills the server the clients use: their topics need --replicas 2 or more");
    }
    let pairs = (a.connections as usize / 2).max(1);
    let connections = pairs * 2;
    let client = cluster.client()?;
    let topics = topics_led_by(&client, TARGET, pairs, a.replicas).await?;
    let sub = SubscriptionName::new("bench")?;
    for topic in &topics {
        client.create_subscription(topic, &sub, StartFrom::Earliest, false).await?;
    }
    let target_pid = cluster.servers.iter().find(|(id, _, _)| *id == TARGET).context("target")?.2.id();
    let rss_before = rss_kb(target_pid).context("target RSS")?;

    let identity = certs::load(&cluster.certs, CertRole::Client)?;
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        killed_at_us: OnceLock::new(),
        started: AtomicUsize::new(0),
        resumed: AtomicUsize::new(0),
        resume_us: (0..connections).map(|_| AtomicU64::new(0)).collect(),
        consumed: AtomicU64::new(0),
        backwards: AtomicU64::new(0),
        connecting: tokio::sync::Semaphore::new(CONNECTING_AT_ONCE),
    });
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let bar = progress(connections as u64, "connect");
    let connect_started = Instant::now();
    for (i, topic) in topics.iter().enumerate() {
        let producer = Client::with_identity(cluster.naming_addrs.clone(), &identity)?;
        let consumer = Client::with_identity(cluster.naming_addrs.clone(), &identity)?;
        let (shared_p, shared_c) = (shared.clone(), shared.clone());
        let (stop_p, stop_c) = (stop.clone(), stop.clone());
        let interval = Duration::from_millis(a.interval_ms);
        let size = a.size.max(8);
        tasks.spawn(produce(producer, topic.clone(), 2 * i, size, interval, shared_p, stop_p));
        tasks.spawn(consume(consumer, topic.clone(), sub.clone(), 2 * i + 1, shared_c, stop_c));
    }
    while shared.started.load(Ordering::Relaxed) < connections {
        bar.set_position(shared.started.load(Ordering::Relaxed) as u64);
        if connect_started.elapsed() > CONNECT_DEADLINE {
            bail!(
                "only {} of {connections} clients made a first request in {CONNECT_DEADLINE:?}",
                shared.started.load(Ordering::Relaxed)
            );
        }
        if let Some(Ok(Err(e))) = tasks.try_join_next() {
            bail!("a client failed before the storm: {e:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let cpu_steady = total_cpu(&[target_pid]);
    tokio::time::sleep(STEADY).await;
    let steady_cpu = (total_cpu(&[target_pid]) - cpu_steady) / STEADY.as_secs_f64() * 100.0;
    let rss_after = rss_kb(target_pid).context("target RSS")?;
    let per_connection_kb = rss_after.saturating_sub(rss_before) as f64 / connections as f64;
    eprintln!(
        "{connections} clients ({pairs} producers, {pairs} consumers, one topic each) connected to server {TARGET} in {connect_secs:.1} s; its RSS {} -> {} MB ({per_connection_kb:.0} KB per connection); its CPU {steady_cpu:.0} % of a core at {} records/s",
        rss_before / 1024,
        rss_after / 1024,
        pairs as u64 * 1000 / a.interval_ms.max(1),
    );

    // The storm: every client loses its leader at the same instant.
    let naming_pids: Vec<u32> = cluster.naming.iter().map(|n| n.3.id()).collect();
    let lookups_before = naming_questions(&cluster.naming_metrics).await;
    let naming_cpu_before = total_cpu(&naming_pids);
    let _ = shared.killed_at_us.set(shared.now_us());
    let killed = Instant::now();
    cluster.kill(TARGET);
    let bar = progress(connections as u64, "resume");
    while shared.resumed.load(Ordering::Relaxed) < connections && killed.elapsed() < RESUME_DEADLINE {
        bar.set_position(shared.resumed.load(Ordering::Relaxed) as u64);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish_and_clear();
    let storm_secs = killed.elapsed().as_secs_f64();
    let lookups = naming_questions(&cluster.naming_metrics).await.saturating_sub(lookups_before);
    let naming_cpu = (total_cpu(&naming_pids) - naming_cpu_before) / storm_secs * 100.0;
    let _ = stop_tx.send(true);
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::debug!("a client stopped with {e:#}");
        }
    }
    let resumed = shared.resumed.load(Ordering::Relaxed);
    // Producers are the even clients, consumers the odd ones.
    let all = resume_quantiles(&shared.resume_us, |_| true);
    let producers = resume_quantiles(&shared.resume_us, |i| i % 2 == 0);
    let consumers = resume_quantiles(&shared.resume_us, |i| i % 2 == 1);
    eprintln!(
        "storm: server {TARGET} killed; {resumed} of {connections} clients resumed at the new leaders in {} (producers {}, consumers {}); the naming group answered {lookups} questions about leaders ({:.1} per client), using {naming_cpu:.0} % of a core over the {storm_secs:.1} s",
        all.text(),
        producers.text(),
        consumers.text(),
        lookups as f64 / connections as f64,
    );
    let backwards = shared.backwards.load(Ordering::Relaxed);
    if backwards > 0 {
        bail!("{backwards} records were read below their subscription's committed cursor");
    }
    if resumed < connections {
        bail!(
            "{} of {connections} clients did not resume within {RESUME_DEADLINE:?} of the kill",
            connections - resumed
        );
    }
    let details = json!({
        "connections": connections,
        "producers": pairs,
        "consumers": pairs,
        "connect_secs": rounded(connect_secs, 2),
        "target_rss_mb_before": rounded(rss_before as f64 / 1024.0, 1),
        "target_rss_mb_after": rounded(rss_after as f64 / 1024.0, 1),
        "rss_kb_per_connection": rounded(per_connection_kb, 1),
        "target_cpu_percent_connected": rounded(steady_cpu, 1),
        "storm": {
            "resumed": resumed,
            "resume_ms": all.json(),
            "producers_resume_ms": producers.json(),
            "consumers_resume_ms": consumers.json(),
            "naming_questions": lookups,
            "naming_questions_per_client": rounded(lookups as f64 / connections as f64, 2),
            "naming_cpu_percent": rounded(naming_cpu, 1),
        },
        "consumed": shared.consumed.load(Ordering::Relaxed),
    });
    Ok(Outcome {
        workload: "clients".into(),
        replicas: a.replicas,
        size: a.size.max(8),
        seconds: storm_secs,
        extra: Some(details),
        ..Outcome::default()
    })
}

/// Median, p99 and last of the resume times (ms) of the clients `pick` selects.
struct Quantiles(Option<(f64, f64, f64)>);

fn resume_quantiles(resume_us: &[AtomicU64], pick: impl Fn(usize) -> bool) -> Quantiles {
    let mut times: Vec<f64> = (0..resume_us.len())
        .filter(|i| pick(*i))
        .map(|i| resume_us[i].load(Ordering::Relaxed))
        .filter(|t| *t > 0)
        .map(|t| t as f64 / 1000.0)
        .collect();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Quantiles((!times.is_empty()).then(|| (at(0.5), at(0.99), times[times.len() - 1])))
}

impl Quantiles {
    fn text(&self) -> String {
        match self.0 {
            Some((p50, p99, last)) => format!("median {p50:.0} ms, p99 {p99:.0} ms, last {last:.0} ms"),
            None => "none".into(),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self.0 {
            Some((p50, p99, last)) => {
                json!({ "p50": rounded(p50, 1), "p99": rounded(p99, 1), "last": rounded(last, 1) })
            }
            None => serde_json::Value::Null,
        }
    }
}

/// Creates topics until `count` of them are led by `server` (placement spreads leaders over
/// the live servers, so about one in three); returns those.
async fn topics_led_by(
    client: &Client,
    server: ServerId,
    count: usize,
    replicas: u32,
) -> Result<Vec<TopicName>> {
    let run = fastrand::u32(..);
    let mut mine = Vec::new();
    let mut made = 0usize;
    while mine.len() < count {
        let round = ((count - mine.len()) * 3 + 16).min(MAX_TOPICS_PER_REQUEST);
        let names: Vec<TopicName> = (made..made + round)
            .map(|i| TopicName::new(format!("clients-{run:08x}-{i:05}")))
            .collect::<Result<_, _>>()?;
        made += names.len();
        let created = client.create_topics(&names, replicas, &TopicConfig::default()).await?;
        mine.extend(created.into_iter().filter(|t| t.leader == server).map(|t| t.name));
        if made > count * 10 + MAX_TOPICS_PER_REQUEST {
            bail!("server {server} leads too few of the {made} topics created ({} of {count})", mine.len());
        }
    }
    mine.truncate(count);
    Ok(mine)
}

/// One producer on its own connection: a one-record batch every `interval`, stamped with
/// the time it was sent. Resumed once a record sent after the kill is acked.
async fn produce(
    client: Arc<Client>,
    topic: TopicName,
    i: usize,
    size: usize,
    interval: Duration,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    // Held until the first request is answered.
    let mut permit = Some(shared.connecting.acquire().await?);
    let producer = client.producer(topic, 1);
    let mut first = true;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Spread the first sends over one interval, as independent clients would be.
    tokio::time::sleep(interval.mul_f64(fastrand::f64())).await;
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let stamp = shared.now_us();
        let mut payload = vec![b'x'; size];
        payload[..8].copy_from_slice(&stamp.to_le_bytes());
        let ack = producer.send(vec![Record { payload, ..Record::default() }]).await?;
        let answer = tokio::select! {
            answer = ack => answer,
            _ = stop.changed() => break,
        };
        match answer {
            Ok(Ok(_)) => {
                if std::mem::take(&mut first) {
                    shared.started.fetch_add(1, Ordering::Relaxed);
                    drop(permit.take());
                }
                shared.saw(i, stamp);
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => bail!("the producer stopped"),
        }
    }
    drop(producer);
    client.close().await;
    Ok(())
}

/// One consumer on its own connection, reading its topic through `sub` with acks. Resumed
/// once it reads a record produced after the kill.
async fn consume(
    client: Arc<Client>,
    topic: TopicName,
    sub: SubscriptionName,
    i: usize,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    // Held until the first request is answered.
    let mut permit = Some(shared.connecting.acquire().await?);
    let mut consumer = client.consumer(topic, sub, StartFrom::Earliest).await?;
    // `committed`: the cursor as of the last answered poll (its ack rode in front of it).
    let (mut first, mut ack, mut committed) = (true, None, 0);
    while !*stop.borrow() {
        let records = tokio::select! {
            records = consumer.poll(100, POLL_WAIT, ack) => records?,
            _ = stop.changed() => break,
        };
        if std::mem::take(&mut first) {
            shared.started.fetch_add(1, Ordering::Relaxed);
            drop(permit.take());
        }
        committed = committed.max(ack.unwrap_or(0));
        // Redelivery from the durable cursor after a failover is allowed; a record below a
        // committed cursor is not.
        let behind = records.iter().filter(|r| r.offset < committed).count();
        shared.backwards.fetch_add(behind as u64, Ordering::Relaxed);
        for r in &records {
            let stamp = u64::from_le_bytes(r.record.payload[..8].try_into().unwrap_or_default());
            shared.saw(i, stamp);
        }
        shared.consumed.fetch_add(records.len() as u64, Ordering::Relaxed);
        if let Some(last) = records.last() {
            ack = Some(last.offset + 1);
        }
    }
    client.close().await;
    Ok(())
}

/// Questions about topics' leaders (`LookupTopic`, `AwaitLeader`) the naming members
/// answered, summed over those that answer a scrape.
async fn naming_questions(metrics: &[SocketAddr]) -> u64 {
    let mut total = 0.0;
    for addr in metrics {
        let Ok(body) = scrape(*addr).await else { continue };
        total += body
            .lines()
            .filter(|l| l.starts_with("herald_requests_total{"))
            .filter(|l| l.contains("operation=\"LookupTopic\"") || l.contains("operation=\"AwaitLeader\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    total as u64
}

/// The body of `GET /metrics` at `addr`.
async fn scrape(addr: SocketAddr) -> Result<String> {
    let fetch = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").await?;
        let mut response = String::new();
        conn.read_to_string(&mut response).await?;
        Ok::<_, anyhow::Error>(response)
    };
    let response =
        tokio::time::timeout(Duration::from_secs(5), fetch).await.context("metrics timed out")??;
    let (_, body) = response.split_once("\r\n\r\n").context("not an HTTP response")?;
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_resumes_once_on_a_record_made_after_the_kill() {
        let shared = Shared {
            epoch: Instant::now(),
            killed_at_us: OnceLock::new(),
            started: AtomicUsize::new(0),
            resumed: AtomicUsize::new(0),
            resume_us: (0..2).map(|_| AtomicU64::new(0)).collect(),
            consumed: AtomicU64::new(0),
            backwards: AtomicU64::new(0),
            connecting: tokio::sync::Semaphore::new(1),
        };
        shared.saw(0, 5);
        assert_eq!(shared.resumed.load(Ordering::Relaxed), 0, "no kill yet");
        shared.killed_at_us.set(10).unwrap();
        shared.saw(0, 9);
        assert_eq!(shared.resumed.load(Ordering::Relaxed), 0, "made before the kill");
        shared.saw(0, 11);
        shared.saw(0, 12);
        assert_eq!(shared.resumed.load(Ordering::Relaxed), 1, "counted once");
        assert!(shared.resume_us[0].load(Ordering::Relaxed) > 0);
        assert_eq!(shared.resume_us[1].load(Ordering::Relaxed), 0);
    }
}
