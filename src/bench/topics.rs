//! `herald bench topics`: many topics on one cluster. Creates `--topics` topics in batches
//! and reports the creation rate, how evenly leaders spread, what idle topics cost (CPU of
//! every process over `--idle-secs`, RSS per server), then produce throughput on one topic
//! against `--producers` topics at once (the fairness of the slowest), consume throughput
//! with `--consumers`, and the deletion rate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use super::{cpu_by_role, produce_records, progress, rounded, BenchArgs, Outcome, Target};
use crate::client::Client;
use crate::types::{StartFrom, SubscriptionName, TopicName};
use crate::wire::TopicConfig;

/// How long idle topics settle before their CPU is measured: leaders ready, first heartbeats
/// done, and every follower's fetch parked (one idle fetch wait, and a margin).
const IDLE_SETTLE: Duration = Duration::from_secs(crate::replica::REPLICA_FETCH_WAIT.as_secs() + 5);

pub async fn bench_topics(t: &Target, a: &BenchArgs) -> Result<Outcome> {
    let client = &t.client;
    let run = fastrand::u32(..);
    let names: Vec<TopicName> =
        (0..a.topics).map(|i| TopicName::new(format!("bench-{run:08x}-{i:05}"))).collect::<Result<_, _>>()?;
    let started = Instant::now();
    let bar = progress(names.len() as u64, "create");
    for chunk in names.chunks(crate::types::MAX_TOPICS_PER_REQUEST) {
        client.create_topics(chunk, a.replicas, &TopicConfig::default()).await?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let create_secs = started.elapsed().as_secs_f64();
    let create_rate = names.len() as f64 / create_secs.max(1e-9);
    eprintln!(
        "created {} topics of {} replicas in {create_secs:.1} s ({create_rate:.0}/s)",
        names.len(),
        a.replicas
    );

    let servers = client.list_servers().await?;
    let leaders: Vec<u32> = servers.iter().filter(|s| s.alive).map(|s| s.leaders).collect();
    let even = names.len() as f64 / leaders.len().max(1) as f64;
    let (min, max) = (leaders.iter().min().copied().unwrap_or(0), leaders.iter().max().copied().unwrap_or(0));
    eprintln!("leaders per server: {leaders:?} (even: {even:.0}; min {min}, max {max})");

    tokio::time::sleep(IDLE_SETTLE).await;
    let pids = t.pids();
    let before = cpu_by_role(&pids);
    let idle = Duration::from_secs(a.idle_secs);
    tokio::time::sleep(idle).await;
    // Split by what each process runs, to show where the floor is: naming members or servers.
    let idle_by_role: BTreeMap<String, f64> = cpu_by_role(&pids)
        .into_iter()
        .map(|(role, secs)| {
            let used = secs - before.get(&role).copied().unwrap_or(secs);
            (role, used / idle.as_secs_f64() * 100.0)
        })
        .collect();
    let idle_cpu: f64 = idle_by_role.values().sum();
    let rss = t.rss();
    eprintln!(
        "idle: {idle_cpu:.1} % of one core (all {} processes, over {} s: {}); RSS per server {}",
        pids.len(),
        a.idle_secs,
        idle_by_role.iter().map(|(role, p)| format!("{role} {p:.1} %")).collect::<Vec<_>>().join(", "),
        rss.iter().map(|(n, mb)| format!("{n} {mb:.0} MB")).collect::<Vec<_>>().join(", ")
    );

    let mut details = json!({
        "topics": names.len(),
        "replicas": a.replicas,
        "create_secs": rounded(create_secs, 2),
        "create_per_sec": rounded(create_rate, 0),
        "leaders_per_server": leaders,
        "leaders_min_over_even": rounded(min as f64 / even.max(1e-9), 3),
        "leaders_max_over_even": rounded(max as f64 / even.max(1e-9), 3),
        "idle_cpu_percent": rounded(idle_cpu, 2),
        "idle_cpu_percent_per_1000_topics": rounded(idle_cpu * 1000.0 / names.len().max(1) as f64, 3),
        "idle_cpu_percent_by_role": idle_by_role.iter().map(|(r, p)| (r.clone(), json!(rounded(*p, 2)))).collect::<serde_json::Map<_, _>>(),
        "server_rss_mb": rss.iter().map(|(n, mb)| (n.clone(), json!(rounded(*mb, 1)))).collect::<serde_json::Map<_, _>>(),
    });

    // One topic past the busy ones is the single-topic figure's: the cluster may be full.
    let producers = a.producers.min(names.len().saturating_sub(1));
    if producers > 0 {
        let per_topic = (a.records / producers as u64).max(1);
        let sub = SubscriptionName::new("bench")?;
        let busy = &names[..producers];
        for topic in busy {
            client.create_subscription(topic, &sub, StartFrom::Earliest, false).await?;
        }
        // The single-topic figure in the same run: the same records through one topic.
        let single = names[producers].clone();
        client.create_subscription(&single, &sub, StartFrom::Earliest, false).await?;
        let bar = progress(per_topic * producers as u64, "one topic");
        let (_, one_elapsed) =
            produce_records(client, &single, per_topic * producers as u64, a.size, a.inflight, &bar).await?;
        bar.finish_and_clear();
        let one_rate = (per_topic * producers as u64) as f64 / one_elapsed.as_secs_f64();

        let bar = progress(per_topic * producers as u64, "produce");
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for topic in busy {
            let topic = topic.clone();
            let (client, bar, size, inflight) = (client.clone(), bar.clone(), a.size, a.inflight.min(4));
            tasks.spawn(async move {
                let (_, elapsed) = produce_records(&client, &topic, per_topic, size, inflight, &bar).await?;
                Ok::<f64, anyhow::Error>(per_topic as f64 / elapsed.as_secs_f64())
            });
        }
        let mut rates = Vec::new();
        while let Some(done) = tasks.join_next().await {
            rates.push(done??);
        }
        bar.finish_and_clear();
        let elapsed = started.elapsed().as_secs_f64();
        let aggregate = (per_topic * producers as u64) as f64 / elapsed;
        // Each topic had the same records to send, side by side: a fair cluster gives each
        // the same rate; the slowest against the mean says how unfair it was.
        let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
        let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
        eprintln!(
            "produce: one topic {one_rate:.0} records/s; {producers} topics together {aggregate:.0} records/s ({:.0} % of one topic); the slowest topic's rate {:.0} % of the mean topic's",
            aggregate / one_rate * 100.0,
            slowest / mean * 100.0
        );
        details["produce"] = json!({
            "producers": producers,
            "records": per_topic * producers as u64,
            "single_topic_per_sec": rounded(one_rate, 0),
            "aggregate_per_sec": rounded(aggregate, 0),
            "aggregate_over_single": rounded(aggregate / one_rate, 3),
            "slowest_over_mean_topic": rounded(slowest / mean, 3),
        });

        let consumers = a.consumers.clamp(1, producers);
        let bar = progress(per_topic * producers as u64, "consume");
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for k in 0..consumers {
            let mine: Vec<TopicName> = busy.iter().skip(k).step_by(consumers).cloned().collect();
            let (client, bar, sub) = (client.clone(), bar.clone(), sub.clone());
            tasks.spawn(async move {
                for topic in mine {
                    read_to_end(&client, &topic, &sub, per_topic, &bar).await?;
                }
                Ok::<(), anyhow::Error>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        bar.finish_and_clear();
        let consume_rate = (per_topic * producers as u64) as f64 / started.elapsed().as_secs_f64();
        eprintln!("consume: {consumers} consumers over {producers} topics {consume_rate:.0} records/s");
        details["consume"] = json!({ "consumers": consumers, "aggregate_per_sec": rounded(consume_rate, 0) });
    }

    let started = Instant::now();
    client.delete_topics(&names).await?;
    let delete_rate = names.len() as f64 / started.elapsed().as_secs_f64();
    eprintln!("deleted {} topics ({delete_rate:.0}/s)", names.len());
    details["delete_per_sec"] = json!(rounded(delete_rate, 0));

    Ok(Outcome {
        workload: "topics".into(),
        replicas: a.replicas,
        records: 0,
        size: a.size,
        seconds: create_secs,
        server_rss_mb: rss,
        extra: Some(details),
        ..Outcome::default()
    })
}

/// Reads `count` records of `topic` through `sub`, acknowledging as it goes.
async fn read_to_end(
    client: &Arc<Client>,
    topic: &TopicName,
    sub: &SubscriptionName,
    count: u64,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let mut consumer = client.consumer(topic.clone(), sub.clone(), StartFrom::Earliest).await?;
    let mut read = 0;
    while read < count {
        let records = consumer.poll(10_000, Duration::from_millis(500), None).await?;
        let Some(last) = records.last() else { continue };
        consumer.ack(last.offset + 1).await?;
        read += records.len() as u64;
        bar.inc(records.len() as u64);
    }
    consumer.release().await;
    Ok(())
}
