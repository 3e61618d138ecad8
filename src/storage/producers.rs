//! Producers' batches: ordering by sequence, deduplication, refusals, room in the backlog.

use bytes::Bytes;

use super::backlog::make_room;
use super::chunk;
use super::state::{Appended, Pending};
use super::topic::{WriterTopic, PRODUCER_STATE_TTL_MS, PRODUCER_SWEEP_EVERY};
use super::writer::{StorageResult, Tx};
use crate::error::Error;
use crate::replication::{Entry, EntryKind};
use crate::types::{Offset, ProducerId, Record, Sequence, ServerId};

/// Producers one topic keeps dedup state for. Every producer's window (up to
/// `PRODUCER_DEDUP_WINDOW` outcomes of at most 46 bytes) travels in one replica reset: 2,048
/// of them take at most ~12 MiB of a 16 MiB frame.
pub const MAX_PRODUCERS_PER_TOPIC: usize = 2048;

/// At the producer limit, the producer silent the longest is forgotten for a new one if it
/// has been silent this long: far past any retry of a batch, so forgetting it cannot let a
/// retry in twice.
pub const PRODUCER_EVICT_IDLE_MS: u64 = 10 * 60 * 1000;

/// A producer's batch as the writer takes it.
pub(super) struct Batch {
    pub producer: ProducerId,
    pub sequence: Sequence,
    pub records: Vec<Record>,
    /// The server refused it already (e.g. a schema violation).
    pub refused: Option<Error>,
}

/// Appends a producer's batch, in order of its sequence (G4). A producer's batches are
/// numbered without gaps: a retry of one in the dedup window gets its first answer back; one
/// that skips a number waits (`OutOfOrderSequence`, retriable: the producer resends from
/// the missing one, in order), so a batch that failed can always be sent again. A producer
/// this replica does not know (new, or forgotten after a day) may start anywhere.
pub(super) fn append(
    txn: &Tx,
    t: &mut WriterTopic,
    batch: Batch,
    server: ServerId,
    now_ms: u64,
) -> StorageResult<Result<Appended, Error>> {
    let Batch { producer, sequence, records, refused } = batch;
    let epoch = match t.check_leading(server) {
        Ok(e) => e,
        Err(e) => return Ok(Err(e)),
    };
    if let Some(state) = t.dedup.states.get(&producer).filter(|s| !s.recent.is_empty()) {
        if let Some(seen) = state.find(sequence) {
            let at = Pending { index: seen.index, epoch: seen.epoch };
            let refused = seen.rejected.then(|| {
                Error::invalid(format!("batch {sequence} of producer {producer:#x} was refused earlier"))
            });
            return Ok(Ok(Appended { base: seen.base, count: seen.count, at, duplicate: true, refused }));
        }
        if sequence <= state.last_sequence {
            return Ok(Err(Error::invalid(format!(
                "batch {sequence} of producer {producer:#x} is older than the dedup window of {} batches",
                crate::replication::PRODUCER_DEDUP_WINDOW
            ))));
        }
        if sequence > state.last_sequence + 1 {
            let expected = state.last_sequence + 1;
            return Ok(Err(Error::OutOfOrderSequence { producer, expected, got: sequence }));
        }
    }
    if !t.dedup.states.contains_key(&producer) && t.dedup.states.len() >= MAX_PRODUCERS_PER_TOPIC {
        // Room for a new producer only by forgetting one silent for long enough that it
        // cannot be retrying a batch (its retries end after `client::DEFAULT_RETRY_DEADLINE`).
        let silent_longest = t.dedup.states.values().map(|p| p.last_ms).min().unwrap_or(now_ms);
        if now_ms.saturating_sub(silent_longest) < PRODUCER_EVICT_IDLE_MS {
            return Ok(Err(Error::LimitReached {
                what: format!("topic {:?} keeps dedup state for {} producers", t.name(), t.dedup.states.len()),
                limit: MAX_PRODUCERS_PER_TOPIC as u64,
                hint: "a new producer may start once one has been silent for 10 minutes; reuse producers rather than start one per batch".into(),
            }));
        }
    }
    let limit = t.meta.config.max_record_bytes as u64;
    let enforced_by =
        || format!("topic server {server} (max_record_bytes of topic {:?})", t.meta.name.as_str());
    let too_large = records.iter().enumerate().find_map(|(index, r)| {
        let size = r.encoded_size() as u64;
        if size > limit {
            return Some(Error::RecordTooLarge {
                index: index as u32,
                size,
                limit,
                enforced_by: enforced_by(),
            });
        }
        r.check_shape()
            .err()
            .map(|why| Error::invalid(format!("record {index} of the batch is refused: {why}")))
    });
    let ship = !t.meta.is_solo();
    if let Some(reason) = refused.or(too_large) {
        let entry = Entry { epoch, end: t.log_end, kind: EntryKind::Refused { producer, sequence } };
        let index = t.write_entry(txn, entry, Bytes::new(), ship)?;
        let at = Pending { index, epoch };
        return Ok(Ok(Appended { base: t.log_end, count: 0, at, duplicate: false, refused: Some(reason) }));
    }
    // Refused for the backlog: the sequence is not used, so the producer can send the same
    // batch again once subscriptions have read (and freed) records.
    if let Err(e) = make_room(txn, t, &records, epoch, now_ms)? {
        return Ok(Err(e));
    }
    let count = records.len() as u32;
    let base = t.log_end;
    let kind = EntryKind::Batch { count, timestamp_ms: now_ms, producer: Some((producer, sequence)) };
    let entry = Entry { epoch, end: base + count as Offset, kind };
    let index = t.write_entry(txn, entry, Bytes::from(chunk::encode(now_ms, &records)), ship)?;
    if t.batches_since_sweep >= PRODUCER_SWEEP_EVERY {
        t.expire_producers(txn, now_ms.saturating_sub(PRODUCER_STATE_TTL_MS))?;
    }
    Ok(Ok(Appended { base, count, at: Pending { index, epoch }, duplicate: false, refused: None }))
}
