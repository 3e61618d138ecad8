//! `herald consume`: records of a topic to stdout, through a subscription (or, with
//! `--offset`, `--tail` or `--from-time`, without one).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Args;
use serde_json::json;

use crate::client::{self, Client};
use crate::error::Error;
use crate::types::{Offset, StartFrom};
use crate::wire::StoredRecord;

use super::{
    format_ms, plural, shutdown_on_signal, subscription_name, topic_name, usage, valid_subscription,
    valid_topic, INTERRUPTED_EXIT,
};

#[derive(Args, Debug)]
pub(super) struct ConsumeArgs {
    /// Topic name.
    #[arg(value_parser = valid_topic)]
    topic: String,
    /// The durable subscription to read through (created if missing, see --from).
    #[arg(short, long, value_parser = valid_subscription)]
    subscription: String,
    /// Where a new subscription starts (an existing one resumes at its cursor).
    #[arg(long, default_value = "earliest")]
    from: StartFrom,
    /// Stop after N records (waiting for them if needed).
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Keep waiting for new records (Ctrl-C stops), like `tail -f`.
    #[arg(short, long)]
    follow: bool,
    /// Output template: {offset}, {timestamp} (ms), {time} (RFC 3339), {key}, {value},
    /// {size}, {headers}; \t and \n are escapes; a newline follows unless it ends with one.
    #[arg(long, default_value = "{value}", value_parser = valid_format)]
    format: String,
    /// One JSON object per record instead of --format: offset, timestamp_ms, key (null when
    /// empty), headers, value; bytes that are not UTF-8 come as base64 under `key_base64`,
    /// `value_base64` or `NAME_base64`.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// Read from the topic's leader, or from one of its replicas picked by the
    /// subscription's name (up to the commit point it knows; acks still go to the leader).
    #[arg(long, value_enum, default_value = "leader")]
    read_from: crate::client::ReadFrom,
    /// Look without moving the cursor: read from the subscription's cursor and acknowledge
    /// nothing (an existing subscription only: none is created). Safe with `| head`.
    #[arg(long)]
    peek: bool,
}

/// clap's check of `--format`.
pub(super) fn valid_format(s: &str) -> Result<String, String> {
    Formatter::new(s).map(|_| s.to_string()).map_err(|e| format!("{e:#}"))
}

/// Formats records per the `--format` template.
struct Formatter {
    parts: Vec<Part>,
    /// Whether a newline follows each record: yes, unless the template ends with one (as a
    /// kcat `-f '%s\n'` does), so neither way prints blank lines.
    newline: bool,
}

enum Part {
    Text(Vec<u8>),
    Offset,
    Timestamp,
    Time,
    Key,
    Value,
    Size,
    Headers,
}

/// The fields `--format` knows, as its error lists them.
const FORMAT_FIELDS: &str = "{offset}, {timestamp} (ms), {time} (RFC 3339, UTC), {key}, {value}, {size} (value bytes), {headers} (name=value,...)";

impl Formatter {
    fn new(template: &str) -> Result<Self> {
        let unescaped = template.replace("\\t", "\t").replace("\\n", "\n");
        let mut parts = Vec::new();
        let mut rest = unescaped.as_str();
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest.as_bytes()[..open].to_vec()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| usage(format!("--format: unclosed '{{' in {template:?}")))?
                + open;
            parts.push(match &rest[open + 1..close] {
                "offset" => Part::Offset,
                "timestamp" => Part::Timestamp,
                "time" => Part::Time,
                "key" => Part::Key,
                "value" => Part::Value,
                "size" => Part::Size,
                "headers" => Part::Headers,
                other => {
                    return Err(usage(format!("--format: unknown field {{{other}}}; use {FORMAT_FIELDS}")))
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.as_bytes().to_vec()));
        }
        Ok(Self { parts, newline: !unescaped.ends_with('\n') })
    }

    fn write(&self, out: &mut impl Write, r: &StoredRecord) -> std::io::Result<()> {
        for p in &self.parts {
            match p {
                Part::Text(t) => out.write_all(t)?,
                Part::Offset => write!(out, "{}", r.offset)?,
                Part::Timestamp => write!(out, "{}", r.timestamp_ms)?,
                Part::Time => out.write_all(rfc3339_ms(r.timestamp_ms).as_bytes())?,
                Part::Key => out.write_all(&r.record.key)?,
                Part::Value => out.write_all(&r.record.payload)?,
                Part::Size => write!(out, "{}", r.record.payload.len())?,
                Part::Headers => {
                    for (i, h) in r.record.headers.iter().enumerate() {
                        if i > 0 {
                            out.write_all(b",")?;
                        }
                        write!(out, "{}=", h.name)?;
                        out.write_all(&h.value)?;
                    }
                }
            }
        }
        if self.newline {
            out.write_all(b"\n")?;
        }
        Ok(())
    }
}

/// A record timestamp in RFC 3339, UTC, to the millisecond: `2026-12-02T05:52:07.123Z`.
fn rfc3339_ms(ms: u64) -> String {
    format!("{}.{:03}Z", format_ms(ms).replace(' ', "T"), ms % 1000)
}

/// A record as `consume --json` prints it. Bytes that are UTF-8 are strings; others go as
/// base64 under the field's name with `_base64` (nothing is lost); an empty key is `null`.
fn record_json(r: &StoredRecord) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    o.insert("offset".into(), json!(r.offset));
    o.insert("timestamp_ms".into(), json!(r.timestamp_ms));
    if r.record.key.is_empty() {
        o.insert("key".into(), serde_json::Value::Null);
    } else {
        put_bytes(&mut o, "key", &r.record.key);
    }
    let mut headers = serde_json::Map::new();
    for h in &r.record.headers {
        put_bytes(&mut headers, &h.name, &h.value);
    }
    o.insert("headers".into(), headers.into());
    put_bytes(&mut o, "value", &r.record.payload);
    o.into()
}

/// `name: "text"` for UTF-8 bytes, else `name_base64: "..."`.
fn put_bytes(o: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: &[u8]) {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(text) => o.insert(name.to_string(), json!(text)),
        Err(_) => {
            o.insert(format!("{name}_base64"), json!(base64::engine::general_purpose::STANDARD.encode(bytes)))
        }
    };
}

pub(super) async fn consume(client: Arc<Client>, args: ConsumeArgs) -> Result<ExitCode> {
    let topic = topic_name(&args.topic)?;
    let subscription = subscription_name(&args.subscription)?;
    let formatter = Formatter::new(&args.format)?;
    // Created here from the earliest record, past records already deleted: say why it starts
    // where it does, or a second subscriber sees nothing and no word of it.
    // A peek changes nothing: it neither creates a subscription nor moves one.
    if !args.peek {
        match client.create_subscription(&topic, &subscription, args.from, false).await {
            Ok(start) if start > 0 && args.from == StartFrom::Earliest => eprintln!(
                "subscription {subscription} starts at offset {start}: offsets 0..{} of {topic} were deleted once every subscription had read them (records are kept for the subscriptions that exist when they are produced)",
                start - 1
            ),
            Ok(_) | Err(Error::SubscriptionExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let consumer = if args.peek {
        client.existing_consumer(topic.clone(), subscription.clone())
    } else {
        client.consumer(topic.clone(), subscription.clone(), args.from).await?
    };
    let mut consumer = consumer.read_from(args.read_from);
    let stop = shutdown_on_signal();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    let (mut written, mut first, mut pending_ack) = (0u64, None::<Offset>, None::<Offset>);
    // One past the last record written to stdout.
    let mut delivered = None::<Offset>;
    let waits = args.follow || args.count.is_some();
    let started = Instant::now();
    let mut broken_pipe = false;
    loop {
        let remaining = args.count.map(|c| c - written);
        if remaining == Some(0) {
            break;
        }
        let want = remaining.unwrap_or(u64::MAX).min(client::MAX_BATCH_RECORDS as u64) as u32;
        let wait = if waits { Duration::from_secs(1) } else { Duration::ZERO };
        let polled = tokio::select! {
            r = consumer.poll(want, wait, pending_ack) => r,
            _ = stop.cancelled() => break,
        };
        let records = polled?;
        pending_ack = None;
        if let Some(e) = consumer.take_evicted() {
            eprintln!(
                "warning: {} records of {topic} were evicted from subscription {subscription} before it read them (backlog limit reached, policy evict; last at {} UTC); going on from offset {}",
                e.records,
                format_ms(e.at_ms),
                e.resume_at
            );
        }
        if records.is_empty() {
            if waits {
                continue;
            }
            break;
        }
        let take = records.len().min(remaining.unwrap_or(u64::MAX) as usize);
        let mut result = Ok(());
        for r in &records[..take] {
            result = if args.json {
                serde_json::to_writer(&mut out, &record_json(r))
                    .map_err(std::io::Error::from)
                    .and_then(|_| out.write_all(b"\n"))
            } else {
                formatter.write(&mut out, r)
            };
            if result.is_err() {
                break;
            }
        }
        // Commit the cursor only after the records reached stdout.
        if let Err(e) = result.and_then(|_| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                broken_pipe = true;
                break;
            }
            return Err(anyhow!(e).context("writing to stdout"));
        }
        first.get_or_insert(records[0].offset);
        written += take as u64;
        delivered = Some(records[take - 1].offset + 1);
        pending_ack = delivered.filter(|_| !args.peek);
    }
    // Acks sent ahead with polls are not awaited there; finish with one that is, covering
    // everything written (acks are cumulative), so the cursor is committed before we exit.
    if let Some(next) = delivered.filter(|_| !args.peek) {
        consumer.close(); // a poll may have been cut short; ack on a fresh stream
        consumer.ack(next).await.context("acknowledging consumed records")?;
    }
    let position = consumer.position();
    consumer.release().await;
    if !broken_pipe {
        let range = match (first, delivered.or(position)) {
            (Some(a), Some(b)) if b > a => format!(" (offsets {a}..{})", b - 1),
            _ => String::new(),
        };
        let secs = started.elapsed().as_secs_f64();
        let (verb, unmoved) =
            if args.peek { ("peeked at", "; its cursor did not move") } else { ("consumed", "") };
        eprintln!(
            "{verb} {written} {} from {topic} via {subscription}{range} in {secs:.2}s{unmoved}",
            plural(written, "record")
        );
    }
    // Stopped by Ctrl-C before --count was reached: not the success a script may wait for.
    if stop.is_cancelled() && args.count.is_some_and(|c| written < c) {
        eprintln!("interrupted before {} records", args.count.unwrap_or_default());
        return Ok(ExitCode::from(INTERRUPTED_EXIT));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Offset;
    use crate::wire::Record;

    fn record(offset: Offset, key: &str, value: &str) -> StoredRecord {
        StoredRecord {
            offset,
            timestamp_ms: 7,
            record: Record { key: key.into(), headers: vec![], payload: value.into() },
        }
    }

    #[test]
    fn format_template_fills_fields_and_escapes() {
        let f = Formatter::new("{offset}\\t{key}\\t{value}").unwrap();
        let mut out = Vec::new();
        f.write(&mut out, &record(3, "k", "v")).unwrap();
        assert_eq!(out, b"3\tk\tv\n");
        assert!(Formatter::new("{nope}").is_err());
        // A template ending in a newline (as kcat users write them) gets no second one.
        let mut out = Vec::new();
        Formatter::new("{value}\\n").unwrap().write(&mut out, &record(3, "k", "v")).unwrap();
        assert_eq!(out, b"v\n");
        let mut r = record(4, "k", "value");
        r.timestamp_ms = 1_796_190_727_123;
        r.record.headers = vec![
            crate::types::Header { name: "a".into(), value: b"1".to_vec() },
            crate::types::Header { name: "b".into(), value: b"2".to_vec() },
        ];
        let mut out = Vec::new();
        Formatter::new("{time} {size} {headers}").unwrap().write(&mut out, &r).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "2026-12-02T05:52:07.123Z 5 a=1,b=2\n");
        assert!(Formatter::new("{offset").is_err());
    }

    #[test]
    fn json_keeps_binary_bytes_as_base64_and_an_empty_key_as_null() {
        let mut r = record(1, "", "text");
        assert_eq!(record_json(&r)["key"], serde_json::Value::Null);
        assert_eq!(record_json(&r)["value"], "text");
        r.record.payload = vec![0xff, 0x00, 0xfe];
        r.record.key = b"k".to_vec();
        let j = record_json(&r);
        assert_eq!((j["key"].as_str(), j.get("value")), (Some("k"), None));
        assert_eq!(j["value_base64"], "/wD+");
    }
}
