//! The backlog limit (G6): a topic keeps at most so many bytes, refusing producers or evicting
//! the slowest subscriptions, with a record of what each lost.

use tracing::warn;

use super::topic::{each_record_size, WriterTopic};
use super::writer::{StorageResult, Tx};
use crate::error::Error;
use crate::replication::Cursor;
use crate::types::{Epoch, Offset, Record};
use crate::wire::BacklogPolicy;

/// What the last eviction freed, until the deletion catches up: the next batches count it as
/// gone rather than evict again (and scan the log again) while the cursor moves replicate.
#[derive(Debug, Clone, Copy)]
pub(super) struct Evicting {
    /// Records below this offset are on their way out.
    until: Offset,
    /// Their bytes, when the eviction was decided.
    bytes: u64,
    /// `freed_bytes` then: what was deleted since counts against `bytes`.
    freed_mark: u64,
}

/// Stored bytes of a record beyond its own size (framing, timestamp), for the backlog check.
const STORED_OVERHEAD: u64 = 16;

/// Keeps a topic within its backlog limit before `records` are appended. Under `reject` it
/// refuses them, naming the subscription that holds the oldest records. Under `evict` it
/// moves the slowest subscriptions past the oldest records, down to 90 % of the limit so
/// evictions come in steps, and records how many each lost; the records are freed once the
/// moves are applied. Only committed records are evicted; a topic without subscriptions keeps
/// its records and refuses more.
pub(super) fn make_room(
    txn: &Tx,
    t: &mut WriterTopic,
    records: &[Record],
    epoch: Epoch,
    now_ms: u64,
) -> StorageResult<Result<(), Error>> {
    let Some(limit) = t.meta.config.backlog_limit else { return Ok(Ok(())) };
    let incoming: u64 = records.iter().map(|r| r.encoded_size() as u64 + STORED_OVERHEAD).sum();
    if t.bytes + incoming <= limit {
        return Ok(Ok(()));
    }
    let latest = t.cursors.latest_all();
    let slowest = latest.iter().min_by_key(|(_, c)| c.next).map(|(name, c)| (name.clone(), c.next));
    let full = |t: &WriterTopic| Error::BacklogFull {
        topic: t.name(),
        limit,
        backlog: t.bytes,
        batch: incoming,
        oldest_held_by: slowest.as_ref().map(|(name, _)| name.clone()),
    };
    let Some((_, lowest)) = slowest.clone() else { return Ok(Err(full(t))) };
    if t.meta.config.backlog_policy == BacklogPolicy::Reject {
        return Ok(Err(full(t)));
    }
    // What an earlier eviction (or read records) will free once its deletion is applied.
    let (scan_from, pending) = match t.evicting {
        Some(e) if t.meta.log_start < e.until => {
            (e.until, e.bytes.saturating_sub(t.freed_bytes.saturating_sub(e.freed_mark)))
        }
        _ => (t.meta.log_start, 0),
    };
    let effective = t.bytes.saturating_sub(pending);
    if effective + incoming <= limit {
        return Ok(Ok(()));
    }
    let need = (effective + incoming).saturating_sub(limit / 10 * 9);
    let commit = t.state.borrow().commit;
    let (id, mut target, mut freed) = (t.meta.id, scan_from, 0u64);
    each_record_size(txn, id, scan_from, commit, |offset, size| {
        freed += size;
        target = offset + 1;
        freed < need
    })?;
    t.evicting = Some(Evicting { until: target, bytes: pending + freed, freed_mark: t.freed_bytes });
    if target <= lowest {
        // What is below the slowest cursor is read and waits for deletion; nothing to evict.
        return Ok(Ok(()));
    }
    let behind: Vec<(String, Cursor)> = latest.into_iter().filter(|(_, c)| c.next < target).collect();
    for (name, c) in behind {
        let lost = target - c.next;
        warn!(topic = %t.meta.name, subscription = %name, from = c.next, to = target, lost, limit, "backlog limit reached: evicted records the subscription had not read");
        let moved = Cursor {
            next: target,
            unreported: c.unreported + lost,
            evicted: c.evicted + lost,
            evicted_at_ms: now_ms,
        };
        t.set_cursor(txn, &name, Some(moved), epoch)?;
    }
    Ok(Ok(()))
}
