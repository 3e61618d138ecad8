//! Domain words with their own types, so a signature says what it carries.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Position of a record in a topic's log: dense, from 0, never reused.
pub type Offset = u64;
/// Leadership term of a topic: strictly increasing, bumped by the naming server on each election.
pub type Epoch = u64;
/// Identity of a topic server, stable across restarts (persisted in its data directory).
pub type ServerId = u64;
/// Identity of one incarnation of a topic: a topic deleted and created again gets a new id,
/// so a server that was down during the delete never mixes old records into the new topic.
pub type TopicId = u64;
/// Identity of one producer session, chosen at random by the client.
pub type ProducerId = u64;
/// Per-producer batch sequence number; the leader deduplicates retries by (producer, sequence).
pub type Sequence = u64;

/// Position of an entry in a topic's replicated log: dense, from 0, never reused. The log
/// holds producers' batches and control entries (cursor moves, an epoch's first entry), so
/// entry indexes and record offsets differ: offsets count records only, and stay dense.
pub type Index = u64;

/// Longest topic or subscription name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

const NAME_RULE: &str = "1-128 bytes of [A-Za-z0-9._-], not starting with '.' or '_' (reserved for Herald)";

fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.starts_with('.')
        && !name.starts_with('_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            what: what.to_string(),
            name: name.chars().take(160).collect(),
            rule: NAME_RULE.to_string(),
        })
    }
}

macro_rules! validated_name {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Validates `name` against the naming rule.
            pub fn new(name: impl Into<String>) -> Result<Self, Error> {
                let name = name.into();
                validate_name($what, &name)?;
                Ok(Self(name))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = Error;
            fn try_from(name: String) -> Result<Self, Error> {
                Self::new(name)
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                name.0
            }
        }

        impl std::str::FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

validated_name!(
    /// A topic's name, valid by construction (also when decoded from the wire).
    TopicName,
    "topic"
);
validated_name!(
    /// A subscription's name, valid by construction (same rule as topics).
    SubscriptionName,
    "subscription"
);

/// Longest consumer session name, in bytes (it is shown as a subscription's holder).
pub const MAX_SESSION_NAME_BYTES: usize = 256;

/// Checks text a peer sends that people later read in logs, errors and `topic describe`:
/// at most `max` bytes, and no control characters (a newline would forge a log line, an ESC
/// would drive the reader's terminal).
pub fn check_text(what: &str, text: &str, max: usize) -> Result<(), Error> {
    if text.len() > max {
        return Err(Error::invalid(format!("the {what} is {} bytes, over the limit of {max}", text.len())));
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(format!(
            "the {what} {:?} contains the control character {:?}: only printable text is taken",
            text.escape_debug().to_string(),
            c
        )));
    }
    Ok(())
}

/// Where a new subscription starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum StartFrom {
    /// The oldest record still stored (the log start).
    #[default]
    Earliest,
    /// The current end of the committed log: only records produced from now on.
    Latest,
}

impl std::str::FromStr for StartFrom {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "earliest" => Ok(Self::Earliest),
            "latest" => Ok(Self::Latest),
            other => Err(format!("expected 'earliest' or 'latest', got {other:?}")),
        }
    }
}

/// Milliseconds since the Unix epoch, as stamped on records by the leader.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds on this process's monotonic clock (from its first call): for leases and
/// contact times, which must not jump with the wall clock.
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// Most headers one record may carry. Checked while decoding, before anything is allocated
/// for them: an empty header costs 2 bytes on the wire but ~48 in memory, so without a cap a
/// 16 MiB frame of empty headers would take ~400 MB to decode.
pub const MAX_HEADERS_PER_RECORD: usize = 128;
/// Longest header name, in bytes (names are labels such as `trace-id`).
pub const MAX_HEADER_NAME_BYTES: usize = 256;
/// Longest record key, in bytes (keys identify; the payload carries the data).
pub const MAX_KEY_BYTES: usize = 64 * 1024;
/// Most records in one produce batch, checked while decoding for the same reason as
/// [`MAX_HEADERS_PER_RECORD`] (an empty record is 3 bytes on the wire, ~72 in memory). Four
/// times what our client sends (`client::MAX_BATCH_RECORDS`).
pub const MAX_RECORDS_PER_BATCH: usize = 16 * 1024;
/// Most topics one create or delete request names, checked while decoding for the same
/// reason: one book change (a Raft entry of at most ~1.2 MB without schemas) that commits
/// in one round and applies in milliseconds.
pub const MAX_TOPICS_PER_REQUEST: usize = 1000;

/// A record as a producer sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Record {
    /// Opaque bytes the application chooses (empty: no key).
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Named values carried with the record, in order.
    #[serde(deserialize_with = "bounded::headers")]
    pub headers: Vec<Header>,
    /// The record's value (checked against the topic's schema, if it has one).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// One record header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Header name (printable text).
    pub name: String,
    /// Header value: any bytes.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Bytes postcard takes for the length or integer `n` (a varint: 7 bits per byte).
pub fn varint_len(n: u64) -> usize {
    (64 - (n | 1).leading_zeros() as usize).div_ceil(7)
}

fn bytes_len(n: usize) -> usize {
    varint_len(n as u64) + n
}

impl Record {
    /// The record's size as encoded on the wire and on disk: key, headers (each with its
    /// length fields) and payload. Every byte limit counts this: `max_record_bytes`, batch and
    /// fetch sizes, replication chunks. (Counting only the bytes of names and values let a
    /// record of millions of empty headers through a 1,000-byte limit.)
    pub fn encoded_size(&self) -> usize {
        bytes_len(self.key.len())
            + varint_len(self.headers.len() as u64)
            + self.headers.iter().map(|h| bytes_len(h.name.len()) + bytes_len(h.value.len())).sum::<usize>()
            + bytes_len(self.payload.len())
    }

    /// Checks the caps on key and header sizes (the header count is checked when decoding).
    pub fn check_shape(&self) -> Result<(), String> {
        if self.key.len() > MAX_KEY_BYTES {
            return Err(format!("its key is {} bytes, over the limit of {MAX_KEY_BYTES}", self.key.len()));
        }
        if self.headers.len() > MAX_HEADERS_PER_RECORD {
            return Err(format!(
                "it has {} headers, over the limit of {MAX_HEADERS_PER_RECORD}",
                self.headers.len()
            ));
        }
        if let Some(h) = self.headers.iter().find(|h| h.name.len() > MAX_HEADER_NAME_BYTES) {
            return Err(format!(
                "a header name is {} bytes, over the limit of {MAX_HEADER_NAME_BYTES}",
                h.name.len()
            ));
        }
        Ok(())
    }
}

/// Deserializers that refuse a sequence longer than its cap before allocating for it.
pub mod bounded {
    use serde::de::{Deserialize, Deserializer, Error as _, SeqAccess, Visitor};
    use std::marker::PhantomData;

    use super::{
        Header, Record, TopicName, MAX_HEADERS_PER_RECORD, MAX_RECORDS_PER_BATCH, MAX_TOPICS_PER_REQUEST,
    };

    struct AtMost<T, const N: usize>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for AtMost<T, N> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a sequence of at most {N} items")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            if let Some(n) = seq.size_hint().filter(|n| *n > N) {
                return Err(A::Error::custom(format!("{n} items, over the limit of {N}")));
            }
            // Grows as items arrive: the announced length alone reserves nothing.
            let mut out = Vec::new();
            while let Some(item) = seq.next_element()? {
                if out.len() == N {
                    return Err(A::Error::custom(format!("more than {N} items")));
                }
                out.push(item);
            }
            Ok(out)
        }
    }

    /// A fetch answer's record chunks: at most one per record it may hold
    /// (`server::MAX_FETCH_RECORDS`).
    pub fn fetched_chunks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, bytes::Bytes)>, D::Error> {
        d.deserialize_seq(AtMost::<(u64, bytes::Bytes), { crate::server::MAX_FETCH_RECORDS as usize }>(
            PhantomData,
        ))
    }

    /// A record's headers: at most [`MAX_HEADERS_PER_RECORD`].
    pub fn headers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Header>, D::Error> {
        d.deserialize_seq(AtMost::<Header, MAX_HEADERS_PER_RECORD>(PhantomData))
    }

    /// A batch's records: at most [`MAX_RECORDS_PER_BATCH`].
    pub fn records<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Record>, D::Error> {
        d.deserialize_seq(AtMost::<Record, MAX_RECORDS_PER_BATCH>(PhantomData))
    }

    /// The topics a follower follows from one leader: at most `naming::core::MAX_TOPICS`
    /// (every topic of the cluster).
    pub fn followed<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<(u64, u64)>>, D::Error> {
        /// The list itself (postcard encodes a newtype as its content).
        struct List(Vec<(u64, u64)>);
        impl<'de> serde::Deserialize<'de> for List {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_seq(AtMost::<(u64, u64), { crate::naming::core::MAX_TOPICS }>(PhantomData))
                    .map(List)
            }
        }
        Ok(<Option<List> as serde::Deserialize>::deserialize(d)?.map(|l| l.0))
    }

    /// Fetches a follower parks on its leader in one poll: at most `naming::core::MAX_TOPICS`.
    pub fn parked<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<crate::replication::ParkedFetch>, D::Error> {
        d.deserialize_seq(AtMost::<crate::replication::ParkedFetch, { crate::naming::core::MAX_TOPICS }>(
            PhantomData,
        ))
    }

    /// Topic ids, one per topic of the cluster at most (`naming::core::MAX_TOPICS`).
    pub fn topic_ids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        d.deserialize_seq(AtMost::<u64, { crate::naming::core::MAX_TOPICS }>(PhantomData))
    }

    /// A request's topic names: at most [`MAX_TOPICS_PER_REQUEST`].
    pub fn topic_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<TopicName>, D::Error> {
        d.deserialize_seq(AtMost::<TopicName, MAX_TOPICS_PER_REQUEST>(PhantomData))
    }
}

/// FNV-1a, 64 bits: a small, stable hash for digests and picks that every process must
/// compute alike (std's hasher is seeded per process).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// A stored record, as consumers receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// Its place in the topic's log: dense, from 0, never reused.
    pub offset: Offset,
    /// Milliseconds since the Unix epoch, stamped by the leader when it appended the record.
    pub timestamp_ms: u64,
    /// What the producer sent.
    pub record: Record,
}

/// The naming servers a client or a topic server may ask (`--naming A,B,C`; host names are
/// resolved once, at start). The leader a redirect named, else the one that answered last,
/// is dialled first and each other 250 ms later, until one answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamingAddrs(Vec<std::net::SocketAddr>);

impl NamingAddrs {
    /// The addresses given (`None` if there are none).
    pub fn new(addrs: Vec<std::net::SocketAddr>) -> Option<Self> {
        (!addrs.is_empty()).then_some(Self(addrs))
    }

    /// Every address, in the order given (never empty).
    pub fn list(&self) -> &[std::net::SocketAddr] {
        &self.0
    }

    /// The first address given.
    pub fn first(&self) -> std::net::SocketAddr {
        self.0[0]
    }
}

impl From<std::net::SocketAddr> for NamingAddrs {
    fn from(addr: std::net::SocketAddr) -> Self {
        Self(vec![addr])
    }
}

impl std::str::FromStr for NamingAddrs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        use std::net::ToSocketAddrs;
        let mut addrs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let resolved: Vec<std::net::SocketAddr> = part
                .to_socket_addrs()
                .map_err(|e| format!("naming server address {part:?}: {e} (expected HOST:PORT)"))?
                .collect();
            // One family, IPv4 first: a client socket is bound for one, and servers listen
            // on IPv4 loopback by default while `localhost` may resolve to `::1` first.
            let v4: Vec<_> = resolved.iter().copied().filter(|a| a.is_ipv4()).collect();
            let chosen = if v4.is_empty() { resolved } else { v4 };
            let Some(addr) = chosen.first() else {
                return Err(format!("naming server address {part:?} resolves to nothing"));
            };
            if !addrs.contains(addr) {
                addrs.push(*addr);
            }
        }
        if addrs.is_empty() {
            return Err("no naming server address given (expected HOST:PORT[,HOST:PORT...])".into());
        }
        Ok(Self(addrs))
    }
}

impl fmt::Display for NamingAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.0.iter().map(|a| a.to_string()).collect();
        f.write_str(&list.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for good in ["a", "demo", "orders.v1", "A-b_c.9", &"x".repeat(128)] {
            assert!(TopicName::new(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "_internal", "has space", "slash/y", "é", &"x".repeat(129)] {
            let err = TopicName::new(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidName { .. }), "{bad}");
        }
    }

    #[test]
    fn decoding_validates_names() {
        let bytes = postcard::to_stdvec(&"_bad".to_string()).unwrap();
        assert!(postcard::from_bytes::<TopicName>(&bytes).is_err());
        let bytes = postcard::to_stdvec(&"good".to_string()).unwrap();
        assert_eq!(postcard::from_bytes::<TopicName>(&bytes).unwrap().as_str(), "good");
    }

    proptest::proptest! {
        /// Every byte limit counts `encoded_size`: it must be what postcard writes.
        #[test]
        fn encoded_size_is_the_encoding(
            key in proptest::collection::vec(0u8.., 0..300),
            headers in proptest::collection::vec(("[a-z]{0,200}", proptest::collection::vec(0u8.., 0..200)), 0..6),
            payload in proptest::collection::vec(0u8.., 0..20_000),
        ) {
            let record = Record {
                key,
                headers: headers.into_iter().map(|(name, value)| Header { name, value }).collect(),
                payload,
            };
            proptest::prop_assert_eq!(record.encoded_size(), postcard::to_stdvec(&record).unwrap().len());
        }
    }

    #[test]
    fn empty_headers_count_and_are_capped_while_decoding() {
        let many = |n: usize| Record {
            headers: vec![Header { name: String::new(), value: Vec::new() }; n],
            ..Record::default()
        };
        let ok = many(MAX_HEADERS_PER_RECORD);
        let bytes = postcard::to_stdvec(&ok).unwrap();
        assert_eq!(ok.encoded_size(), bytes.len());
        assert!(ok.encoded_size() > 2 * MAX_HEADERS_PER_RECORD, "2 bytes per empty header");
        assert_eq!(postcard::from_bytes::<Record>(&bytes).unwrap(), ok);
        let bytes = postcard::to_stdvec(&many(MAX_HEADERS_PER_RECORD + 1)).unwrap();
        let err = postcard::from_bytes::<Record>(&bytes).unwrap_err();
        assert!(err.to_string().contains("limit") || matches!(err, postcard::Error::SerdeDeCustom), "{err}");
        // A count announced far beyond the bytes sent is refused before anything is allocated.
        let lie = [0u8, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(postcard::from_bytes::<Record>(&lie).is_err());
    }

    #[test]
    fn record_shape_caps() {
        let mut r = Record { key: vec![0; MAX_KEY_BYTES], ..Record::default() };
        assert!(r.check_shape().is_ok());
        r.key.push(0);
        assert!(r.check_shape().unwrap_err().contains("key"));
        let r = Record {
            headers: vec![Header { name: "n".repeat(MAX_HEADER_NAME_BYTES + 1), value: vec![] }],
            ..Record::default()
        };
        assert!(r.check_shape().unwrap_err().contains("header name"));
    }

    #[test]
    fn naming_addresses_take_lists_and_host_names() {
        let list: NamingAddrs = "127.0.0.1:7400, 127.0.0.1:7500,127.0.0.1:7400".parse().unwrap();
        assert_eq!(list.to_string(), "127.0.0.1:7400,127.0.0.1:7500", "duplicates dropped, order kept");
        let host: NamingAddrs = "localhost:7400".parse().unwrap();
        assert_eq!(host.first(), "127.0.0.1:7400".parse().unwrap(), "IPv4 first");
        for bad in ["", " , ", "127.0.0.1", "nohost.invalid:7400", "127.0.0.1:99999"] {
            let err = bad.parse::<NamingAddrs>().unwrap_err();
            assert!(err.contains("naming server address"), "{bad:?}: {err}");
        }
    }
}
