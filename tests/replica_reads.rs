//! Consumers on every replica (issue "10,000 topics"; Kafka's fetch from follower, KIP-392),
//! on real processes: consumers reading from followers see every acked record once and in
//! order, across a kill -9 of the leader, and their cursors never move back.

mod common;

use std::net::SocketAddr;

use common::history::{check, Load, Reader};
use common::{replicated_topic, sample, wait_for, Cluster};
use herald::client::{replica_for, ReadFrom};
use herald::types::ServerId;

/// Fetches `server` answered without error, from its metrics.
fn fetches_served(cluster: &Cluster, server: ServerId) -> f64 {
    let text = cluster.scrape(Some(server));
    sample(&text, "herald_requests_total", r#"operation="Fetch",result="ok""#).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_on_followers_read_every_record_once_in_order_across_a_leader_kill() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "spread").await;
    let leader = cluster.leader_of(&topic).await;
    let addrs: Vec<(ServerId, SocketAddr)> =
        [1, 2, 3].into_iter().map(|s| (s, cluster.server_addr(s))).collect();
    let all: Vec<SocketAddr> = addrs.iter().map(|(_, a)| *a).collect();
    let followers: Vec<ServerId> = [1, 2, 3].into_iter().filter(|s| *s != leader).collect();
    // Two subscriptions whose replica is each follower.
    let mut names = Vec::new();
    for f in &followers {
        let addr = addrs.iter().find(|(s, _)| s == f).unwrap().1;
        let picked = (0..).map(|i| format!("r{i}")).filter(|n| replica_for(n, &all) == Some(addr)).take(2);
        names.extend(picked);
    }
    let before: Vec<f64> = followers.iter().map(|f| fetches_served(&cluster, *f)).collect();
    let mut readers = Vec::new();
    for name in &names {
        readers.push(Reader::start_reading(&client, &topic, name, ReadFrom::Replica).await);
    }
    let load = Load::start(&client, &topic, "b", 300, 20);
    wait_for("some acks", || async { (load.acked() >= 100).then_some(()) }).await;
    // The followers serve reads while the leader lives.
    wait_for("reads served by both followers", || async {
        let now: Vec<f64> = followers.iter().map(|f| fetches_served(&cluster, *f)).collect();
        now.iter().zip(&before).all(|(n, b)| n > b).then_some(())
    })
    .await;
    cluster.server(leader).kill();
    let acks = load.finish().await;
    // Each reader checked offsets (dense, once, in order) and that its cursor never moved
    // back as it went; together they read every acked record.
    for reader in readers {
        let read = reader.finish(6000).await;
        check(&read, &acks);
    }
    client.close().await;
}
