//! `herald consume`: records of a topic to stdout, through a subscription (or, with
//! `--offset`, `--tail` or `--from-time`, without one).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::client::{self, Client, Consumer, Reader};
use crate::error::Error;
use crate::types::{Offset, StartFrom, SubscriptionName, TopicName};
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
    /// The durable subscription to read through (created if missing, see --from); or read
    /// without one with --offset, --tail or --from-time.
    #[arg(
        short,
        long,
        value_parser = valid_subscription,
        required_unless_present_any = ["offset", "tail", "from_time"]
    )]
    subscription: Option<String>,
    /// Where a new subscription starts (an existing one resumes at its cursor).
    #[arg(long, default_value = "earliest")]
    from: StartFrom,
    /// Read from offset N without a subscription: nothing is acknowledged, and nothing is
    /// kept for this reader (records still go once every subscription has read them).
    #[arg(long, value_name = "N", group = "position", conflicts_with_all = NO_SUBSCRIPTION_CONFLICTS)]
    offset: Option<Offset>,
    /// Read the last N committed records without a subscription (with --follow, and what
    /// comes after them).
    #[arg(long, value_name = "N", group = "position", conflicts_with_all = NO_SUBSCRIPTION_CONFLICTS)]
    tail: Option<u64>,
    /// Read from the first record stamped at or after TS without a subscription: RFC 3339
    /// (2026-12-02T10:00:00Z), ms since the Unix epoch, or a time ago (90s, 15m, 2h, 1d).
    #[arg(
        long,
        value_name = "TS",
        value_parser = parse_time,
        group = "position",
        conflicts_with_all = NO_SUBSCRIPTION_CONFLICTS
    )]
    from_time: Option<u64>,
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

/// What a read without a subscription (--offset, --tail, --from-time) cannot be given.
const NO_SUBSCRIPTION_CONFLICTS: [&str; 4] = ["subscription", "from", "peek", "read_from"];

/// `--from-time`: RFC 3339, ms since the Unix epoch, or a time ago (`90s`, `15m`, `2h`, `1d`),
/// as ms since the Unix epoch.
fn parse_time(s: &str) -> Result<u64, String> {
    parse_time_at(s, crate::types::now_ms())
}

fn parse_time_at(s: &str, now_ms: u64) -> Result<u64, String> {
    let bad = || {
        format!("{s:?} is not a time: give RFC 3339 (2026-12-02T10:00:00Z), ms since the Unix epoch, or a time ago (90s, 15m, 2h, 1d)")
    };
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c)) {
        let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
        let ms = match unit {
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            _ => 86_400_000,
        };
        return Ok(now_ms.saturating_sub(n.saturating_mul(ms)));
    }
    let t =
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|_| bad())?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| format!("{s:?} is before 1970"))
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

/// Where `consume` reads: a subscription (moving its cursor, or not with --peek), or a
/// reader from an offset that holds nothing.
enum Source {
    Subscription { consumer: Box<Consumer>, name: SubscriptionName, peek: bool },
    Reader(Reader),
}

impl Source {
    /// The next records; `ack` moves a subscription's cursor (never a peek's).
    async fn poll(
        &mut self,
        topic: &TopicName,
        want: u32,
        wait: Duration,
        ack: Option<Offset>,
    ) -> Result<Vec<StoredRecord>, Error> {
        match self {
            Source::Subscription { consumer, name, peek } => {
                let records = consumer.poll(want, wait, ack.filter(|_| !*peek)).await?;
                if let Some(e) = consumer.take_evicted() {
                    eprintln!(
                        "warning: {} records of {topic} were evicted from subscription {name} before it read them (backlog limit reached, policy evict; last at {} UTC); going on from offset {}",
                        e.records,
                        format_ms(e.at_ms),
                        e.resume_at
                    );
                }
                Ok(records)
            }
            Source::Reader(reader) => {
                let records = reader.poll(want, wait).await?;
                if let Some(s) = reader.take_skipped() {
                    eprintln!(
                        "warning: offsets {}..{} of {topic} were deleted before this read reached them (every subscription had read them); going on from offset {}",
                        s.from,
                        s.resume_at - 1,
                        s.resume_at
                    );
                }
                Ok(records)
            }
        }
    }
}

pub(super) async fn consume(client: Arc<Client>, args: ConsumeArgs) -> Result<ExitCode> {
    let topic = topic_name(&args.topic)?;
    let formatter = Formatter::new(&args.format)?;
    let mut source = match &args.subscription {
        Some(name) => subscribe(&client, &topic, name, &args).await?,
        None => Source::Reader(client.reader(topic.clone(), start_offset(&client, &topic, &args).await?)),
    };
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
            r = source.poll(&topic, want, wait, pending_ack) => r,
            _ = stop.cancelled() => break,
        };
        let records = polled?;
        pending_ack = None;
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
        pending_ack = delivered;
    }
    let (position, verb, via, after) = match source {
        Source::Subscription { mut consumer, name, peek } => {
            // Acks sent ahead with polls are not awaited there; finish with one that is,
            // covering everything written (acks are cumulative), so the cursor is committed
            // before we exit.
            if let Some(next) = delivered.filter(|_| !peek) {
                consumer.close(); // a poll may have been cut short; ack on a fresh stream
                consumer.ack(next).await.context("acknowledging consumed records")?;
            }
            let position = consumer.position();
            consumer.release().await;
            let (verb, unmoved) =
                if peek { ("peeked at", "; its cursor did not move") } else { ("consumed", "") };
            (position, verb, format!(" via {name}"), unmoved)
        }
        Source::Reader(reader) => {
            (Some(reader.position()), "read", String::new(), " without a subscription (nothing acknowledged)")
        }
    };
    if !broken_pipe {
        let range = match (first, delivered.or(position)) {
            (Some(a), Some(b)) if b > a => format!(" (offsets {a}..{})", b - 1),
            _ => String::new(),
        };
        let secs = started.elapsed().as_secs_f64();
        let records = plural(written, "record");
        eprintln!("{verb} {written} {records} from {topic}{via}{range} in {secs:.2}s{after}");
    }
    // Stopped by Ctrl-C before --count was reached: not the success a script may wait for.
    if stop.is_cancelled() && args.count.is_some_and(|c| written < c) {
        eprintln!("interrupted before {} records", args.count.unwrap_or_default());
        return Ok(ExitCode::from(INTERRUPTED_EXIT));
    }
    Ok(ExitCode::SUCCESS)
}

/// A consumer of subscription `name`, created first unless this is a peek.
async fn subscribe(
    client: &Arc<Client>,
    topic: &TopicName,
    name: &str,
    args: &ConsumeArgs,
) -> Result<Source> {
    let subscription = subscription_name(name)?;
    // Created here from the earliest record, past records already deleted: say why it starts
    // where it does, or a second subscriber sees nothing and no word of it.
    // A peek changes nothing: it neither creates a subscription nor moves one.
    if !args.peek {
        match client.create_subscription(topic, &subscription, args.from, false).await {
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
    Ok(Source::Subscription {
        consumer: Box::new(consumer.read_from(args.read_from)),
        name: subscription,
        peek: args.peek,
    })
}

/// Where a read without a subscription starts (--offset, --tail or --from-time), checked
/// against the log as it is: an offset deleted or not yet written is an error that says so.
async fn start_offset(client: &Arc<Client>, topic: &TopicName, args: &ConsumeArgs) -> Result<Offset> {
    if let Some(time_ms) = args.from_time {
        return Ok(client.locate(topic, time_ms).await?.offset);
    }
    let status = client.topic_status(topic).await?;
    let (log_start, commit) = (status.log_start, status.commit);
    if let Some(n) = args.tail {
        return Ok(commit.saturating_sub(n).max(log_start));
    }
    let offset = args.offset.expect("clap requires a subscription or a position");
    if offset < log_start {
        bail!(
            "offset {offset} of {topic} was deleted: its log starts at {log_start} (records go once every subscription has read them); try --offset {log_start}"
        );
    }
    if offset > commit {
        bail!("offset {offset} of {topic} is past its end: the next record will be {commit}");
    }
    Ok(offset)
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
    fn from_time_takes_rfc_3339_epoch_ms_and_a_time_ago() {
        let now = 1_796_190_727_123;
        assert_eq!(parse_time_at("2026-12-02T05:52:07.123Z", now), Ok(now));
        assert_eq!(parse_time_at("2026-12-02T06:52:07.123+01:00", now), Ok(now));
        assert_eq!(parse_time_at("1796190727123", now), Ok(now));
        assert_eq!(parse_time_at("90s", now), Ok(now - 90_000));
        assert_eq!(parse_time_at("15m", now), Ok(now - 900_000));
        assert_eq!(parse_time_at("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_time_at("1d", now), Ok(now - 86_400_000));
        for bad in ["", "noon", "5x", "m", "-5m", "2026-12-02", "1969-12-31T23:59:59Z"] {
            assert!(parse_time_at(bad, now).is_err(), "{bad:?}");
        }
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
