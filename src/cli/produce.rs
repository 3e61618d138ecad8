//! `herald produce`: stdin lines to records, sent in batches with acknowledgements counted.

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use tokio::sync::{mpsc, oneshot};

use crate::client::{self, BatchAck, Client};
use crate::error::Error;
use crate::types::Offset;
use crate::wire::{Header, Record};

use super::{plural, shutdown_on_signal, topic_name, valid_topic, INTERRUPTED_EXIT};

#[derive(Args, Debug)]
pub(super) struct ProduceArgs {
    /// Topic name.
    #[arg(value_parser = valid_topic)]
    topic: String,
    /// Key of every record.
    #[arg(short, long)]
    key: Option<String>,
    /// Header of every record, as NAME=VALUE (repeatable).
    #[arg(short = 'H', long = "header", value_parser = parse_header)]
    headers: Vec<Header>,
    /// Stop after N records.
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Batches in flight.
    #[arg(long, default_value_t = client::DEFAULT_INFLIGHT)]
    inflight: usize,
}

fn parse_header(s: &str) -> Result<Header, String> {
    let (name, value) = s.split_once('=').ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))?;
    Ok(Header { name: name.to_string(), value: value.as_bytes().to_vec() })
}

/// How long an interrupted `produce` still waits for the acknowledgements of what it sent.
const INTERRUPTED_ACK_WAIT: Duration = Duration::from_secs(5);

/// Reads stdin in the background and hands over batches of lines. A batch holds whatever
/// one read returned (so an interactive line goes out at once, and a pipe fills batches).
fn read_stdin_batches(
    template: Record,
    limit: Option<u64>,
    max_record_bytes: usize,
    tx: mpsc::Sender<Result<Vec<Record>, Error>>,
) {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut carry: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut taken = 0u64;
    let mut batch: Vec<Record> = Vec::new();
    let mut batch_bytes = 0usize;
    let make = |line: &[u8]| {
        let mut r = template.clone();
        r.payload = line.to_vec();
        r
    };
    'read: loop {
        if limit.is_some_and(|l| taken >= l) {
            break;
        }
        let n = match input.read(&mut chunk) {
            Ok(0) => {
                if !carry.is_empty() {
                    let line = std::mem::take(&mut carry);
                    batch.push(make(&line));
                }
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.blocking_send(Err(Error::invalid(format!("reading stdin: {e}"))));
                break;
            }
        };
        let mut data = &chunk[..n];
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            let line: &[u8] = if carry.is_empty() {
                &data[..pos]
            } else {
                carry.extend_from_slice(&data[..pos]);
                &carry
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let record = make(line);
            carry.clear();
            data = &data[pos + 1..];
            if record.encoded_size() > max_record_bytes {
                let err = Error::RecordTooLarge {
                    index: taken as u32,
                    size: record.encoded_size() as u64,
                    limit: max_record_bytes as u64,
                    enforced_by: "the client (the topic's max_record_bytes)".into(),
                };
                if tx.blocking_send(Err(err)).is_err() {
                    return;
                }
            } else {
                batch_bytes += record.encoded_size();
                batch.push(record);
            }
            taken += 1;
            if batch.len() >= client::MAX_BATCH_RECORDS || batch_bytes >= client::MAX_BATCH_BYTES {
                if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                    return;
                }
                batch_bytes = 0;
            }
            if limit.is_some_and(|l| taken >= l) {
                break 'read;
            }
        }
        carry.extend_from_slice(data);
        if !batch.is_empty() {
            if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                return;
            }
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
}

pub(super) async fn produce(client: Arc<Client>, args: ProduceArgs) -> Result<ExitCode> {
    let topic = topic_name(&args.topic)?;
    let info = client.lookup(&topic).await?;
    let template = Record {
        key: args.key.map(|k| k.into_bytes()).unwrap_or_default(),
        headers: args.headers,
        payload: Vec::new(),
    };
    let (tx, mut batches) = mpsc::channel(4);
    let limit = args.count;
    let max = info.config.max_record_bytes as usize;
    std::thread::spawn(move || read_stdin_batches(template, limit, max, tx));

    let producer = client.producer(topic.clone(), args.inflight);
    let (acks_tx, mut acks_rx) =
        mpsc::unbounded_channel::<(usize, oneshot::Receiver<Result<BatchAck, Error>>)>();
    let collector = tokio::spawn(async move {
        let (mut acked, mut failed, mut first, mut last) = (0u64, 0u64, None::<Offset>, None::<Offset>);
        let mut errors: Vec<String> = Vec::new();
        while let Some((n, rx)) = acks_rx.recv().await {
            match rx.await {
                Ok(Ok(ack)) => {
                    acked += ack.count as u64;
                    if ack.count > 0 {
                        first.get_or_insert(ack.base);
                        last = Some(ack.base + ack.count as u64 - 1);
                    }
                }
                Ok(Err(e)) => {
                    failed += n as u64;
                    errors.push(e.to_string());
                }
                Err(_) => {
                    failed += n as u64;
                    errors.push("the producer stopped before the batch was acknowledged".into());
                }
            }
        }
        (acked, failed, first, last, errors)
    });
    let mut rejected = 0u64;
    let mut rejections = Vec::new();
    // Ctrl-C stops reading input; what was sent is still waited for (a while) and counted.
    let stop = shutdown_on_signal();
    loop {
        let batch = tokio::select! {
            b = batches.recv() => b,
            _ = stop.cancelled() => None,
        };
        let Some(batch) = batch else { break };
        match batch {
            Ok(records) => {
                let n = records.len();
                let rx = producer.send(records).await?;
                let _ = acks_tx.send((n, rx));
            }
            Err(e) => {
                rejected += 1;
                if rejections.len() < 5 {
                    rejections.push(e.to_string());
                }
            }
        }
    }
    drop(acks_tx);
    let interrupted = stop.is_cancelled();
    let drained = async {
        producer.close().await;
        collector.await
    };
    let (acked, failed, first, last, mut errors) = if interrupted {
        match tokio::time::timeout(INTERRUPTED_ACK_WAIT, drained).await {
            Ok(outcome) => outcome?,
            Err(_) => {
                eprintln!(
                    "interrupted: gave up waiting for acknowledgements after {INTERRUPTED_ACK_WAIT:?}; records sent but not acknowledged may or may not be stored"
                );
                return Ok(ExitCode::from(INTERRUPTED_EXIT));
            }
        }
    } else {
        drained.await?
    };
    errors.extend(rejections);
    errors.dedup();
    for e in errors.iter().take(5) {
        eprintln!("error: {e}");
    }
    let range = match (first, last) {
        (Some(a), Some(b)) => format!(" (offsets {a}..{b})"),
        _ => String::new(),
    };
    eprintln!("produced {acked} {} to {topic}{range}", plural(acked, "record"));
    if interrupted {
        eprintln!("interrupted: input after these was not read");
        return Ok(ExitCode::from(INTERRUPTED_EXIT));
    }
    let not_acked = failed + rejected;
    if not_acked > 0 {
        eprintln!("error: {not_acked} records were not acknowledged");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
