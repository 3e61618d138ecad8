//! The naming book replicated on a group of naming servers with Raft (TiKV's raft-rs).
//!
//! raft-rs is a core without I/O, like our replication rules: [`BookNode`] feeds it ticks,
//! messages and proposals, makes what each `Ready` asks durable in redb ([`RaftLog`]), and
//! hands back the messages to send and the committed [`BookChange`]s to apply, in order. The
//! naming core decides changes; only the leader proposes them, and every member applies
//! them once committed, so each member's book is the same book. A driver (QUIC) or the
//! simulator carries the messages; neither decides anything.
//!
//! The group's members are fixed at its first start (`--peers`), as etcd's initial cluster;
//! changing them is a later step.

mod log;
#[cfg(test)]
mod tests;

pub use log::{LogError, Persist, RaftLog};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message};
use raft::{RawNode, StateRole};

use super::book::BookChange;

/// How the group keeps time, in ticks of the driver's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSettings {
    /// A follower that hears no leader for this many ticks (or up to twice as many, at
    /// random, when `randomized`) campaigns.
    pub election_ticks: usize,
    /// A leader sends heartbeats every this many ticks.
    pub heartbeat_ticks: usize,
    /// Let raft-rs pick election timeouts at random (a real server). The simulator turns it
    /// off and jitters its ticks from the seed instead, so a run stays a function of its seed.
    pub randomized: bool,
}

/// The driver's tick: with the defaults below a leader is missed after 1-2 s, the naming
/// server's own lease.
pub const TICK_MS: u64 = 100;

impl Default for GroupSettings {
    fn default() -> Self {
        Self { election_ticks: 10, heartbeat_ticks: 2, randomized: true }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("this naming server is not the group's leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("a committed book change does not decode: {0}")]
    Corrupt(String),
}

/// What one round of the group produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Raft messages to carry to the other members (`to` names each one's recipient).
    pub messages: Vec<Message>,
    /// A snapshot to install as the book before `committed` (a member far behind): its
    /// index and the encoded book.
    pub snapshot: Option<(u64, Vec<u8>)>,
    /// Committed changes, in log order, with their index.
    pub committed: Vec<(u64, BookChange)>,
}

/// One member of the naming group.
pub struct BookNode {
    raw: RawNode<RaftLog>,
    log: RaftLog,
    /// Index of the last entry handed out as committed (or installed with a snapshot).
    applied: u64,
}

impl BookNode {
    /// Starts member `id` of the group `peers` on `log`. On a first start every member is
    /// given the same configuration; after that the log's own is used. `applied` is the
    /// index the caller's book already reflects (the snapshot's, after a restart).
    pub fn open(id: u64, peers: &[u64], log: RaftLog, settings: GroupSettings) -> Result<Self, GroupError> {
        if !log.initialized() {
            log.set_conf_state(ConfState::from((peers.to_vec(), vec![])))?;
        }
        let applied = log.snapshot_now().get_metadata().index;
        let config = raft::Config {
            id,
            election_tick: settings.election_ticks,
            heartbeat_tick: settings.heartbeat_ticks,
            min_election_tick: settings.election_ticks,
            max_election_tick: if settings.randomized {
                2 * settings.election_ticks
            } else {
                settings.election_ticks + 1
            },
            applied,
            // A member cut off from a majority steps down, and a returning member does not
            // depose a healthy leader (pre-vote).
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: MAX_MESSAGE_BYTES,
            max_inflight_msgs: MAX_INFLIGHT_MESSAGES,
            ..raft::Config::default()
        };
        config.validate()?;
        let logger = slog::Logger::root(TracingDrain { id }, slog::o!());
        let raw = RawNode::new(&config, log.clone(), &logger)?;
        Ok(Self { raw, log, applied })
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    /// The member this one takes for leader, if it knows one.
    pub fn leader(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|l| *l != raft::INVALID_ID)
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// Last index in this member's log, and the last applied.
    pub fn indexes(&self) -> (u64, u64) {
        (self.raw.raft.raft_log.last_index(), self.applied)
    }

    /// One tick of the driver's clock; [`advance`](Self::advance) afterwards.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// A message from another member; [`advance`](Self::advance) afterwards. Messages for
    /// another member or from a past term are dropped by raft-rs itself.
    pub fn step(&mut self, message: Message) -> Result<(), GroupError> {
        Ok(self.raw.step(message)?)
    }

    /// Proposes `change` (leader only). It is decided once it comes back from
    /// [`advance`](Self::advance) as committed, on this member and the others alike.
    pub fn propose(&mut self, change: &BookChange) -> Result<(), GroupError> {
        if !self.is_leader() {
            return Err(GroupError::NotLeader { leader: self.leader() });
        }
        let data = postcard::to_stdvec(change).expect("a book change encodes");
        match self.raw.propose(vec![], data) {
            Err(raft::Error::ProposalDropped) => Err(GroupError::NotLeader { leader: self.leader() }),
            other => Ok(other?),
        }
    }

    /// Makes durable what raft-rs asks, and returns what to send and what to apply.
    pub fn advance(&mut self) -> Result<Output, GroupError> {
        let mut out = Output::default();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut ready = self.raw.ready();
        // Messages of a leader may go before its own write (Raft allows the leader to append
        // in parallel); a follower's answers wait for it (`persisted_messages`).
        out.messages.extend(ready.take_messages());
        let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
        self.log.persist(Persist {
            snapshot: snapshot.as_ref(),
            entries: ready.entries(),
            hard_state: ready.hs(),
        })?;
        if let Some(s) = snapshot {
            let index = s.get_metadata().index;
            out.snapshot = Some((index, s.data.to_vec()));
            self.applied = index;
        }
        self.apply(ready.take_committed_entries(), &mut out)?;
        out.messages.extend(ready.take_persisted_messages());
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.log.set_commit(commit);
        }
        out.messages.extend(light.take_messages());
        self.apply(light.take_committed_entries(), &mut out)?;
        self.raw.advance_apply();
        Ok(out)
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<(), GroupError> {
        for entry in entries {
            self.applied = entry.index;
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {} // a new leader's first entry
                EntryType::EntryNormal => {
                    let change =
                        postcard::from_bytes(&entry.data).map_err(|e| GroupError::Corrupt(e.to_string()))?;
                    out.committed.push((entry.index, change));
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&entry.data)
                        .map_err(|e| GroupError::Corrupt(e.to_string()))?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.log.set_conf_state(cs)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|e| GroupError::Corrupt(e.to_string()))?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.log.set_conf_state(cs)?;
                }
            }
        }
        Ok(())
    }

    /// Replaces the applied entries by a snapshot of the book (`book`, encoded as of the
    /// last applied index), so the log stays small.
    pub fn compact(&mut self, book: Vec<u8>) -> Result<(), GroupError> {
        Ok(self.log.compact(self.applied, book)?)
    }
}

/// Largest batch of entries in one append message (the book's changes are small).
pub const MAX_MESSAGE_BYTES: u64 = 1024 * 1024;

/// Append messages a leader keeps in flight to one follower before it waits for answers.
pub const MAX_INFLIGHT_MESSAGES: usize = 64;

/// Encodes a Raft message for the wire.
pub fn encode_message(m: &Message) -> Vec<u8> {
    m.write_to_bytes().expect("a raft message encodes")
}

/// Decodes a Raft message from the wire.
pub fn decode_message(bytes: &[u8]) -> Result<Message, GroupError> {
    Message::parse_from_bytes(bytes).map_err(|e| GroupError::Corrupt(e.to_string()))
}

/// raft-rs logs through slog; this passes its lines to `tracing` (at debug: the naming
/// server logs leader changes itself).
struct TracingDrain {
    id: u64,
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV as _;
        let mut fields = Fields(String::new());
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let (id, msg, fields) = (self.id, record.msg(), fields.0);
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(member = id, "raft: {msg}{fields}"),
            slog::Level::Warning => tracing::warn!(member = id, "raft: {msg}{fields}"),
            slog::Level::Info | slog::Level::Debug => tracing::debug!(member = id, "raft: {msg}{fields}"),
            slog::Level::Trace => tracing::trace!(member = id, "raft: {msg}{fields}"),
        }
        Ok(())
    }
}

struct Fields(String);

impl slog::Serializer for Fields {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}
