//! Idle topics park their followers' fetches on one poll per server pair (issue "10,000
//! topics"). On real processes: a parked topic wakes for new records and for a failover,
//! every acked record is read once and in order, and every replica catches up and learns
//! the commit point.

mod common;

use std::sync::Arc;

use common::{assert_history, read_all, replicated_topic, sample, wait_for, Cluster};
use herald::client::Client;
use herald::types::{ServerId, TopicName};
use herald::wire::Record;

/// Produces `n` records named `prefix-i` and waits for their acks.
async fn produce(client: &Arc<Client>, topic: &TopicName, prefix: &str, n: usize) -> Vec<String> {
    let producer = client.producer(topic.clone(), 4);
    let payloads: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let records = payloads.iter().map(|p| Record { payload: p.clone().into_bytes(), ..Record::default() });
    let ack = producer.send(records.collect()).await.unwrap();
    producer.close().await;
    let ack = ack.await.unwrap().unwrap();
    assert_eq!(ack.count as usize, n);
    payloads
}

/// Waits until `leader` holds `n` parked fetches.
async fn wait_parked(cluster: &Cluster, leader: ServerId, n: f64) {
    wait_for(&format!("{n} fetches parked on server {leader}"), || async {
        (sample(&cluster.scrape(Some(leader)), "herald_parked_fetches", "") == Some(n)).then_some(())
    })
    .await;
}

/// Waits until every running replica of `topic` stores `end` records and knows them
/// committed.
async fn wait_replicas_at(cluster: &Cluster, servers: &[ServerId], topic: &str, end: f64) {
    let labels = format!("topic=\"{topic}\"");
    for s in servers {
        wait_for(&format!("server {s} to hold and know committed {end} records"), || async {
            let text = cluster.scrape(Some(*s));
            let at = |metric| sample(&text, metric, &labels);
            (at("herald_log_end") == Some(end) && at("herald_commit_offset") == Some(end)).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_followers_wake_for_new_records_and_across_a_leader_kill() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "parked").await;
    let leader = cluster.leader_of(&topic).await;
    let mut acked = produce(&client, &topic, "before", 20).await;
    // Idle past the fetch wait: both followers park on the leader.
    wait_parked(&cluster, leader, 2.0).await;

    // An ack needs a follower's copy: the parked ones wake, fetch, and learn the commit.
    acked.extend(produce(&client, &topic, "woken", 20).await);
    wait_replicas_at(&cluster, &[1, 2, 3], "parked", 40.0).await;
    wait_parked(&cluster, leader, 2.0).await;

    // The leader dies with its followers parked on it: they wake, one is elected, and the
    // topic commits again.
    cluster.server(leader).kill();
    acked.extend(produce(&client, &topic, "after", 20).await);
    let new = cluster.leader_of(&topic).await;
    assert_ne!(new, leader);
    let survivors: Vec<ServerId> = [1, 2, 3].into_iter().filter(|s| *s != leader).collect();
    wait_replicas_at(&cluster, &survivors, "parked", 60.0).await;

    let read = read_all(&client, &topic, "check").await;
    assert_history(&read, &acked, 0);
    client.close().await;
}
