//! Failover on real processes, checked against what was acknowledged: every acked record is
//! read, in order, once; replicas agree up to the commit offset.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{assert_history, wait_for, Cluster};
use herald::client::{BatchAck, Client};
use herald::types::{StartFrom, SubscriptionName, TopicName};
use herald::wire::{Record, TopicConfig};

/// Creates a three-replica topic with a subscription that holds every record.
async fn replicated_topic(client: &Arc<Client>, name: &str) -> TopicName {
    let topic = TopicName::new(name).unwrap();
    client.create_topic(&topic, 3, TopicConfig::default()).await.unwrap();
    let keep = SubscriptionName::new("keep").unwrap();
    client.create_subscription(&topic, &keep, StartFrom::Earliest, false).await.unwrap();
    topic
}

/// Reads the whole topic through a new subscription.
async fn read_all(client: &Arc<Client>, topic: &TopicName, sub: &str) -> Vec<(u64, String)> {
    let mut consumer = client
        .consumer(topic.clone(), SubscriptionName::new(sub).unwrap(), StartFrom::Earliest)
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        let records = consumer.poll(10_000, Duration::ZERO, None).await.unwrap();
        if records.is_empty() {
            break;
        }
        out.extend(records.into_iter().map(|r| (r.offset, String::from_utf8(r.record.payload).unwrap())));
    }
    out
}

/// An acknowledged batch: when its ack arrived, the ack, and the batch's payloads.
type Acked = (Instant, BatchAck, Vec<String>);

/// A producer that sends `batches` batches of `size` numbered records in the background,
/// recording when each ack arrived.
struct Load {
    acks: Arc<Mutex<Vec<Acked>>>,
    task: tokio::task::JoinHandle<Vec<Result<BatchAck, herald::Error>>>,
}

impl Load {
    fn start(client: &Arc<Client>, topic: &TopicName, batches: usize, size: usize) -> Load {
        let producer = client.producer(topic.clone(), 8);
        let acks = Arc::new(Mutex::new(Vec::new()));
        let log = acks.clone();
        let task = tokio::spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let collector = tokio::spawn(async move {
                let mut results = Vec::new();
                while let Some((payloads, rx)) = rx.recv().await {
                    let rx: tokio::sync::oneshot::Receiver<Result<BatchAck, herald::Error>> = rx;
                    let result = rx.await.unwrap();
                    if let Ok(ack) = &result {
                        log.lock().unwrap().push((Instant::now(), *ack, payloads));
                    }
                    results.push(result);
                }
                results
            });
            for b in 0..batches {
                let payloads: Vec<String> = (0..size).map(|i| format!("b{b}-{i}")).collect();
                let records =
                    payloads.iter().map(|p| Record { payload: p.clone().into_bytes(), ..Record::default() });
                let rx = producer.send(records.collect()).await.unwrap();
                tx.send((payloads, rx)).unwrap();
            }
            drop(tx);
            producer.close().await;
            collector.await.unwrap()
        });
        Load { acks, task }
    }

    fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Waits for the load to finish; every batch must have been acknowledged.
    async fn finish(self) -> Vec<Acked> {
        let results = self.task.await.unwrap();
        for r in &results {
            assert!(r.is_ok(), "a batch failed for good: {r:?}");
        }
        Arc::try_unwrap(self.acks).unwrap().into_inner().unwrap()
    }
}

/// Checks the history: every acked record read once, in order; offsets dense; the acks'
/// offsets match where the records are.
fn check(read: &[(u64, String)], acks: &[Acked]) {
    let acked: Vec<String> = acks.iter().flat_map(|(_, _, p)| p.clone()).collect();
    assert_history(read, &acked, 0);
    assert_eq!(read.len(), acked.len(), "no duplicates from retries");
    for (_, ack, payloads) in acks {
        for (i, p) in payloads.iter().enumerate() {
            assert_eq!(&read[(ack.base + i as u64) as usize].1, p, "ack offsets match the log");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_produce_loses_no_acked_record() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "failover").await;
    let old = cluster.leader_of(&topic).await;
    let load = Load::start(&client, &topic, 400, 25);
    wait_for("some acks", || async { (load.acked() >= 100).then_some(()) }).await;
    let killed_at = Instant::now();
    cluster.server(old).kill();
    let acks = load.finish().await;
    let first_after = acks.iter().map(|(t, _, _)| *t).filter(|t| *t > killed_at).min().unwrap();
    eprintln!(
        "failover: kill -9 of the leader to the first ack from the new leader: {:?}",
        first_after - killed_at
    );
    let new = cluster.leader_of(&topic).await;
    assert_ne!(new, old);

    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    // The two live replicas hold the same records up to the commit offset.
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|s| *s != old).collect();
    let a = cluster.replica_records(survivors[0], &topic, "keep").await;
    let b = cluster.replica_records(survivors[1], &topic, "keep").await;
    let common_len = a.len().min(b.len());
    assert_eq!(a[..common_len], b[..common_len], "replicas agree");
    client.close().await;
}
