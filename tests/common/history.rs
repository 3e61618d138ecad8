//! Workloads with a history checker: a producer recording what was acknowledged, a consumer
//! checking as it reads, and the check that every acked record was read once, in order.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald::client::{BatchAck, Client, ReadFrom};
use herald::types::{StartFrom, SubscriptionName, TopicName};
use herald::wire::Record;

use super::assert_history;

/// An acknowledged batch: when its ack arrived, the ack, and the batch's payloads.
pub type Acked = (Instant, BatchAck, Vec<String>);

/// A producer that sends `batches` batches of `size` numbered records in the background,
/// recording when each ack arrived.
pub struct Load {
    acks: Arc<Mutex<Vec<Acked>>>,
    task: tokio::task::JoinHandle<Vec<Result<BatchAck, herald::Error>>>,
}

impl Load {
    pub fn start(client: &Arc<Client>, topic: &TopicName, prefix: &str, batches: usize, size: usize) -> Load {
        let prefix = prefix.to_string();
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
                let payloads: Vec<String> = (0..size).map(|i| format!("{prefix}{b}-{i}")).collect();
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

    pub fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Waits for the load to finish; every batch must have been acknowledged.
    pub async fn finish(self) -> Vec<Acked> {
        let results = self.task.await.unwrap();
        for r in &results {
            assert!(r.is_ok(), "a batch failed for good: {r:?}");
        }
        Arc::try_unwrap(self.acks).unwrap().into_inner().unwrap()
    }
}

/// A producer that sends one batch of `size` numbered records every `every` until stopped,
/// each after the one before it was acknowledged, recording the acks: steady traffic from
/// one of many clients.
pub struct PacedLoad {
    acks: Arc<Mutex<Vec<Acked>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Result<(), herald::Error>>,
}

impl PacedLoad {
    pub fn start(
        client: &Arc<Client>,
        topic: &TopicName,
        prefix: &str,
        size: usize,
        every: Duration,
    ) -> PacedLoad {
        let (prefix, client) = (prefix.to_string(), client.clone());
        let producer = client.producer(topic.clone(), 1);
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (log, stopped) = (acks.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut b = 0;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let payloads: Vec<String> = (0..size).map(|i| format!("{prefix}{b}-{i}")).collect();
                let records =
                    payloads.iter().map(|p| Record { payload: p.clone().into_bytes(), ..Record::default() });
                let ack = producer.send(records.collect()).await?.await.expect("the producer answers")?;
                log.lock().unwrap().push((Instant::now(), ack, payloads));
                b += 1;
                tokio::time::sleep(every).await;
            }
            producer.close().await;
            client.close().await;
            Ok(())
        });
        PacedLoad { acks, stop, task }
    }

    /// The last ack so far.
    pub fn last_ack(&self) -> Option<BatchAck> {
        self.acks.lock().unwrap().last().map(|(_, ack, _)| *ack)
    }

    /// Stops after the batch in flight; every batch sent must have been acknowledged.
    pub async fn finish(self) -> Vec<Acked> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let result =
            tokio::time::timeout(super::DEADLINE, self.task).await.expect("the producer stops").unwrap();
        assert!(result.is_ok(), "a batch failed for good: {result:?}");
        Arc::try_unwrap(self.acks).unwrap().into_inner().unwrap()
    }
}

/// A consumer reading and acknowledging through a subscription while the test runs. It
/// checks, as it goes, that offsets strictly increase with no gap and that the committed
/// cursor never moves backwards.
pub struct Reader {
    want: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<(u64, String)>>,
}

impl Reader {
    pub async fn start(client: &Arc<Client>, topic: &TopicName, sub: &str) -> Reader {
        Self::start_reading(client, topic, sub, ReadFrom::Leader).await
    }

    /// A reader that reads from `from` (acks go to the leader either way).
    pub async fn start_reading(client: &Arc<Client>, topic: &TopicName, sub: &str, from: ReadFrom) -> Reader {
        let mut consumer = client
            .consumer(topic.clone(), SubscriptionName::new(sub).unwrap(), StartFrom::Earliest)
            .await
            .unwrap()
            .read_from(from);
        let want = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
        let target = want.clone();
        let task = tokio::spawn(async move {
            let mut read: Vec<(u64, String)> = Vec::new();
            let mut cursor = 0;
            while read.len() < target.load(std::sync::atomic::Ordering::Relaxed) {
                let records = consumer.poll(1000, Duration::from_millis(200), None).await.expect("poll");
                for r in records {
                    let expected = read.last().map_or(0, |(o, _)| o + 1);
                    assert_eq!(r.offset, expected, "the consumer sees every offset once, in order");
                    read.push((r.offset, String::from_utf8(r.record.payload).unwrap()));
                }
                if let Some((last, _)) = read.last() {
                    let now = consumer.ack(last + 1).await.expect("ack");
                    assert!(now >= cursor, "the cursor moved back from {cursor} to {now}");
                    cursor = now;
                }
            }
            read
        });
        Reader { want, task }
    }

    /// Waits until it has read `total` records; returns them.
    pub async fn finish(self, total: usize) -> Vec<(u64, String)> {
        self.want.store(total, std::sync::atomic::Ordering::Relaxed);
        tokio::time::timeout(super::DEADLINE, self.task).await.expect("the consumer keeps up").unwrap()
    }
}

/// A reader without a subscription (`Client::reader`) following the topic from offset 0
/// while the test runs. It checks, as it goes, that offsets strictly increase with no gap
/// and that it never missed records (a subscription must keep them for it to see all).
pub struct Watcher {
    want: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<(u64, String)>>,
}

impl Watcher {
    pub fn start(client: &Arc<Client>, topic: &TopicName) -> Watcher {
        let mut reader = client.reader(topic.clone(), 0);
        let want = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
        let target = want.clone();
        let task = tokio::spawn(async move {
            let mut read: Vec<(u64, String)> = Vec::new();
            while read.len() < target.load(std::sync::atomic::Ordering::Relaxed) {
                let records = reader.poll(1000, Duration::from_millis(200)).await.expect("read");
                assert_eq!(reader.take_skipped(), None, "nothing was deleted under the reader");
                for r in records {
                    let expected = read.last().map_or(0, |(o, _)| o + 1);
                    assert_eq!(r.offset, expected, "the reader sees every offset once, in order");
                    read.push((r.offset, String::from_utf8(r.record.payload).unwrap()));
                }
            }
            read
        });
        Watcher { want, task }
    }

    /// Waits until it has read `total` records; returns them.
    pub async fn finish(self, total: usize) -> Vec<(u64, String)> {
        self.want.store(total, std::sync::atomic::Ordering::Relaxed);
        tokio::time::timeout(super::DEADLINE, self.task).await.expect("the reader keeps up").unwrap()
    }
}

/// Checks the history: every acked record read once, in order; offsets dense; the acks'
/// offsets match where the records are.
pub fn check(read: &[(u64, String)], acks: &[Acked]) {
    let acked: Vec<String> = acks.iter().flat_map(|(_, _, p)| p.clone()).collect();
    assert_history(read, &acked, 0);
    assert_eq!(read.len(), acked.len(), "no duplicates from retries");
    for (_, ack, payloads) in acks {
        for (i, p) in payloads.iter().enumerate() {
            assert_eq!(&read[(ack.base + i as u64) as usize].1, p, "ack offsets match the log");
        }
    }
}
