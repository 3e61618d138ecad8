//! What `herald produce` reads: stdin lines (a value each, `KEY<delimiter>VALUE`, or a JSON
//! object with key, headers and value) or whole files, made into records and checked
//! against the topic's limits and schema before anything is sent, so a bad line is named
//! by its number.

use std::io::Read;
use std::path::PathBuf;

use base64::Engine as _;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::client;
use crate::policy::Policy;
use crate::wire::{Header, Record, TopicConfig};

/// How each stdin line becomes a record.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum InputMode {
    /// The line is the value (with --key-delimiter: the key, the delimiter, the value).
    #[default]
    Lines,
    /// The line is a JSON object as `consume --json` writes one: `key` (a string or null),
    /// `headers` (an object of strings), `value` (a string, or any JSON, stored as its
    /// text); bytes that are not UTF-8 go as base64 under `key_base64`, `value_base64` or
    /// `NAME_base64`. Other fields (`offset`, `timestamp_ms`) are ignored.
    Json,
}

/// Bytes read from stdin at a time: a pipe fills batches, an interactive line goes at once.
const READ_BYTES: usize = 256 * 1024;

/// What the input thread hands over, in input order.
pub(super) enum Item {
    /// Records ready to send, from input lines (or files) `first..=last`.
    Batch { records: Vec<Record>, first: u64, last: u64 },
    /// Input that cannot be a record: where it is (`line 7`, `file a.json`) and why.
    Invalid { at: String, reason: String },
    /// Reading the input failed.
    Failed(String),
}

/// Makes records of input lines and checks them as the topic will.
pub(super) struct Shape {
    /// Key and headers of every record (from --key and --header).
    pub template: Record,
    pub mode: InputMode,
    pub key_delimiter: Option<Vec<u8>>,
    pub topic: String,
    pub config: TopicConfig,
}

impl Shape {
    /// The record of one input line, checked, or why it cannot be one.
    fn record(&self, line: &[u8], policy: &Policy) -> Result<Record, String> {
        let record = match (self.mode, &self.key_delimiter) {
            (InputMode::Json, _) => self.json_record(line)?,
            (InputMode::Lines, Some(delimiter)) => {
                let at = find(line, delimiter).ok_or_else(|| {
                    format!(
                        "no key delimiter {:?} in it (every line must be KEY{}VALUE)",
                        String::from_utf8_lossy(delimiter),
                        String::from_utf8_lossy(delimiter)
                    )
                })?;
                Record {
                    key: line[..at].to_vec(),
                    payload: line[at + delimiter.len()..].to_vec(),
                    ..self.template.clone()
                }
            }
            (InputMode::Lines, None) => Record { payload: line.to_vec(), ..self.template.clone() },
        };
        self.check(&record, policy)?;
        Ok(record)
    }

    /// The topic's rules, checked before sending: the leader checks again.
    fn check(&self, record: &Record, policy: &Policy) -> Result<(), String> {
        let (size, limit) = (record.encoded_size(), self.config.max_record_bytes as usize);
        if size > limit {
            return Err(format!(
                "the record is {size} bytes, over {}'s limit of {limit} bytes a record (a topic's --max-record-bytes is set when it is created, at most {})",
                self.topic,
                crate::wire::MAX_RECORD_BYTES_LIMIT
            ));
        }
        policy
            .check_payload(&record.payload)
            .map_err(|e| format!("it does not match {}'s schema: {e}", self.topic))
    }

    /// A record from a JSON object line (see [`InputMode::Json`]).
    fn json_record(&self, line: &[u8]) -> Result<Record, String> {
        let value: Value = serde_json::from_slice(line).map_err(|e| format!("it is not JSON: {e}"))?;
        let Value::Object(fields) = value else { return Err("it is not a JSON object".into()) };
        let mut record = self.template.clone();
        if let Some(key) = bytes_field(&fields, "key")? {
            record.key = key;
        }
        if let Some(headers) = fields.get("headers").filter(|h| !h.is_null()) {
            let Value::Object(headers) = headers else { return Err("\"headers\" is not an object".into()) };
            for name in headers.keys() {
                let name = name.strip_suffix("_base64").unwrap_or(name);
                let value = bytes_field(headers, name)?.unwrap_or_default();
                record.headers.retain(|h| h.name != name);
                record.headers.push(Header { name: name.to_string(), value });
            }
        }
        match (fields.get("value"), bytes_field(&fields, "value")) {
            (Some(v), _) if !v.is_string() && !v.is_null() => record.payload = v.to_string().into_bytes(),
            (_, Ok(Some(payload))) => record.payload = payload,
            (_, Ok(None)) => return Err("it has no \"value\" (nor \"value_base64\")".into()),
            (_, Err(e)) => return Err(e),
        }
        Ok(record)
    }
}

/// Field `name` of a JSON object as bytes: a string as UTF-8, `name_base64` decoded;
/// `None` when absent or null.
fn bytes_field(fields: &serde_json::Map<String, Value>, name: &str) -> Result<Option<Vec<u8>>, String> {
    if let Some(v) = fields.get(&format!("{name}_base64")).filter(|v| !v.is_null()) {
        let text = v.as_str().ok_or_else(|| format!("\"{name}_base64\" is not a string"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("\"{name}_base64\" is not base64: {e}"))?;
        return Ok(Some(bytes));
    }
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone().into_bytes())),
        Some(_) => Err(format!("\"{name}\" is not a string")),
    }
}

/// Where `needle` starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Hands `items` the records of stdin's lines, at most `limit` of them, batched by what one
/// read returned (and by the client's batch limits). With `stop_at_invalid`, the first line
/// that cannot be a record ends the input (after the lines before it). Runs on its own
/// thread: stdin reads block.
pub(super) fn read_lines(shape: Shape, limit: Option<u64>, stop_at_invalid: bool, items: mpsc::Sender<Item>) {
    let policy = Policy::new(shape.config.clone());
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut carry: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; READ_BYTES];
    let mut batch = Batcher::new(items);
    // Lines read so far (the last one's number), and records made of them.
    let (mut line_no, mut taken) = (0u64, 0u64);
    let mut at_eof = false;
    while !at_eof && limit.is_none_or(|l| taken < l) {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                batch.flush();
                batch.send(Item::Failed(format!("reading stdin: {e}")));
                return;
            }
        };
        at_eof = n == 0;
        let mut data = &buf[..n];
        // Whole lines of this read, and at the end of input what is left without a newline.
        loop {
            // A line within this read is borrowed; one that began in an earlier read is
            // completed in `carry`.
            let joined: Vec<u8>;
            let line: &[u8] = match data.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let (head, rest) = (&data[..pos], &data[pos + 1..]);
                    data = rest;
                    if carry.is_empty() {
                        head
                    } else {
                        carry.extend_from_slice(head);
                        joined = std::mem::take(&mut carry);
                        &joined
                    }
                }
                None if at_eof && !carry.is_empty() => {
                    joined = std::mem::take(&mut carry);
                    &joined
                }
                None => {
                    carry.extend_from_slice(data);
                    break;
                }
            };
            line_no += 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match shape.record(line, &policy) {
                Ok(record) => {
                    taken += 1;
                    if !batch.push(record, line_no) {
                        return;
                    }
                }
                Err(reason) => {
                    batch.flush();
                    if !batch.send(Item::Invalid { at: format!("line {line_no}"), reason }) || stop_at_invalid
                    {
                        return;
                    }
                }
            }
            if limit.is_some_and(|l| taken >= l) {
                break;
            }
        }
        if !batch.flush() {
            return;
        }
    }
}

/// Hands `items` one record per file, its bytes the value, checked like lines.
pub(super) fn read_files(
    shape: Shape,
    files: Vec<PathBuf>,
    stop_at_invalid: bool,
    items: mpsc::Sender<Item>,
) {
    let policy = Policy::new(shape.config.clone());
    let mut batch = Batcher::new(items);
    for (i, path) in files.iter().enumerate() {
        let at = format!("file {}", path.display());
        let made = std::fs::read(path)
            .map_err(|e| format!("reading it: {e}"))
            .map(|payload| Record { payload, ..shape.template.clone() })
            .and_then(|r| shape.check(&r, &policy).map(|()| r));
        match made {
            Ok(record) => {
                if !batch.push(record, i as u64 + 1) {
                    return;
                }
            }
            Err(reason) => {
                batch.flush();
                if !batch.send(Item::Invalid { at, reason }) || stop_at_invalid {
                    return;
                }
            }
        }
    }
    batch.flush();
}

/// Gathers records into batches within the client's limits.
struct Batcher {
    items: mpsc::Sender<Item>,
    records: Vec<Record>,
    bytes: usize,
    first: u64,
    last: u64,
}

impl Batcher {
    fn new(items: mpsc::Sender<Item>) -> Self {
        Self { items, records: Vec::new(), bytes: 0, first: 0, last: 0 }
    }

    /// Adds a record of input line (or file) `at`; false once no one listens.
    fn push(&mut self, record: Record, at: u64) -> bool {
        if self.records.is_empty() {
            self.first = at;
        }
        self.last = at;
        self.bytes += record.encoded_size();
        self.records.push(record);
        if self.records.len() >= client::MAX_BATCH_RECORDS || self.bytes >= client::MAX_BATCH_BYTES {
            return self.flush();
        }
        true
    }

    /// Sends what is gathered; false once no one listens.
    fn flush(&mut self) -> bool {
        if self.records.is_empty() {
            return true;
        }
        let records = std::mem::take(&mut self.records);
        self.bytes = 0;
        self.send(Item::Batch { records, first: self.first, last: self.last })
    }

    fn send(&self, item: Item) -> bool {
        self.items.blocking_send(item).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(mode: InputMode, delimiter: Option<&str>) -> Shape {
        Shape {
            template: Record {
                headers: vec![Header { name: "h".into(), value: b"1".to_vec() }],
                ..Record::default()
            },
            mode,
            key_delimiter: delimiter.map(|d| d.as_bytes().to_vec()),
            topic: "t".into(),
            config: TopicConfig { max_record_bytes: 64, ..TopicConfig::default() },
        }
    }

    fn make(shape: &Shape, line: &str) -> Result<Record, String> {
        shape.record(line.as_bytes(), &Policy::new(shape.config.clone()))
    }

    #[test]
    fn a_key_delimiter_splits_at_its_first_occurrence() {
        let s = shape(InputMode::Lines, Some("::"));
        let r = make(&s, "k1::v::w").unwrap();
        assert_eq!((r.key.as_slice(), r.payload.as_slice()), (&b"k1"[..], &b"v::w"[..]));
        assert_eq!(r.headers.len(), 1, "--header still applies");
        assert!(make(&s, "no delimiter").unwrap_err().contains("no key delimiter \"::\""));
        assert_eq!(make(&s, "::v").unwrap().key, b"");
    }

    #[test]
    fn json_lines_read_what_consume_json_writes() {
        let s = shape(InputMode::Json, None);
        let r = make(&s, r#"{"offset":3,"key":"k","headers":{"a":"x","b_base64":"/wA="},"value":"text"}"#)
            .unwrap();
        assert_eq!((r.key.as_slice(), r.payload.as_slice()), (&b"k"[..], &b"text"[..]));
        let headers: Vec<(&str, &[u8])> =
            r.headers.iter().map(|h| (h.name.as_str(), h.value.as_slice())).collect();
        assert_eq!(headers, vec![("h", &b"1"[..]), ("a", &b"x"[..]), ("b", &[0xff, 0x00][..])]);
        let r = make(&s, r#"{"key":null,"value_base64":"/wD+"}"#).unwrap();
        assert_eq!((r.key.as_slice(), r.payload.as_slice()), (&b""[..], &[0xff, 0x00, 0xfe][..]));
        let r = make(&s, r#"{"value":{"n":1}}"#).unwrap();
        assert_eq!(r.payload, br#"{"n":1}"#, "JSON values are stored as their text");
        for (line, says) in [
            ("not json", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"key":"k"}"#, "no \"value\""),
            (r#"{"value":"v","key":5}"#, "\"key\" is not a string"),
            (r#"{"value_base64":"%%"}"#, "not base64"),
            (r#"{"value":"v","headers":[1]}"#, "\"headers\" is not an object"),
        ] {
            assert!(make(&s, line).unwrap_err().contains(says), "{line}");
        }
    }

    #[test]
    fn records_are_checked_against_the_topics_limit_and_schema() {
        let mut s = shape(InputMode::Lines, None);
        let err = make(&s, &"x".repeat(100)).unwrap_err();
        assert!(err.contains("over t's limit of 64 bytes"), "{err}");
        s.config.schema = Some(r#"{"type":"object","required":["n"]}"#.into());
        assert!(make(&s, r#"{"n":1}"#).is_ok());
        let err = make(&s, r#"{"m":1}"#).unwrap_err();
        assert!(err.contains("does not match t's schema") && err.contains("\"n\""), "{err}");
    }
}
