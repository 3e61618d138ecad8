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

/// A record as a producer sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Record {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub headers: Vec<Header>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// One record header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

impl Record {
    /// Bytes this record counts against the topic's `max_record_bytes`: key, headers, payload.
    pub fn size(&self) -> usize {
        self.key.len()
            + self.payload.len()
            + self.headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>()
    }
}

/// A stored record, as consumers receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub offset: Offset,
    /// Milliseconds since the Unix epoch, stamped by the leader when it appended the record.
    pub timestamp_ms: u64,
    pub record: Record,
}

/// The naming servers a client or a topic server may ask (`--naming A,B,C`; host names are
/// resolved once, at start). All are dialled at once; the one that answered last is
/// preferred, and a redirect names the leader.
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
