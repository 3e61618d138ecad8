//! The commands the writer takes: one variant per change, each with its reply channel.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::state::{Appended, CursorChange, LogState, Pending, TopicLog, TopicMeta};
use crate::error::Error;
use crate::replication::{ReplicaChunk, ReplicaReset};
use crate::types::{
    Epoch, Index, Offset, ProducerId, Record, Sequence, ServerId, StartFrom, SubscriptionName, TopicId,
};
use crate::wire::{ResetOutcome, ResetTo, TopicConfig};

/// How a command is answered.
pub type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// Everything the writer does, one variant per change.
pub enum Command {
    /// Starts hosting a topic (idempotent: an existing id keeps its data).
    CreateTopic {
        meta: TopicMeta,
        reply: Reply<Arc<TopicLog>>,
    },
    DeleteTopic {
        id: TopicId,
        reply: Reply<()>,
    },
    /// Records the naming server's latest assignment.
    Assign {
        topic: TopicId,
        voters: Vec<ServerId>,
        learners: Vec<ServerId>,
        leader: ServerId,
        epoch: Epoch,
        reply: Reply<()>,
    },
    /// Durably promises `epoch`; answers `(last epoch, log end index)` for the election.
    Promise {
        topic: TopicId,
        epoch: Epoch,
        reply: Reply<(Epoch, Index)>,
    },
    /// Writes `epoch`'s first entry as its leader.
    BecomeLeader {
        topic: TopicId,
        epoch: Epoch,
        reply: Reply<LogState>,
    },
    /// Leader: a producer's batch, or its refusal (`refused`: the server's policy check
    /// failed), which still uses the batch's sequence number.
    Append {
        topic: TopicId,
        producer: ProducerId,
        sequence: Sequence,
        records: Vec<Record>,
        refused: Option<Error>,
        reply: Reply<Appended>,
    },
    /// Follower: writes what the leader sent.
    ReplicaAppend {
        topic: TopicId,
        chunk: ReplicaChunk,
        reply: Reply<LogState>,
    },
    /// Follower: drops the divergent tail from this index on.
    Truncate {
        topic: TopicId,
        to: Index,
        reply: Reply<LogState>,
    },
    /// Follower: restarts at the leader's first stored entry.
    Reset {
        topic: TopicId,
        reset: ReplicaReset,
        reply: Reply<LogState>,
    },
    /// Leader: applies the entries below `index` (committed).
    Commit {
        topic: TopicId,
        index: Index,
        reply: Reply<u64>,
    },
    Ack {
        topic: TopicId,
        subscription: SubscriptionName,
        next: Offset,
        reply: Reply<CursorChange>,
    },
    CreateSubscription {
        topic: TopicId,
        subscription: SubscriptionName,
        from: StartFrom,
        if_missing: bool,
        reply: Reply<CursorChange>,
    },
    DeleteSubscription {
        topic: TopicId,
        subscription: SubscriptionName,
        reply: Reply<CursorChange>,
    },
    ResetCursor {
        topic: TopicId,
        subscription: SubscriptionName,
        to: ResetTo,
        execute: bool,
        reply: Reply<(ResetOutcome, Option<Pending>)>,
    },
    ExpireProducers {
        topic: TopicId,
        cutoff_ms: u64,
        reply: Reply<usize>,
    },
    SetMeta {
        key: &'static str,
        value: u64,
        reply: Reply<()>,
    },
    SetConfig {
        topic: TopicId,
        config: TopicConfig,
        reply: Reply<()>,
    },
    /// Replaces the damaged chunk at `base` with a peer's copy (F19); answers whether it was
    /// replaced (false: it is no longer damaged, or no longer stored).
    RepairChunk {
        topic: TopicId,
        base: Offset,
        bytes: bytes::Bytes,
        reply: Reply<bool>,
    },
}

impl Command {
    /// Answers the command with `err` without running it (the group failed before it ran).
    /// Only adds data (a producer's batch, a follower's copy): refused while the disk is
    /// full, unlike cursor moves and deletions, which free space, and a new epoch's small
    /// first entry (a leader that alone holds some entries must lead to hand them on).
    pub(super) fn adds_data(&self) -> bool {
        matches!(self, Command::Append { .. } | Command::ReplicaAppend { .. })
    }

    pub(super) fn fail(self, err: Error) {
        let e = err;
        let _ = match self {
            Command::CreateTopic { reply, .. } => reply.send(Err(e)).is_ok(),
            Command::DeleteTopic { reply, .. }
            | Command::Assign { reply, .. }
            | Command::SetMeta { reply, .. }
            | Command::SetConfig { reply, .. } => reply.send(Err(e)).is_ok(),
            Command::RepairChunk { reply, .. } => reply.send(Err(e)).is_ok(),
            Command::Promise { reply, .. } => reply.send(Err(e)).is_ok(),
            Command::BecomeLeader { reply, .. }
            | Command::ReplicaAppend { reply, .. }
            | Command::Truncate { reply, .. }
            | Command::Reset { reply, .. } => reply.send(Err(e)).is_ok(),
            Command::Append { reply, .. } => reply.send(Err(e)).is_ok(),
            Command::Commit { reply, .. } => reply.send(Err(e)).is_ok(),
            Command::Ack { reply, .. }
            | Command::CreateSubscription { reply, .. }
            | Command::DeleteSubscription { reply, .. } => reply.send(Err(e)).is_ok(),
            Command::ResetCursor { reply, .. } => reply.send(Err(e)).is_ok(),
            Command::ExpireProducers { reply, .. } => reply.send(Err(e)).is_ok(),
        };
    }
}
