//! Produces records to a topic with the library's pipelined, retrying producer.
//!
//! ```sh
//! make run                                  # a dev cluster, in another terminal
//! herald topic create greetings
//! cargo run --example produce -- greetings 1000
//! ```
//!
//! `HERALD_NAMING` and `HERALD_CERTS` point it elsewhere, as for the CLI. Each `send` queues
//! one batch and gives a receiver that resolves once the batch is committed (fsynced on a
//! majority of the topic's replicas); a batch is retried on failover with the same producer
//! id and sequence, so a retry never stores a second copy.

use std::path::PathBuf;

use herald::client::Client;
use herald::types::{NamingAddrs, TopicName};
use herald::wire::{Header, Record};

/// Records per batch: one round of acknowledgement for this many records.
const BATCH: usize = 100;
/// Batches the producer keeps in flight before `send` waits.
const IN_FLIGHT: usize = 8;

/// The naming group `herald dev` starts.
const DEV_NAMING: &str = "127.0.0.1:7400,127.0.0.1:7410,127.0.0.1:7420";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let topic = TopicName::new(args.next().unwrap_or_else(|| "greetings".into()))?;
    let count: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1000);
    // Where `herald dev` (`make run`) starts its naming group, as the CLI's default.
    let naming = std::env::var("HERALD_NAMING").unwrap_or_else(|_| DEV_NAMING.into());
    let naming: NamingAddrs = naming.parse().map_err(anyhow::Error::msg)?;
    let certs = PathBuf::from(std::env::var("HERALD_CERTS").unwrap_or_else(|_| "certs".into()));

    let client = Client::new(naming, &certs)?;
    let producer = client.producer(topic.clone(), IN_FLIGHT);
    let mut acks = Vec::new();
    for start in (0..count).step_by(BATCH) {
        let batch = (start..(start + BATCH).min(count))
            .map(|i| Record {
                key: format!("k{}", i % 10).into_bytes(),
                headers: vec![Header { name: "source".into(), value: b"example".to_vec() }],
                payload: format!("hello {i}").into_bytes(),
            })
            .collect();
        acks.push(producer.send(batch).await?);
    }
    let mut stored = 0u64;
    for ack in acks {
        let ack = ack.await??;
        stored += u64::from(ack.count);
        if ack.duplicate {
            println!("batch at offset {} was a retry of a stored one", ack.base);
        }
    }
    producer.close().await;
    client.close().await;
    println!("{stored} records committed to {topic}");
    Ok(())
}
