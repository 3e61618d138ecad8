//! The one error type that crosses the wire.
//!
//! Variants are grouped by what the caller should do: fix the request (invalid input), look
//! elsewhere (routing, retriable), or give up and report (server faults). Each variant's
//! position in the enum is its stable numeric code on the wire (postcard encodes the variant
//! index first); new variants are only ever appended. `docs/protocol.md` lists the codes and
//! a unit test below pins them.

use serde::{Deserialize, Serialize};

use crate::types::{Offset, ProducerId, Sequence, ServerId};

/// An error a Herald server reports to a client, or a client detects before sending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Error {
    // --- The request is wrong: fix it, retrying will not help. ---
    /// 0
    #[error("invalid {what} name {name:?}: must be {rule}")]
    InvalidName { what: String, name: String, rule: String },
    /// 1
    #[error("record {index} of the batch is {size} bytes, over the limit of {limit} bytes enforced by {enforced_by}")]
    RecordTooLarge { index: u32, size: u64, limit: u64, enforced_by: String },
    /// 2
    #[error("frame of {size} bytes is over the limit of {limit} bytes enforced by {enforced_by}")]
    FrameTooLarge { size: u64, limit: u64, enforced_by: String },
    /// 3
    #[error("malformed frame rejected by {enforced_by}: {detail}")]
    Malformed { detail: String, enforced_by: String },
    /// 4
    #[error("protocol version {offered_min}..={offered_max} not supported by {enforced_by} (it speaks {supported})")]
    UnsupportedVersion { offered_min: u16, offered_max: u16, supported: u16, enforced_by: String },
    /// 5
    #[error("unknown topic {topic:?} (list topics with `herald topic list`, create one with `herald topic create`)")]
    UnknownTopic { topic: String },
    /// 6
    #[error("topic {topic:?} already exists")]
    TopicExists { topic: String },
    /// 7
    #[error(
        "unknown subscription {subscription:?} on topic {topic:?} (see `herald subscription list {topic}`)"
    )]
    UnknownSubscription { topic: String, subscription: String },
    /// 8
    #[error("subscription {subscription:?} already exists on topic {topic:?}")]
    SubscriptionExists { topic: String, subscription: String },
    /// 9
    #[error("offset {offset} of topic {topic:?} is before the log start {log_start}: those records were deleted{}", subscription.as_ref().map(|s| format!("; subscription {s:?} is behind the log: see what a reset does with `herald subscription reset {topic} {s} --to-earliest`, then add --execute")).unwrap_or_default())]
    CursorBeforeLogStart { topic: String, subscription: Option<String>, offset: Offset, log_start: Offset },
    /// 10
    #[error("offset {offset} of topic {topic:?} is past the committed end {log_end}")]
    OffsetBeyondEnd { topic: String, offset: Offset, log_end: Offset },
    /// 11
    #[error("producer {producer:#x} sent sequence {got}, expected {expected}: batches were lost between client and server")]
    OutOfOrderSequence { producer: ProducerId, expected: Sequence, got: Sequence },
    /// 12
    #[error("cannot place {requested} replicas: only {live} topic servers are alive (start more servers or use --replicas {live})")]
    NotEnoughServers { requested: u32, live: u32 },
    /// 13
    #[error("not authorized: {detail}")]
    Unauthorized { detail: String },
    /// 14
    #[error("invalid argument: {detail}")]
    InvalidArgument { detail: String },

    // --- Routing: ask the naming server again and retry. ---
    /// 15
    #[error("server {server} does not lead topic {topic:?}{}", leader.map(|l| format!(" (leader is server {l})")).unwrap_or_default())]
    NotLeader { topic: String, server: ServerId, leader: Option<ServerId> },
    /// 16
    #[error("unavailable: {detail}")]
    Unavailable { detail: String },

    // --- The server failed: report it. Nothing acknowledged was lost. ---
    /// 17
    #[error("storage failure on server {server}: {detail}")]
    Storage { server: ServerId, detail: String },
    /// 18
    #[error("internal error: {detail}")]
    Internal { detail: String },
    /// 19
    #[error("epoch {epoch} of topic {topic:?} is stale: server {server} has promised epoch {current}")]
    StaleEpoch { topic: String, server: ServerId, epoch: u64, current: u64 },
    /// A record does not follow the topic's JSON Schema; its whole batch was refused.
    #[error("record {index} of the batch does not follow the schema of topic {topic:?}: {detail}")]
    SchemaViolation { topic: String, index: u32, detail: String },
    /// Another consumer holds the subscription (one consumer per subscription at a time).
    #[error("subscription {subscription:?} of topic {topic:?} is in use by {holder} (its session lease ends in {expires_in_ms} ms unless it keeps reading; it is freed at once when that consumer stops)")]
    SubscriptionBusy { topic: String, subscription: String, holder: String, expires_in_ms: u64 },
    /// The topic's backlog is at its limit under the `reject` policy; nothing was appended.
    #[error("{}", backlog_full(topic, *limit, *backlog, *batch, oldest_held_by.as_deref()))]
    BacklogFull {
        topic: String,
        limit: u64,
        backlog: u64,
        /// Bytes the refused batch would have added (as stored).
        batch: u64,
        oldest_held_by: Option<String>,
    },
    /// A naming member that does not lead its group: ask the leader (`leader`, if known).
    #[error("naming member {member} does not lead the naming group{}", leader.map(|l| format!(" (the leader is at {l})")).unwrap_or_else(|| " (no leader known yet: an election is under way)".into()))]
    NamingNotLeader { member: u64, leader: Option<std::net::SocketAddr> },
    /// 24: the next record does not fit in the fetch's `max_bytes`; fetch again with at
    /// least `size` (our client does so by itself).
    #[error("the record at offset {offset} of topic {topic:?} is {size} bytes as encoded, more than this fetch's max_bytes of {max_bytes}: fetch again with max_bytes of at least {size}")]
    FetchTooSmall { topic: String, offset: Offset, size: u64, max_bytes: u64 },
    /// 25: a count or size limit was reached; nothing was changed.
    #[error("{what}: the limit is {limit}{}", if hint.is_empty() { String::new() } else { format!(" ({hint})") })]
    LimitReached { what: String, limit: u64, hint: String },
    /// 26: the topic is in the book, but not enough of its replicas took it on in time to
    /// commit anything (`hosting` of `replicas`, its leader among them or not). It stays in
    /// the book and becomes usable once they do; delete it if it was a mistake.
    #[error("topic {topic:?} was created, but only {hosting} of its {replicas} replicas took it on within {waited_ms} ms{}: they may be unreachable or failing (`herald servers`); it becomes usable once a majority, its leader among them, do (`herald topic describe {topic}`)", if *leader_hosts { "" } else { ", its leader not among them" })]
    NotPlaced { topic: String, hosting: u32, replicas: u32, leader_hosts: bool, waited_ms: u64 },
    /// 27: the principal may not do this (no grant covers it; see `herald acl`).
    #[error("{principal} may not {} {topic} ({hint})", operation_phrase(operation))]
    NotAuthorized { principal: String, operation: String, topic: String, hint: String },
    /// 28: this consumer held the subscription until someone reset or deleted it with
    /// `--force`; its position is gone, so it must start again (not retried).
    #[error("subscription {subscription:?} of topic {topic:?} was taken from this consumer by {by} (a reset or delete with --force): its position no longer holds; start the consumer again")]
    SubscriptionTakenOver { topic: String, subscription: String, by: String },
}

/// How a refusal reads: "produce to", "consume from", "describe", "administer".
fn operation_phrase(operation: &str) -> &str {
    match operation {
        "produce" => "produce to",
        "consume" => "consume from",
        "admin" => "administer",
        other => other,
    }
}

/// `BacklogFull`'s message: what is stored, what came, and what frees room.
fn backlog_full(topic: &str, limit: u64, backlog: u64, batch: u64, oldest_held_by: Option<&str>) -> String {
    let fix = if batch > limit {
        "the batch alone is over the limit: send fewer records at a time, or raise the limit".to_string()
    } else {
        match oldest_held_by {
            Some(s) => format!("subscription {s:?} holds the oldest records: consume or reset it, or delete it if unused"),
            None => "no subscription reads it: its records are kept for future subscribers; create one and consume, or raise the limit".to_string(),
        }
    };
    format!(
        "topic {topic:?} cannot take a batch of {batch} bytes: its backlog limit is {limit} bytes and {backlog} bytes are stored; {fix}"
    )
}

impl Error {
    /// A short snake_case name of the variant, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidName { .. } => "invalid_name",
            Error::RecordTooLarge { .. } => "record_too_large",
            Error::FrameTooLarge { .. } => "frame_too_large",
            Error::Malformed { .. } => "malformed",
            Error::UnsupportedVersion { .. } => "unsupported_version",
            Error::UnknownTopic { .. } => "unknown_topic",
            Error::TopicExists { .. } => "topic_exists",
            Error::UnknownSubscription { .. } => "unknown_subscription",
            Error::SubscriptionExists { .. } => "subscription_exists",
            Error::CursorBeforeLogStart { .. } => "cursor_before_log_start",
            Error::OffsetBeyondEnd { .. } => "offset_beyond_end",
            Error::OutOfOrderSequence { .. } => "out_of_order_sequence",
            Error::NotEnoughServers { .. } => "not_enough_servers",
            Error::Unauthorized { .. } => "unauthorized",
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::NotLeader { .. } => "not_leader",
            Error::Unavailable { .. } => "unavailable",
            Error::Storage { .. } => "storage",
            Error::Internal { .. } => "internal",
            Error::StaleEpoch { .. } => "stale_epoch",
            Error::SchemaViolation { .. } => "schema_violation",
            Error::SubscriptionBusy { .. } => "subscription_busy",
            Error::BacklogFull { .. } => "backlog_full",
            Error::NamingNotLeader { .. } => "naming_not_leader",
            Error::FetchTooSmall { .. } => "fetch_too_small",
            Error::LimitReached { .. } => "limit_reached",
            Error::NotPlaced { .. } => "not_placed",
            Error::NotAuthorized { .. } => "not_authorized",
            Error::SubscriptionTakenOver { .. } => "subscription_taken_over",
        }
    }

    /// The stable numeric code of this error on the wire.
    pub fn code(&self) -> u16 {
        // postcard writes the variant index as the first varint; all codes are < 128.
        postcard::to_stdvec(self).map(|b| b[0] as u16).unwrap_or(u16::MAX)
    }

    /// Whether retrying the same request (after re-resolving the leader) may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            Error::NotLeader { .. }
                | Error::NamingNotLeader { .. }
                | Error::Unavailable { .. }
                | Error::Storage { .. }
                | Error::StaleEpoch { .. }
                | Error::OutOfOrderSequence { .. }
        )
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Error::Internal { detail: detail.to_string() }
    }

    pub fn invalid(detail: impl std::fmt::Display) -> Self {
        Error::InvalidArgument { detail: detail.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes are part of the protocol (docs/protocol.md): changing one breaks clients.
    #[test]
    fn codes_are_stable() {
        let s = String::new;
        let cases: Vec<(Error, u16)> = vec![
            (Error::InvalidName { what: s(), name: s(), rule: s() }, 0),
            (Error::RecordTooLarge { index: 0, size: 0, limit: 0, enforced_by: s() }, 1),
            (Error::FrameTooLarge { size: 0, limit: 0, enforced_by: s() }, 2),
            (Error::Malformed { detail: s(), enforced_by: s() }, 3),
            (Error::UnknownTopic { topic: s() }, 5),
            (Error::CursorBeforeLogStart { topic: s(), subscription: None, offset: 0, log_start: 0 }, 9),
            (Error::NotLeader { topic: s(), server: 0, leader: None }, 15),
            (Error::Internal { detail: s() }, 18),
            (Error::StaleEpoch { topic: s(), server: 0, epoch: 0, current: 0 }, 19),
            (Error::SchemaViolation { topic: s(), index: 0, detail: s() }, 20),
            (Error::SubscriptionBusy { topic: s(), subscription: s(), holder: s(), expires_in_ms: 0 }, 21),
            (Error::BacklogFull { topic: s(), limit: 0, backlog: 0, batch: 0, oldest_held_by: None }, 22),
            (Error::NamingNotLeader { member: 1, leader: None }, 23),
            (Error::FetchTooSmall { topic: s(), offset: 0, size: 0, max_bytes: 0 }, 24),
            (Error::LimitReached { what: s(), limit: 0, hint: s() }, 25),
            (Error::NotPlaced { topic: s(), hosting: 0, replicas: 0, leader_hosts: false, waited_ms: 0 }, 26),
            (Error::NotAuthorized { principal: s(), operation: s(), topic: s(), hint: s() }, 27),
            (Error::SubscriptionTakenOver { topic: s(), subscription: s(), by: s() }, 28),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err:?}");
        }
    }

    #[test]
    fn only_routing_and_faults_are_retriable() {
        assert!(Error::Unavailable { detail: "x".into() }.is_retriable());
        assert!(!Error::UnknownTopic { topic: "t".into() }.is_retriable());
    }
}
