//! Wire format: postcard-encoded messages in length-prefixed frames.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of postcard. The length
//! is checked against [`MAX_FRAME_BYTES`] before anything is allocated, so a peer cannot make
//! us reserve memory by lying about a length. Every bidirectional QUIC stream carries a
//! sequence of [`Request`] frames one way and the same number of [`Response`] frames back, in
//! the same order; a client may pipeline many requests before reading the answers. The first
//! stream of every connection carries the version handshake ([`Request::Hello`]).
//! `docs/protocol.md` is the reference for other implementations.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::acl::{AclView, Grant};
use crate::error::Error;
use crate::replication::{FetchRequest, ParkedFetch, ReplicaChunk, ReplicaReset};
use crate::storage::chunk::{self, Chunk};
use crate::types::{
    Epoch, Index, Offset, ProducerId, Sequence, ServerId, StartFrom, SubscriptionName, TopicId, TopicName,
};
pub use crate::types::{Header, Record, StoredRecord};

/// The protocol version this build speaks, agreed in the `Hello` handshake (the ALPN,
/// `herald/1`, names the protocol family). Version 2 added topic policies, consumer
/// sessions, subscription resets and eviction notices. Version 3 replicates a log of
/// entries (cursor changes among them) and names learners. Version 4 answers heartbeats with
/// what changed since the server's version ([`Assignments`]). Version 5 places and moves
/// leaders (requests 26-29). Version 6 sends only the topic reports that changed. Version 9
/// ships records as stored, in record chunks, to followers and consumers ([`FetchedRecords`]).
/// Version 10 reads without a subscription (`Read`, `Locate`). Version 11 answers Raft
/// messages with the answering member's own messages for the sender (`RaftDelivered`).
/// Version 12 repairs a damaged chunk from another replica's copy (`ReadChunk`). Version 13
/// numbers park polls (`Park::poll`).
pub const PROTOCOL_VERSION: u16 = 13;

/// Largest frame accepted, in bytes. Bounds the memory one request can pin; a producer batch
/// is split well below it (see `client::MAX_BATCH_BYTES`).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Default largest record payload (plus key and headers) a topic accepts.
pub const DEFAULT_MAX_RECORD_BYTES: u32 = 1024 * 1024;

/// Upper bound for a topic's `max_record_bytes`, so one record always fits in a frame.
pub const MAX_RECORD_BYTES_LIMIT: u32 = 8 * 1024 * 1024;

/// Largest produce batch a server takes (its records, as encoded): room for the largest
/// record and some small ones. Half a frame, so a batch always fits in one replication chunk
/// and in one fetch answer with room to spare (our client sends at most
/// `client::MAX_BATCH_BYTES`).
pub const MAX_PRODUCE_BATCH_BYTES: usize = MAX_RECORD_BYTES_LIMIT as usize + 1024 * 1024;

/// Bytes a chunk of a fetch answer takes beyond its records' own
/// ([`FetchedRecords::record_size`]), at most: the offset of its first record (10), its length
/// (4, under a frame), checksum (4), timestamp (10) and count (3).
pub const CHUNK_ANSWER_OVERHEAD: usize = 32;

/// A fetch answer's records as the topic server stores them: record chunks (a checksum, the
/// batch's timestamp, length-prefixed records; see `storage::chunk`), each under the offset
/// of its first record. The server forwards the stored bytes without decoding a record; the
/// consumer checks each chunk's checksum (end to end: the bytes the leader wrote) and decodes
/// the records, the per-record work at the edge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchedRecords {
    #[serde(deserialize_with = "crate::types::bounded::fetched_chunks")]
    pub chunks: Vec<(Offset, bytes::Bytes)>,
}

impl FetchedRecords {
    /// Bytes a record takes in an answer, given its stored bytes: its length and itself.
    pub fn record_size(record: &[u8]) -> usize {
        crate::types::varint_len(record.len() as u64) + record.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The records, decoded, each chunk checked against its checksum first and the offsets
    /// checked to follow on from one chunk to the next.
    pub fn decode(&self) -> Result<Vec<StoredRecord>, Error> {
        let malformed = |detail: String| Error::Malformed { detail, enforced_by: "this reader".into() };
        let mut out = Vec::new();
        for (base, bytes) in &self.chunks {
            if let Some(last) = out.last().map(|r: &StoredRecord| r.offset) {
                if *base != last + 1 {
                    return Err(malformed(format!("a chunk at offset {base} does not follow offset {last}")));
                }
            }
            let chunk =
                Chunk::parse(bytes).map_err(|e| malformed(format!("the chunk at offset {base}: {e}")))?;
            // Room for its records at once; each takes a byte at least, which bounds a count
            // the bytes cannot hold.
            out.reserve((chunk.count as usize).min(bytes.len()));
            for (offset, raw) in (*base..).zip(chunk.records()) {
                let record = raw
                    .and_then(chunk::decode_record)
                    .map_err(|e| malformed(format!("the record at offset {offset}: {e}")))?;
                out.push(StoredRecord { offset, timestamp_ms: chunk.timestamp_ms, record });
            }
        }
        Ok(out)
    }
}

/// Bytes a `Records` answer takes beyond its chunks (variant, counts, offsets, an eviction
/// notice), rounded up.
pub const RECORDS_ANSWER_OVERHEAD: usize = 128;

/// Per-topic settings chosen at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Largest record (key + headers + payload) accepted, in bytes.
    pub max_record_bytes: u32,
    /// A JSON Schema every record's payload must follow (G10); `None` takes any bytes.
    pub schema: Option<String>,
    /// Most bytes the topic stores (G6); `None`: no limit.
    pub backlog_limit: Option<u64>,
    /// What happens at the limit.
    pub backlog_policy: BacklogPolicy,
}

impl Default for TopicConfig {
    fn default() -> Self {
        Self {
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            schema: None,
            backlog_limit: None,
            backlog_policy: BacklogPolicy::Reject,
        }
    }
}

/// What a topic does when its backlog reaches its limit (G6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum BacklogPolicy {
    /// Producers get `BacklogFull` until subscriptions read (and so free) records.
    #[default]
    Reject,
    /// The slowest subscriptions' cursors are moved forward past the oldest records, which
    /// frees them; each such eviction is recorded and reported to the next consumer.
    Evict,
}

impl BacklogPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            BacklogPolicy::Reject => "reject",
            BacklogPolicy::Evict => "evict",
        }
    }
}

/// Records the `evict` backlog policy skipped for a subscription before it read them: told
/// to the next consumer of the subscription, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evicted {
    pub records: u64,
    /// When the last eviction happened (ms since the Unix epoch).
    pub at_ms: u64,
    /// Where the subscription resumes.
    pub resume_at: Offset,
}

/// A consumer's identity while it holds a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerSession {
    /// Random per consumer instance.
    pub id: u64,
    /// Shown to others as the holder (process and host).
    pub name: String,
}

/// Where `ResetSubscription` moves a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResetTo {
    /// The log start: re-read everything still stored.
    Earliest,
    /// The committed end: skip everything not yet read.
    Latest,
    Offset(Offset),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetOutcome {
    pub before: Offset,
    pub after: Offset,
    pub log_start: Offset,
    pub commit: Offset,
    pub executed: bool,
}

/// Policy changes of `AlterTopic`; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicChanges {
    /// `Some(None)` removes the schema.
    pub schema: Option<Option<String>>,
    /// `Some(None)` removes the limit.
    pub backlog_limit: Option<Option<u64>>,
    pub backlog_policy: Option<BacklogPolicy>,
}

/// A topic server as the naming server knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub id: ServerId,
    pub addr: SocketAddr,
    /// Whether its liveness lease is current.
    pub alive: bool,
    /// Topics it holds a replica of.
    pub topics: u32,
    /// Topics it leads.
    pub leaders: u32,
    /// Topics whose preferred leader it is (what it leads once the cluster is balanced).
    pub preferred: u32,
}

/// One replica of a topic, as placed by the naming server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub server: ServerId,
    pub addr: SocketAddr,
}

/// The naming server's record of a topic: where it lives and who leads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    pub id: TopicId,
    pub name: TopicName,
    pub config: TopicConfig,
    /// The voters: the replicas that count toward commits and elections; the leader is one
    /// of them.
    pub replicas: Vec<ReplicaInfo>,
    /// Replicas copying the log before they count (a replacement catching up).
    pub learners: Vec<ReplicaInfo>,
    pub leader: ServerId,
    pub epoch: Epoch,
    pub created_ms: u64,
}

/// A server's topics in a heartbeat answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Assignments {
    /// Every topic whose replica set holds the server; it drops any other topic it hosts.
    All(Vec<TopicInfo>),
    /// What changed since version `known` (the `known_version` of the heartbeat): the
    /// server's topics that changed or are new to it, and the ids of topics it left since
    /// `known` (one it never took on, having come and gone in between, is simply not there).
    Since { known: u64, changed: Vec<TopicInfo>, dropped: Vec<TopicId> },
}

impl TopicInfo {
    /// Address of the current leader, if it is among the replicas.
    pub fn leader_addr(&self) -> Option<SocketAddr> {
        self.replicas.iter().find(|r| r.server == self.leader).map(|r| r.addr)
    }
}

/// The role a server plays for one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Leader,
    Follower,
}

/// A subscription's durable position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionInfo {
    pub name: SubscriptionName,
    /// The next offset it has not acknowledged.
    pub cursor: Offset,
    /// Committed records it has not acknowledged yet.
    pub lag: u64,
    /// Stored bytes of those records (summed up to 100,000 records behind, estimated from the
    /// average stored record beyond).
    pub lag_bytes: u64,
    /// When the leader last moved its cursor (ms since the Unix epoch; since the leader
    /// took over, as it is kept in memory).
    pub last_ack_ms: Option<u64>,
    /// The consumer holding it now, if any.
    pub consumer: Option<String>,
    /// Records the `evict` backlog policy skipped for it, ever.
    pub evicted: u64,
    /// When that last happened (ms since the Unix epoch).
    pub evicted_at_ms: Option<u64>,
}

/// A topic server's view of one topic's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicStatus {
    pub id: TopicId,
    pub name: TopicName,
    pub server: ServerId,
    pub role: Role,
    pub epoch: Epoch,
    /// Oldest offset still stored.
    pub log_start: Offset,
    /// One past the newest offset stored.
    pub log_end: Offset,
    /// One past the newest committed offset: what consumers may read and producers had acked.
    pub commit: Offset,
    /// Bytes stored for `log_start..log_end`.
    pub backlog_bytes: u64,
    pub subscriptions: Vec<SubscriptionInfo>,
    /// Per replica, as the leader sees them (only the leader fills this in).
    pub replicas: Vec<ReplicaStatus>,
}

/// Everything a client or a server may ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// First message of every connection: the versions the caller speaks.
    Hello {
        min_version: u16,
        max_version: u16,
        agent: String,
    },

    // --- To the naming server. Register and Heartbeat need a node certificate. ---
    /// A topic server announces itself (and its address) and takes a liveness lease.
    Register {
        server: ServerId,
        addr: SocketAddr,
    },
    /// Renews the lease. The naming server answers at once when the book changed since
    /// `known_version`, else after up to `wait_ms` (long poll), so assignments arrive promptly.
    Heartbeat {
        server: ServerId,
        known_version: u64,
        applied_version: u64,
        wait_ms: u32,
        /// What this server's replicas say of their topics: the naming server changes
        /// replica sets only when that is safe, and elects when a leader does not lead.
        reports: Reports,
    },
    CreateTopic {
        name: TopicName,
        replicas: u32,
        config: TopicConfig,
    },
    DeleteTopic {
        name: TopicName,
    },
    LookupTopic {
        name: TopicName,
    },
    ListTopics,
    ListServers,

    // --- To a topic server. ---
    /// Append a batch. The leader deduplicates by (producer, sequence): a retry of an
    /// acknowledged batch gets the original offsets back and stores nothing.
    Produce {
        topic: TopicName,
        producer: ProducerId,
        sequence: Sequence,
        #[serde(deserialize_with = "crate::types::bounded::records")]
        records: Vec<Record>,
    },
    /// Read committed records from `from` (or, if `None`, from the subscription's cursor),
    /// waiting up to `max_wait_ms` for the first one.
    Fetch {
        topic: TopicName,
        subscription: SubscriptionName,
        from: Option<Offset>,
        max_records: u32,
        max_bytes: u32,
        max_wait_ms: u32,
        /// The consumer reading; it holds the subscription while its session lease lasts
        /// (`None`: a read that does not take the subscription, e.g. an inspection).
        session: Option<ConsumerSession>,
    },
    /// Move a subscription's cursor forward to `next` (everything before it is processed).
    Ack {
        topic: TopicName,
        subscription: SubscriptionName,
        next: Offset,
        session: Option<ConsumerSession>,
    },
    CreateSubscription {
        topic: TopicName,
        subscription: SubscriptionName,
        from: StartFrom,
        /// Succeed without change when the subscription already exists.
        if_missing: bool,
    },
    DeleteSubscription {
        topic: TopicName,
        subscription: SubscriptionName,
        /// Even while a consumer holds it (that consumer is told `SubscriptionTakenOver`).
        force: bool,
    },
    TopicStatus {
        topic: TopicName,
    },

    // --- Between servers (node certificate required). ---
    /// A follower's fetch from the leader of `topic`; also its acknowledgement (see
    /// `replication`). `known_commit` is the commit point it already knows, so the leader
    /// answers early when it moved.
    ReplicaFetch {
        topic: TopicName,
        topic_id: TopicId,
        replica: ServerId,
        fetch: FetchRequest,
        known_commit: Index,
        max_bytes: u32,
        max_wait_ms: u32,
    },
    /// The naming server asks a replica to promise `epoch` for an election.
    Promise {
        topic: TopicName,
        topic_id: TopicId,
        epoch: Epoch,
    },

    // --- Added in protocol version 2 (appended, so older codes keep their index). ---
    /// Changes a topic's policies; answered once its replicas apply them.
    AlterTopic {
        name: TopicName,
        changes: TopicChanges,
    },
    /// A consumer lets go of a subscription, so the next one need not wait for its lease.
    Release {
        topic: TopicName,
        subscription: SubscriptionName,
        session: u64,
    },
    /// Moves a subscription's cursor anywhere in the stored log (back to re-read, forward to
    /// skip); with `execute: false` only says what it would do.
    ResetSubscription {
        topic: TopicName,
        subscription: SubscriptionName,
        to: ResetTo,
        execute: bool,
        /// Even while a consumer holds it (that consumer is told `SubscriptionTakenOver`).
        force: bool,
    },
    /// Raft messages from naming member `from` to the member called (naming servers only,
    /// with the node certificate).
    NamingRaft {
        from: u64,
        messages: Vec<Vec<u8>>,
        /// The sender's log is empty: if the leader had matched entries with it, its data
        /// directory was lost and it must be sent everything again.
        sender_empty: bool,
    },
    /// How this naming member sees its group.
    NamingStatus,
    /// A topic server is alive (sent to every naming member, so one that becomes leader
    /// knows at once which servers are; node certificate).
    NamingAlive {
        server: ServerId,
    },
    /// Topics after `after` in name order, a page at a time (at most `limit`, and
    /// `naming::core::TOPIC_PAGE_BYTES`).
    ListTopicsPage {
        after: Option<TopicName>,
        limit: u32,
    },
    /// Gives and takes back grants (superusers only); answered with all grants.
    ChangeAcl {
        grant: Vec<Grant>,
        revoke: Vec<Grant>,
    },
    /// The grants and superusers (superusers only).
    ListGrants,
    /// Retires a dead server that holds no replica (superusers only); answered `Deleted`.
    RemoveServer {
        server: ServerId,
    },
    /// Creates topics with one configuration, all or none, in one book change (at most
    /// `naming::core::MAX_TOPICS_PER_CHANGE`); answered `Topics` once they are placed.
    CreateTopics {
        #[serde(deserialize_with = "crate::types::bounded::topic_names")]
        names: Vec<TopicName>,
        replicas: u32,
        config: TopicConfig,
    },
    /// Deletes topics, all or none, in one book change; answered `Deleted`.
    DeleteTopics {
        #[serde(deserialize_with = "crate::types::bounded::topic_names")]
        names: Vec<TopicName>,
    },
    /// Hands every topic whose preferred leader is alive and caught up back to it now (admin
    /// on every topic); answered `Rebalanced` once the elections ended.
    Rebalance,
    /// A follower tells a leader, in one message for every topic it follows from that
    /// server, the epoch it follows each in (see `replication::AliveBook`); sent every half
    /// lease (`replica::FOLLOWER_ALIVE_PER_LEASE`), so idle fetches may wait long. The list
    /// (sorted by topic id) goes only when it changed; `digest` names it
    /// (`replication::digest`). Answered `Noted`, or `ListWanted` for a digest of a list the
    /// leader does not hold.
    FollowerAlive {
        replica: ServerId,
        digest: u64,
        #[serde(deserialize_with = "crate::types::bounded::followed")]
        topics: Option<Vec<(TopicId, Epoch)>>,
    },
    /// A follower's long poll for the topics it parked on this leader (see
    /// `replication::park`): registers `parked` (only those parked since its last poll) and
    /// is answered `Woken` once any parked topic has news, when a newer poll arrives, or
    /// after `max_wait_ms`. `poll` numbers it among the follower's polls (a repeat of the
    /// last number is a second delivery, held once).
    Park {
        replica: ServerId,
        poll: u64,
        #[serde(deserialize_with = "crate::types::bounded::parked")]
        parked: Vec<ParkedFetch>,
        max_wait_ms: u32,
    },

    /// To the naming group (request 31): `topic`'s entry once its epoch is past
    /// `past_epoch` (a new leader was elected), or as it is after `max_wait_ms`. A client
    /// whose leader went silent asks once and hears of the new leader the moment the book
    /// names it, instead of looking the topic up again and again (matrix F22).
    AwaitLeader {
        name: TopicName,
        past_epoch: Epoch,
        max_wait_ms: u32,
    },

    // --- Added in protocol version 10. ---
    /// To a topic server (request 32): read committed records from `from` without a
    /// subscription, waiting up to `max_wait_ms` for the first (`consume --offset`, `--tail`,
    /// `--from-time`). Nothing is held or acknowledged, so nothing keeps these records: they
    /// are still deleted once every subscription has read them.
    Read {
        topic: TopicName,
        from: Offset,
        max_records: u32,
        max_bytes: u32,
        max_wait_ms: u32,
    },
    /// To a topic server (request 33): where the records stamped at or after `time_ms`
    /// (ms since the Unix epoch) start. Answered with [`Response::Located`].
    Locate {
        topic: TopicName,
        time_ms: u64,
    },
    // --- Added in protocol version 12. ---
    /// From a topic server to another replica of the topic (request 34): its copy of the
    /// committed records `base..end` as one stored chunk, to repair a chunk that fails its
    /// checksum on the asking server (F19). Answered with [`Response::StoredChunk`].
    ReadChunk {
        topic: TopicName,
        topic_id: TopicId,
        replica: ServerId,
        base: Offset,
        end: Offset,
    },
}

/// A naming member's role in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberRole {
    /// Leads, and has applied everything committed before its term: it decides.
    Leader,
    Follower,
    /// Knows no leader (an election is under way, or it is cut off), or leads but has not
    /// caught up yet.
    Candidate,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Leader => "leader",
            MemberRole::Follower => "follower",
            MemberRole::Candidate => "candidate",
        }
    }
}

/// One naming member as it sees itself, for `herald naming status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: u64,
    pub role: MemberRole,
    pub term: u64,
    /// The last entry of its Raft log.
    pub last_index: u64,
    /// The last entry it applied to its book.
    pub applied: u64,
    /// The member it takes for leader.
    pub leader: Option<u64>,
    pub book_version: u64,
    /// It started with an empty log (a new member, or a lost data directory) and has not
    /// caught up yet: until then it votes for no member that has a log.
    pub rebuilding: bool,
}

/// The leader's answer to a [`Request::ReplicaFetch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplicaAnswer {
    Chunk(ReplicaChunk),
    Diverging {
        end_epoch: Epoch,
        end_index: Index,
    },
    Reset(ReplicaReset),
    /// The follower knows a newer epoch than this leader: it must wait for a new assignment.
    Fenced {
        epoch: Epoch,
    },
}

/// The topic reports of a heartbeat: those that changed since the last heartbeat of the
/// session, or, with `all`, every one (the naming server keeps each topic's latest).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reports {
    pub topics: Vec<TopicReport>,
    pub all: bool,
}

/// A replica's word on its topic, in a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicReport {
    pub topic: TopicId,
    /// The newest epoch this replica promised or followed.
    pub promised: Epoch,
    /// The epoch it leads, if it does.
    pub leading: Option<Epoch>,
    /// An epoch it was told to lead and would not (it held that epoch before a restart, or
    /// promised a newer one): the naming server must elect again.
    pub refused: Option<Epoch>,
    /// Leading: its epoch's first entry is committed.
    pub ready: bool,
    /// Leading, or handing its epoch on (refused because its disk is full): the replicas
    /// (voters and learners, itself included) holding everything it has.
    pub holders: Vec<ServerId>,
}

/// One replica as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub server: ServerId,
    pub role: Role,
    /// The replica's durable log end as last acknowledged to the leader (the leader's own for
    /// itself); `None` if it has not fetched in this epoch.
    pub log_end: Option<Offset>,
    /// It holds everything the leader has.
    pub caught_up: bool,
}

/// The answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Error(Error),
    Hello {
        version: u16,
        server: Option<ServerId>,
    },
    /// Registration accepted; heartbeat at least every `lease_ms / 3`. `cluster` identifies
    /// the naming server's book, so a server never deletes data on the word of another book.
    Registered {
        lease_ms: u32,
        cluster: u64,
    },
    /// The book's version and, when it changed since the caller's version, the caller's
    /// topics: what changed since then, or all of them when the naming leader cannot tell.
    Heartbeat {
        version: u64,
        assignments: Option<Assignments>,
        /// Who may do what, when it changed since the caller's version (or with `All`).
        acl: Option<AclView>,
        /// This naming leader has not had all the server's reports yet (it is new): the
        /// next heartbeat carries them all.
        send_all_reports: bool,
    },
    Topic(TopicInfo),
    Topics(Vec<TopicInfo>),
    Servers(Vec<ServerInfo>),
    Deleted,
    /// The batch is committed at `base..base + count`. `duplicate` marks a retry answered from
    /// the producer state without storing anything.
    Produced {
        base: Offset,
        count: u32,
        epoch: Epoch,
        duplicate: bool,
    },
    Records {
        records: FetchedRecords,
        log_start: Offset,
        commit: Offset,
        /// Set when the backlog policy skipped records of the subscription since a consumer
        /// was last told.
        evicted: Option<Evicted>,
    },
    /// The subscription's cursor after the request.
    Cursor {
        cursor: Offset,
    },
    /// A subscription was deleted; the log start moved by `freed_records` (`freed_bytes`).
    SubscriptionDeleted {
        freed_records: u64,
        freed_bytes: u64,
    },
    TopicStatus(TopicStatus),
    Replica(ReplicaAnswer),
    /// A replica's promise: its newest epoch and durable log end.
    Promised {
        last_epoch: Epoch,
        log_end: Offset,
    },
    /// What a reset did (or, unexecuted, would do).
    Reset(ResetOutcome),
    /// Raft messages were handed to the member; `messages` are its own Raft messages for
    /// the sender that stepping them produced (a heartbeat's or an append's answer), so a
    /// round of Raft takes one request instead of one each way.
    RaftDelivered {
        messages: Vec<Vec<u8>>,
        /// The answering member's log is empty (as [`Request::NamingRaft`]'s `sender_empty`).
        sender_empty: bool,
    },
    NamingStatus(MemberStatus),
    /// A [`Request::NamingAlive`] was taken.
    Noted,
    /// A page of topics; `next`: ask again with `after: next` for more.
    TopicPage {
        topics: Vec<TopicInfo>,
        next: Option<TopicName>,
    },
    Grants(AclView),
    /// Every topic `Rebalance` found not led by its preferred leader, and what became of it.
    Rebalanced(Vec<LeaderMove>),
    /// A `FollowerAlive` named a list the leader does not hold: send it.
    ListWanted,
    /// The parked topics that have news (fetch them again), maybe none.
    Woken(#[serde(deserialize_with = "crate::types::bounded::topic_ids")] Vec<TopicId>),
    /// Answers `Locate`: the first committed offset stamped at or after the time asked
    /// (`commit` when none is yet), with the log's bounds.
    Located {
        offset: Offset,
        log_start: Offset,
        commit: Offset,
    },
    /// A replica's copy of a committed chunk ([`Request::ReadChunk`]), as stored.
    StoredChunk {
        bytes: bytes::Bytes,
    },
}

/// One topic not led by its preferred leader, as `topic rebalance` found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderMove {
    pub topic: TopicName,
    /// Its leader when the rebalance started.
    pub from: ServerId,
    /// Its preferred leader.
    pub to: ServerId,
    /// Why no election was started for it (the preferred leader is down or behind, ...).
    pub skipped: Option<String>,
    /// Its preferred leader leads it now (the election ended with it chosen).
    pub moved: bool,
}

impl Response {
    /// The error inside, if this is an error response.
    pub fn into_result(self) -> Result<Response, Error> {
        match self {
            Response::Error(e) => Err(e),
            other => Ok(other),
        }
    }
}

/// Encodes `msg` as one frame (length prefix included), appended to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), Error> {
    let start = out.len();
    out.extend_from_slice(&[0; LENGTH_PREFIX]);
    let buf = std::mem::take(out);
    let mut buf = postcard::to_extend(msg, buf).map_err(Error::internal)?;
    let len = buf.len() - start - LENGTH_PREFIX;
    if len > MAX_FRAME_BYTES {
        buf.truncate(start);
        *out = buf;
        return Err(Error::FrameTooLarge {
            size: len as u64,
            limit: MAX_FRAME_BYTES as u64,
            enforced_by: "the sender".into(),
        });
    }
    buf[start..start + LENGTH_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    *out = buf;
    Ok(())
}

/// Reads and checks a frame's length prefix.
pub fn frame_length(prefix: [u8; LENGTH_PREFIX], enforced_by: &str) -> Result<usize, Error> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(Error::FrameTooLarge {
            size: len as u64,
            limit: MAX_FRAME_BYTES as u64,
            enforced_by: enforced_by.to_string(),
        });
    }
    Ok(len)
}

/// Decodes a frame body.
pub fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8], enforced_by: &str) -> Result<T, Error> {
    postcard::from_bytes(body)
        .map_err(|e| Error::Malformed { detail: e.to_string(), enforced_by: enforced_by.to_string() })
}

/// Decodes the first complete frame in `buf`: `Ok(None)` when more bytes are needed, else the
/// message and the bytes it used. The pure-bytes twin of `transport::read_frame`, fuzzed below.
pub fn decode_frame<'a, T: Deserialize<'a>>(
    buf: &'a [u8],
    enforced_by: &str,
) -> Result<Option<(T, usize)>, Error> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX) else { return Ok(None) };
    let len = frame_length(prefix.try_into().expect("4 bytes"), enforced_by)?;
    let Some(body) = buf.get(LENGTH_PREFIX..LENGTH_PREFIX + len) else { return Ok(None) };
    Ok(Some((decode_body(body, enforced_by)?, LENGTH_PREFIX + len)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn session() -> impl Strategy<Value = Option<ConsumerSession>> {
        proptest::option::of(
            (any::<u64>(), "[ -~]{0,40}").prop_map(|(id, name)| ConsumerSession { id, name }),
        )
    }

    fn record() -> impl Strategy<Value = Record> {
        (
            proptest::collection::vec(any::<u8>(), 0..16),
            proptest::collection::vec(("[a-z]{0,8}", proptest::collection::vec(any::<u8>(), 0..8)), 0..3),
            proptest::collection::vec(any::<u8>(), 0..256),
        )
            .prop_map(|(key, headers, payload)| Record {
                key,
                headers: headers.into_iter().map(|(name, value)| Header { name, value }).collect(),
                payload,
            })
    }

    fn request() -> impl Strategy<Value = Request> {
        let topic = "[a-z][a-z0-9.-]{0,20}".prop_map(|s| TopicName::new(s).unwrap());
        let sub = "[a-z][a-z0-9]{0,10}".prop_map(|s| SubscriptionName::new(s).unwrap());
        prop_oneof![
            (topic.clone(), any::<u64>(), any::<u64>(), proptest::collection::vec(record(), 0..8)).prop_map(
                |(topic, producer, sequence, records)| Request::Produce {
                    topic,
                    producer,
                    sequence,
                    records
                }
            ),
            (topic.clone(), sub.clone(), any::<Option<u64>>(), any::<u32>(), session()).prop_map(
                |(topic, subscription, from, n, session)| Request::Fetch {
                    topic,
                    subscription,
                    from,
                    max_records: n,
                    max_bytes: n,
                    max_wait_ms: n,
                    session,
                }
            ),
            (topic.clone(), any::<u64>(), any::<u32>()).prop_map(|(topic, from, n)| Request::Read {
                topic,
                from,
                max_records: n,
                max_bytes: n,
                max_wait_ms: n,
            }),
            (topic.clone(), any::<u64>()).prop_map(|(topic, time_ms)| Request::Locate { topic, time_ms }),
            (topic.clone(), any::<u64>(), any::<u64>()).prop_map(|(topic, id, base)| Request::ReadChunk {
                topic,
                topic_id: id,
                replica: id,
                base,
                end: base.saturating_add(id),
            }),
            (topic.clone(), sub.clone(), any::<u64>(), session()).prop_map(
                |(topic, subscription, next, session)| Request::Ack { topic, subscription, next, session }
            ),
            (topic.clone(), sub, any::<u64>(), any::<bool>()).prop_map(
                |(topic, subscription, o, execute)| {
                    Request::ResetSubscription {
                        topic,
                        subscription,
                        to: ResetTo::Offset(o),
                        execute,
                        force: false,
                    }
                }
            ),
            (any::<u64>(), any::<u64>()).prop_map(|(server, v)| Request::Heartbeat {
                server,
                known_version: v,
                applied_version: v,
                wait_ms: 5,
                reports: Reports {
                    topics: vec![TopicReport {
                        topic: v,
                        promised: v,
                        leading: Some(v),
                        refused: None,
                        ready: true,
                        holders: vec![server],
                    }],
                    all: v % 2 == 0,
                },
            }),
            topic.clone().prop_map(|name| Request::LookupTopic { name }),
            (topic, any::<u64>(), any::<u32>()).prop_map(|(name, past_epoch, max_wait_ms)| {
                Request::AwaitLeader { name, past_epoch, max_wait_ms }
            }),
            (
                any::<u64>(),
                proptest::option::of(proptest::collection::vec((any::<u64>(), any::<u64>()), 0..20))
            )
                .prop_map(|(digest, topics)| Request::FollowerAlive {
                    replica: 2,
                    digest,
                    topics
                }),
            (any::<u64>(), proptest::collection::vec(any::<(u64, u64, u64, u64)>(), 0..20)).prop_map(
                |(poll, parked)| {
                    Request::Park {
                        replica: 3,
                        poll,
                        parked: parked
                            .into_iter()
                            .map(|(topic, epoch, from, known_commit)| ParkedFetch {
                                topic,
                                epoch,
                                from,
                                known_commit,
                            })
                            .collect(),
                        max_wait_ms: 30_000,
                    }
                }
            ),
        ]
    }

    fn check_decodes_or_refuses<T: serde::de::DeserializeOwned>(
        bytes: &[u8],
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        match decode_frame::<T>(bytes, "test") {
            Ok(Some((_, used))) => prop_assert!(used <= bytes.len()),
            Ok(None) | Err(Error::Malformed { .. }) | Err(Error::FrameTooLarge { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn frames_round_trip(reqs in proptest::collection::vec(request(), 1..6)) {
            let mut buf = Vec::new();
            for r in &reqs { encode_frame(r, &mut buf).unwrap(); }
            let mut at = 0;
            for r in &reqs {
                let (got, used): (Request, usize) = decode_frame(&buf[at..], "test").unwrap().unwrap();
                prop_assert_eq!(&got, r);
                at += used;
            }
            prop_assert_eq!(at, buf.len());
        }

        /// Fuzz (longer with `make fuzz`): arbitrary bytes never panic the request decoder,
        /// and never make it read past the buffer.
        #[test]
        fn fuzz_request_decoder_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            check_decodes_or_refuses::<Request>(&bytes)?;
        }

        /// Fuzz: the same for the response decoder (what a client reads from a server).
        #[test]
        fn fuzz_response_decoder_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            check_decodes_or_refuses::<Response>(&bytes)?;
        }

        /// Fuzz: valid frames with bytes changed, inserted or removed (lengths and counts
        /// that lie, cut strings, bad variants) are refused or decoded, never a panic.
        #[test]
        fn fuzz_mutated_frames_are_refused_or_decoded(
            req in request(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8),
        ) {
            let mut buf = Vec::new();
            encode_frame(&req, &mut buf).unwrap();
            for (at, byte, kind) in edits {
                let at = at % (buf.len() + 1);
                match kind {
                    0 if at < buf.len() => buf[at] = byte,
                    1 => buf.insert(at, byte),
                    _ if at < buf.len() => { buf.remove(at); }
                    _ => {}
                }
            }
            check_decodes_or_refuses::<Request>(&buf)?;
        }

        /// A truncated frame is never decoded as a message.
        #[test]
        fn truncated_frames_wait_for_more(req in request(), cut in 0usize..64) {
            let mut buf = Vec::new();
            encode_frame(&req, &mut buf).unwrap();
            let cut = cut.min(buf.len() - 1);
            prop_assert!(decode_frame::<Request>(&buf[..cut], "test").unwrap().is_none());
        }
    }

    #[test]
    fn oversize_length_is_refused_before_reading_the_body() {
        let prefix = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        let err = decode_frame::<Request>(&prefix, "server 1").unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { limit, .. } if limit == MAX_FRAME_BYTES as u64));
    }

    #[test]
    fn invalid_names_inside_frames_are_malformed() {
        // A Produce whose topic name breaks the rule: encode a valid one and patch the name.
        let req = Request::LookupTopic { name: TopicName::new("abc").unwrap() };
        let mut buf = Vec::new();
        encode_frame(&req, &mut buf).unwrap();
        let pos = buf.windows(3).position(|w| w == b"abc").unwrap();
        buf[pos] = b'_';
        let err = decode_frame::<Request>(&buf, "test").unwrap_err();
        assert!(matches!(err, Error::Malformed { .. }));
    }
}
