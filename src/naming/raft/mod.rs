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
use raft::eraftpb::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType};
use raft::{RawNode, SnapshotStatus, StateRole};

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
    /// Applied changes between two snapshots of the book (see
    /// [`COMPACT_EVERY`](crate::naming::member::COMPACT_EVERY)); the simulator takes far
    /// fewer, so members are sent snapshots in its runs too.
    pub compact_every: u64,
}

/// The driver's tick, which also paces the naming core's decisions (an election starts
/// within a tick of a lease's end). With the defaults below a lost naming leader is missed
/// after 0.8-1.6 s, under the failover goal of 2 s, and a leader sends heartbeats every
/// 150 ms, so a follower misses 5 in a row before it campaigns (pre-vote then keeps a
/// member that was only slow from deposing a healthy leader).
pub const TICK_MS: u64 = 50;

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            election_ticks: 16,
            heartbeat_ticks: 3,
            randomized: true,
            compact_every: crate::naming::member::COMPACT_EVERY,
        }
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
    /// Committed changes, in log order.
    pub committed: Vec<Committed>,
}

/// A committed change and where it sits in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub index: u64,
    /// The term of the leader that proposed it: a proposer compares it with its own to tell
    /// its change from another leader's at the same index.
    pub term: u64,
    pub change: BookChange,
}

/// One member of the naming group.
///
/// # A member that lost its data directory
/// Raft counts on a member never forgetting what it acknowledged or whom it voted for. A
/// member that starts with an empty log may be one whose disk was lost: it holds nothing
/// of what it once helped commit, so its vote could elect a member that lacks committed
/// entries. Such a member is **rebuilding**: it grants no vote to a candidate with a log
/// until it has applied everything the leader had committed when it first heard from it
/// (then it holds what it had before, and more). Every member of a new group starts this
/// way too; its first leader is elected by members with empty logs, which lose nothing.
/// The leader, told with each message that the sender's log is empty, sends it everything
/// again ([`rebuild`](Self::rebuild)). Losing a majority's disks loses the book, as in any
/// Raft group.
pub struct BookNode {
    raw: RawNode<RaftLog>,
    log: RaftLog,
    /// Index of the last entry handed out as committed (or installed with a snapshot).
    applied: u64,
    /// Rebuilding from an empty log: `Some(0)` until a leader is heard from, then
    /// `Some(k)` until entry `k` is applied.
    rebuilding: Option<u64>,
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
        let empty = raw.raft.raft_log.last_index() == 0;
        let rebuilding = if empty { Some(0) } else { log.rebuilding()? };
        Ok(Self { raw, log, applied, rebuilding })
    }

    /// Whether this member is rebuilding from an empty log (and votes for no one with a log).
    pub fn rebuilding(&self) -> bool {
        self.rebuilding.is_some()
    }

    /// Notes what a leader's message says about a rebuilding member's goal; drops the
    /// vote requests it must not answer. Returns whether to step `message`.
    fn screen(&mut self, message: &Message) -> Result<bool, GroupError> {
        let Some(until) = self.rebuilding else { return Ok(true) };
        match message.get_msg_type() {
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => Ok(message.index == 0),
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot if until == 0 => {
                let commit = message.commit.max(message.get_snapshot().get_metadata().index).max(1);
                self.rebuilding = Some(commit);
                self.log.set_rebuilding(Some(commit))?;
                Ok(true)
            }
            _ => Ok(true),
        }
    }

    /// Ends rebuilding once the goal is applied (or this member was elected: then a
    /// majority found its log up to date).
    fn check_rebuilt(&mut self) -> Result<(), GroupError> {
        let done = match self.rebuilding {
            Some(0) => self.is_leader() && self.applied > 0,
            Some(until) => self.applied >= until,
            None => false,
        };
        if done {
            self.rebuilding = None;
            self.log.set_rebuilding(None)?;
        }
        Ok(())
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

    /// Whether this member leads and has applied every entry committed before its term (its
    /// first entry of the term is applied): only then does its book hold every decision.
    pub fn leader_ready(&self) -> bool {
        self.is_leader() && self.raw.raft.raft_log.term(self.applied).ok() == Some(self.term())
    }

    /// Starts an election at once (a group of one need not wait for a timeout).
    pub fn campaign(&mut self) -> Result<(), GroupError> {
        Ok(self.raw.campaign()?)
    }

    /// Proposes `change` and returns the (index, term) it will commit at if this member
    /// stays leader.
    pub fn propose_at(&mut self, change: &BookChange) -> Result<(u64, u64), GroupError> {
        self.propose(change)?;
        Ok((self.raw.raft.raft_log.last_index(), self.term()))
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
    pub fn step(&mut self, mut message: Message) -> Result<(), GroupError> {
        // A member rebuilt from an empty data directory has less than the leader remembers
        // it matched, and raft-rs panics on a heartbeat that commits past its log. Such a
        // heartbeat moves nothing; the appends that follow carry the entries with their
        // consistency check, and their commit.
        let last = self.raw.raft.raft_log.last_index();
        if message.get_msg_type() == MessageType::MsgHeartbeat && message.commit > last {
            message.commit = self.raw.raft.raft_log.committed;
        }
        if !self.screen(&message)? {
            return Ok(());
        }
        Ok(self.raw.step(message)?)
    }

    /// Whether this member's log is empty (a first start, or a data directory lost).
    pub fn log_is_empty(&self) -> bool {
        self.raw.raft.raft_log.last_index() == 0
    }

    /// Leader: `member` reports an empty log although it had matched some of ours (its data
    /// directory was lost). raft-rs would wait for an answer that never comes; sending it
    /// everything again, from a snapshot if the log was compacted, rebuilds it.
    pub fn rebuild(&mut self, member: u64) {
        if !self.is_leader() {
            return;
        }
        let Some(pr) = self.raw.raft.mut_prs().get_mut(member) else { return };
        if pr.matched == 0 {
            return;
        }
        pr.matched = 0;
        pr.pending_snapshot = 0;
        pr.become_probe();
        self.raw.raft.send_append(member);
    }

    /// The driver could not deliver messages to member `to` (the send failed or timed out),
    /// `snapshot` among them. raft-rs sends nothing more to a member while a snapshot to it
    /// is on its way, and waits to be told it was lost; without this a lost snapshot would
    /// leave the member behind for good.
    pub fn undelivered(&mut self, to: u64, snapshot: bool) {
        self.raw.report_unreachable(to);
        if snapshot {
            self.raw.report_snapshot(to, SnapshotStatus::Failure);
        }
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
        self.check_rebuilt()?;
        Ok(out)
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<(), GroupError> {
        for entry in entries {
            self.applied = entry.index;
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {} // a new leader's first entry
                EntryType::EntryNormal => {
                    let change =
                        BookChange::decode(&entry.data).map_err(|e| GroupError::Corrupt(e.to_string()))?;
                    out.committed.push(Committed { index: entry.index, term: entry.term, change });
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
