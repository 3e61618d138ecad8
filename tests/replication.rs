//! Replication on real processes: a topic on three replicas commits on a majority, every
//! replica ends up with the same records, and the leader reports each replica's position.

mod common;

use std::time::Duration;

use common::{produce_in_order, wait_for, Cluster};
use herald::types::{StartFrom, SubscriptionName, TopicName};
use herald::wire::{Role, TopicConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_commit_and_converge() {
    let cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = TopicName::new("rep").unwrap();
    let info = client.create_topic(&topic, 3, TopicConfig::default()).await.unwrap();
    assert_eq!(info.replicas.len(), 3);
    let sub = SubscriptionName::new("s").unwrap();
    client.create_subscription(&topic, &sub, StartFrom::Earliest, false).await.unwrap();

    assert_eq!(produce_in_order(&client, &topic, 100, 50).await, 5000);

    // The leader sees every follower caught up.
    let status = wait_for("followers to catch up", || async {
        let s = client.topic_status(&topic).await.ok()?;
        (s.replicas.len() == 3 && s.replicas.iter().all(|r| r.caught_up)).then_some(s)
    })
    .await;
    assert_eq!(status.commit, 5000);
    assert_eq!(status.replicas.iter().filter(|r| r.role == Role::Leader).count(), 1);

    // Consume everything and acknowledge: the log start moves on every replica.
    let mut consumer = client.consumer(topic.clone(), sub, StartFrom::Earliest).await.unwrap();
    let mut read = 0u64;
    while read < 5000 {
        let records = consumer.poll(10_000, Duration::from_secs(1), None).await.unwrap();
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.offset, read + i as u64);
        }
        read += records.len() as u64;
    }
    assert_eq!(consumer.ack(5000).await.unwrap(), 5000);
    let status = client.topic_status(&topic).await.unwrap();
    assert_eq!(status.log_start, 5000, "deleted once the cursor move is committed");
    client.close().await;
}
