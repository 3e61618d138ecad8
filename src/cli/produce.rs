//! `herald produce`: input lines (or files) to records, sent in batches with their
//! acknowledgements counted; what the input holds is read in `input`.

use std::path::PathBuf;
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

use super::input::{self, InputMode, Item, Shape};
use super::{plural, shutdown_on_signal, topic_name, valid_topic, INTERRUPTED_EXIT};

#[derive(Args, Debug)]
pub(super) struct ProduceArgs {
    /// Topic name.
    #[arg(value_parser = valid_topic)]
    topic: String,
    /// Key of every record.
    #[arg(short, long, conflicts_with = "key_delimiter")]
    key: Option<String>,
    /// Header of every record, as NAME=VALUE (repeatable).
    #[arg(short = 'H', long = "header", value_parser = parse_header)]
    headers: Vec<Header>,
    /// Each line is KEY<DELIM>VALUE, split at the first DELIM (like kcat -K).
    #[arg(short = 'K', long, value_name = "DELIM", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    key_delimiter: Option<String>,
    /// How a stdin line becomes a record: `lines`, the line is the value; `json`, a JSON
    /// object as `consume --json` writes it: key, headers, value (a string, or any JSON,
    /// stored as its text), with `_base64` fields for bytes that are not UTF-8.
    #[arg(long, value_enum, default_value = "lines", conflicts_with = "key_delimiter")]
    input: InputMode,
    /// One record per file, the file's bytes its value (instead of stdin lines; repeatable).
    #[arg(long = "file", value_name = "PATH", conflicts_with_all = ["key_delimiter", "input", "count"])]
    files: Vec<PathBuf>,
    /// Skip input that cannot be a record (over the topic's record limit, not matching its
    /// schema, not JSON with --input json, no delimiter with --key-delimiter), naming each
    /// line; without it, the first such line stops the input (the lines before it are sent).
    #[arg(long)]
    skip_invalid: bool,
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

/// Input problems printed one by one; past these, only counted.
const SHOWN_PROBLEMS: usize = 5;

/// How long an interrupted `produce` still waits for the acknowledgements of what it sent.
const INTERRUPTED_ACK_WAIT: Duration = Duration::from_secs(5);

pub(super) async fn produce(client: Arc<Client>, args: ProduceArgs) -> Result<ExitCode> {
    let topic = topic_name(&args.topic)?;
    let info = client.lookup(&topic).await?;
    let shape = Shape {
        template: Record {
            key: args.key.map(|k| k.into_bytes()).unwrap_or_default(),
            headers: args.headers,
            payload: Vec::new(),
        },
        mode: args.input,
        key_delimiter: args.key_delimiter.map(String::into_bytes),
        topic: topic.to_string(),
        config: info.config.clone(),
    };
    let (tx, mut items) = mpsc::channel(4);
    let (limit, stop_at_invalid) = (args.count, !args.skip_invalid);
    let what = if args.files.is_empty() { "line" } else { "file" };
    if args.files.is_empty() {
        std::thread::spawn(move || input::read_lines(shape, limit, stop_at_invalid, tx));
    } else {
        let files = args.files;
        std::thread::spawn(move || input::read_files(shape, files, stop_at_invalid, tx));
    }

    let producer = client.producer(topic.clone(), args.inflight);
    // Each batch sent: its records, the input lines (or files) they came from, its ack.
    type Sent = (u64, (u64, u64), oneshot::Receiver<Result<BatchAck, Error>>);
    // Bounded by the producer: `send` waits while `--inflight` batches are unacknowledged.
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel::<Sent>();
    let collector = tokio::spawn(async move {
        let (mut acked, mut failed, mut first, mut last) = (0u64, 0u64, None::<Offset>, None::<Offset>);
        let mut errors: Vec<String> = Vec::new();
        while let Some((n, (from, to), rx)) = acks_rx.recv().await {
            let error = match rx.await {
                Ok(Ok(ack)) => {
                    acked += ack.count as u64;
                    if ack.count > 0 {
                        first.get_or_insert(ack.base);
                        last = Some(ack.base + ack.count as u64 - 1);
                    }
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the producer stopped before the batch was acknowledged".into(),
            };
            failed += n;
            let at = if from == to { format!("{what} {from}") } else { format!("{what}s {from}-{to}") };
            errors.push(format!("{at}: {error}"));
        }
        (acked, failed, first, last, errors)
    });
    let (mut invalid, mut problems) = (0u64, Vec::new());
    // Where the input stopped at an invalid line (without --skip-invalid).
    let mut stopped_at = None;
    // Ctrl-C stops reading input; what was sent is still waited for (a while) and counted.
    let stop = shutdown_on_signal();
    loop {
        let item = tokio::select! {
            item = items.recv() => item,
            _ = stop.cancelled() => None,
        };
        match item {
            None => break,
            Some(Item::Batch { records, first, last }) => {
                let n = records.len() as u64;
                let rx = producer.send(records).await?;
                let _ = acks_tx.send((n, (first, last), rx));
            }
            Some(Item::Invalid { at, reason }) => {
                invalid += 1;
                if problems.len() < SHOWN_PROBLEMS {
                    problems.push(format!("{at}: {reason}"));
                }
                if stop_at_invalid {
                    stopped_at = Some(at);
                    break;
                }
            }
            Some(Item::Failed(e)) => {
                problems.push(e);
                stopped_at = Some("a read error".into());
                break;
            }
        }
    }
    drop((acks_tx, items));
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
    errors.dedup();
    for e in problems.iter().chain(errors.iter().take(SHOWN_PROBLEMS)) {
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
    if let Some(at) = &stopped_at {
        eprintln!(
            "stopped at {at}: the input before it was sent, none after it (fix it, or pass --skip-invalid to skip such input and send the rest)"
        );
    } else if invalid > 0 {
        eprintln!(
            "skipped {invalid} invalid {}{}",
            plural(invalid, what),
            if invalid as usize > problems.len() { " (the first shown)" } else { "" }
        );
    }
    if failed > 0 {
        eprintln!("error: {failed} records were not acknowledged");
    }
    // Skipping was asked for: what was skipped is reported, not a failure.
    if failed > 0 || stopped_at.is_some() {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
