//! Reads a topic through a named, durable subscription and acknowledges what it processed.
//!
//! ```sh
//! cargo run --example consume -- greetings example-reader
//! ```
//!
//! The subscription is created at the topic's start if it does not exist; an existing one
//! resumes at its committed cursor, so running this twice reads each record once (at least
//! once after a crash: what was read but not yet acknowledged comes again). It stops after a
//! second with nothing new.

use std::path::PathBuf;
use std::time::Duration;

use herald::client::Client;
use herald::types::{NamingAddrs, StartFrom, SubscriptionName, TopicName};

/// Most records one poll returns.
const MAX_RECORDS: u32 = 500;
/// How long a poll waits for the first record; an empty poll ends the example.
const WAIT: Duration = Duration::from_secs(1);

/// The naming group `herald dev` starts.
const DEV_NAMING: &str = "127.0.0.1:7400,127.0.0.1:7410,127.0.0.1:7420";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let topic = TopicName::new(args.next().unwrap_or_else(|| "greetings".into()))?;
    let subscription = SubscriptionName::new(args.next().unwrap_or_else(|| "example-reader".into()))?;
    // Where `herald dev` (`make run`) starts its naming group, as the CLI's default.
    let naming = std::env::var("HERALD_NAMING").unwrap_or_else(|_| DEV_NAMING.into());
    let naming: NamingAddrs = naming.parse().map_err(anyhow::Error::msg)?;
    let certs = PathBuf::from(std::env::var("HERALD_CERTS").unwrap_or_else(|_| "certs".into()));

    let client = Client::new(naming, &certs)?;
    let mut consumer = client.consumer(topic.clone(), subscription, StartFrom::Earliest).await?;
    let mut read = 0u64;
    // Each poll acknowledges what the previous one returned (processed by then).
    let mut processed = None;
    loop {
        let records = consumer.poll(MAX_RECORDS, WAIT, processed).await?;
        let Some(last) = records.last() else { break };
        for r in &records {
            println!("{} {}", r.offset, String::from_utf8_lossy(&r.record.payload));
        }
        read += records.len() as u64;
        processed = Some(last.offset + 1);
        if let Some(evicted) = consumer.take_evicted() {
            eprintln!(
                "the backlog policy skipped {} records before this consumer read them",
                evicted.records
            );
        }
    }
    if let Some(next) = processed {
        consumer.ack(next).await?;
    }
    consumer.release().await;
    client.close().await;
    eprintln!("{read} records read from {topic}");
    Ok(())
}
