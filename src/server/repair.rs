//! Finds chunks that fail their checksum and repairs them from another replica's copy (F19).
//!
//! Reads note a damaged chunk as they meet it, and a scrub checks every stored chunk when the
//! server starts and once a day after, at a bounded rate. For each damaged chunk this task
//! asks the topic's other replicas in turn for the committed records it held (`ReadChunk`)
//! and puts the first good copy in place (`Store::repair_chunk` checks it holds exactly the
//! lost records). Until then the chunk is never served: readers are told to retry.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::TopicServer;
use crate::error::Error;
use crate::replica::{Assignment, Replica};
use crate::storage::Store;
use crate::types::{Offset, ServerId, TopicId};
use crate::wire::{ReplicaInfo, Request, Response};

/// How long a chunk no replica could repair waits before it is tried again (a peer may be
/// down, or may not yet know the records committed).
pub const REPAIR_RETRY: Duration = Duration::from_secs(2);

/// Chunk bytes the scrub checks per step, and the pause between steps: at most ~40 MiB/s of
/// reads and checksums, a small part of one core, so a scrub never crowds out serving.
pub const SCRUB_STEP_BYTES: usize = 4 << 20;
/// See [`SCRUB_STEP_BYTES`].
pub const SCRUB_PAUSE: Duration = Duration::from_millis(100);

/// How often every stored chunk is checked again after the pass at start: damage found a
/// day late is still found while the other replicas hold good copies.
pub const SCRUB_EVERY: Duration = Duration::from_secs(24 * 60 * 60);

/// Checks every stored chunk now and every [`SCRUB_EVERY`], until `shutdown`.
pub async fn scrub(server: Arc<TopicServer>, shutdown: CancellationToken) {
    loop {
        let mut from = Some((0, 0));
        while let Some(at) = from {
            from = match server.node.store.scrub(at, SCRUB_STEP_BYTES) {
                Ok(next) => next,
                Err(e) => {
                    warn!(error = %e, "the scrub of stored chunks stopped; it starts again later");
                    None
                }
            };
            if from.is_some() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(SCRUB_PAUSE) => {}
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SCRUB_EVERY) => {}
        }
    }
}

/// Repairs damaged chunks until `shutdown`.
pub async fn repair_damaged(server: Arc<TopicServer>, shutdown: CancellationToken) {
    loop {
        for (topic, base) in server.node.store.damaged().list() {
            match repair_one(&server, topic, base).await {
                Ok(true) => {
                    info!(topic, base, "a damaged chunk was repaired from another replica's copy");
                    server.node.store.damaged().repaired(topic, base);
                }
                Ok(false) => server.node.store.damaged().forget(topic, base),
                Err(e) => debug!(topic, base, error = %e, "a damaged chunk is not repaired yet"),
            }
        }
        let waiting = !server.node.store.damaged().list().is_empty();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = server.node.store.damaged().wait() => {}
            _ = tokio::time::sleep(REPAIR_RETRY), if waiting => {}
        }
    }
}

/// Answers another replica's `ReadChunk`: this replica's committed records `base..end` as
/// one stored chunk (`Store::committed_chunk`), only to a server that holds a replica of the
/// topic (records go where they are stored anyway).
pub fn read_chunk_for(
    store: &Store,
    replica: &Replica,
    me: ServerId,
    asker: ServerId,
    base: Offset,
    end: Offset,
) -> Result<bytes::Bytes, Error> {
    if !repair_peers(&replica.assignment(), me).iter().any(|r| r.server == asker) {
        return Err(Error::invalid(format!("server {asker} holds no replica of {}", replica.log.name)));
    }
    store.committed_chunk(replica.log.id, base, end, replica.log.state().commit)
}

/// The replicas to ask for a copy of a damaged chunk: every other one the topic has.
pub fn repair_peers(assignment: &Assignment, me: ServerId) -> Vec<ReplicaInfo> {
    assignment.voters.iter().chain(&assignment.learners).filter(|r| r.server != me).cloned().collect()
}

/// Asks each other replica of `topic` for the chunk at `base`; returns whether a copy was put
/// in place (false: the chunk is gone, or no longer damaged).
async fn repair_one(server: &TopicServer, topic: TopicId, base: Offset) -> Result<bool, Error> {
    let hosted =
        server.topics.read().expect("topics lock").values().find(|h| h.replica.log.id == topic).cloned();
    let Some(hosted) = hosted else { return Ok(false) };
    let log = &hosted.replica.log;
    let Some(end) = server.node.store.damaged_chunk_end(topic, base, log.state().log_end)? else {
        return Ok(false);
    };
    // Where the other replicas are, as the naming server said: until it has, a restarted
    // server knows only their ids (it tries again after `REPAIR_RETRY`).
    let applied = hosted.applied.lock().expect("applied lock").clone();
    let peers = applied.map_or_else(Vec::new, |a| repair_peers(&a, server.node.id));
    let mut last = Error::Unavailable { detail: format!("no other replica of {} known yet", log.name) };
    for peer in peers {
        let req = Request::ReadChunk {
            topic: log.name.clone(),
            topic_id: topic,
            replica: server.node.id,
            base,
            end,
        };
        match server.node.call_peer(peer.addr, &req).await {
            Ok(Response::StoredChunk { bytes }) => {
                match server.node.store.repair_chunk(topic, base, bytes).await {
                    Ok(done) => return Ok(done),
                    Err(e) => {
                        warn!(topic = %log.name, base, from = peer.server, error = %e, "a replica's copy was refused");
                        last = e;
                    }
                }
            }
            Ok(Response::Error(e)) => last = e,
            Ok(other) => last = Error::internal(format!("unexpected answer to ReadChunk: {other:?}")),
            Err(e) => last = e,
        }
    }
    Err(last)
}
