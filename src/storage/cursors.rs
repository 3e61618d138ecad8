//! Subscriptions' cursors: every change is an entry of the topic's log, written by its
//! leader; cursors never move backwards except by an explicit reset.

use super::state::{CursorChange, Pending};
use super::topic::WriterTopic;
use super::writer::{StorageResult, Tx};
use crate::error::Error;
use crate::replication::Cursor;
use crate::types::{Offset, ServerId, StartFrom, SubscriptionName};
use crate::wire::{ResetOutcome, ResetTo};

/// Moves a subscription's cursor forward to `next` (at most the commit point).
pub(super) fn ack(
    txn: &Tx,
    t: &mut WriterTopic,
    subscription: &SubscriptionName,
    next: Offset,
    server: ServerId,
) -> StorageResult<Result<CursorChange, Error>> {
    let epoch = match t.check_leading(server) {
        Ok(e) => e,
        Err(e) => return Ok(Err(e)),
    };
    let Some(cursor) = t.cursors.latest(subscription.as_str()) else {
        return Ok(Err(t.unknown_subscription(subscription.as_str())));
    };
    let commit = t.state.borrow().commit;
    if next > commit {
        return Ok(Err(Error::OffsetBeyondEnd { topic: t.name(), offset: next, log_end: commit }));
    }
    if next <= cursor.next {
        // Cursors never move backwards; the caller still waits for the change it is told of.
        return Ok(Ok(CursorChange {
            cursor: cursor.next,
            pending: t.pending_change(subscription.as_str()),
        }));
    }
    // A consumer acks past an eviction only after a read that told it of the eviction (a
    // notice rides on every read until then): the notice is delivered.
    let moved = Cursor { next, unreported: 0, ..cursor };
    let at = t.set_cursor(txn, subscription.as_str(), Some(moved), epoch)?;
    Ok(Ok(CursorChange { cursor: next, pending: Some(at) }))
}

/// Creates a subscription at the log start or the commit point.
/// Subscriptions one topic may have. Every record is kept until each has read it, every
/// subscription's cursor travels in a replica reset (with its name, up to 128 bytes), and
/// `topic describe` lists them all in one answer.
pub const MAX_SUBSCRIPTIONS_PER_TOPIC: usize = 1024;

pub(super) fn create_subscription(
    txn: &Tx,
    t: &mut WriterTopic,
    subscription: &SubscriptionName,
    from: StartFrom,
    if_missing: bool,
    server: ServerId,
) -> StorageResult<Result<CursorChange, Error>> {
    let epoch = match t.check_leading(server) {
        Ok(e) => e,
        Err(e) => return Ok(Err(e)),
    };
    if let Some(cursor) = t.cursors.latest(subscription.as_str()) {
        return Ok(if if_missing {
            Ok(CursorChange { cursor: cursor.next, pending: t.pending_change(subscription.as_str()) })
        } else {
            Err(Error::SubscriptionExists { topic: t.name(), subscription: subscription.to_string() })
        });
    }
    let subscriptions = t.cursors.latest_all().len();
    if subscriptions >= MAX_SUBSCRIPTIONS_PER_TOPIC {
        return Ok(Err(Error::LimitReached {
            what: format!("topic {:?} has {subscriptions} subscriptions", t.name()),
            limit: MAX_SUBSCRIPTIONS_PER_TOPIC as u64,
            hint: "delete unused ones with `herald subscription delete`".into(),
        }));
    }
    // The log start every entry before this one allows: a new subscription never starts
    // below what another replica may already have deleted.
    let cursor = match from {
        StartFrom::Earliest => t.cursors.latest_log_start().max(t.meta.log_start),
        StartFrom::Latest => t.state.borrow().commit,
    };
    let at = t.set_cursor(txn, subscription.as_str(), Some(Cursor::at(cursor)), epoch)?;
    Ok(Ok(CursorChange { cursor, pending: Some(at) }))
}

/// Moves a cursor anywhere between the log start and the commit point, or only tells where
/// it would go (`execute` false).
#[allow(clippy::too_many_arguments)]
pub(super) fn reset_cursor(
    txn: &Tx,
    t: &mut WriterTopic,
    subscription: &SubscriptionName,
    to: ResetTo,
    execute: bool,
    server: ServerId,
) -> StorageResult<Result<(ResetOutcome, Option<Pending>), Error>> {
    let epoch = match t.check_leading(server) {
        Ok(e) => e,
        Err(e) => return Ok(Err(e)),
    };
    let Some(before) = t.cursors.latest(subscription.as_str()) else {
        return Ok(Err(t.unknown_subscription(subscription.as_str())));
    };
    let (log_start, commit) = (t.cursors.latest_log_start().max(t.meta.log_start), t.state.borrow().commit);
    let after = match to {
        ResetTo::Earliest => log_start,
        ResetTo::Latest => commit,
        ResetTo::Offset(o) if o < log_start => {
            return Ok(Err(Error::CursorBeforeLogStart {
                topic: t.name(),
                subscription: None,
                offset: o,
                log_start,
            }))
        }
        ResetTo::Offset(o) if o > commit => {
            return Ok(Err(Error::OffsetBeyondEnd { topic: t.name(), offset: o, log_end: commit }))
        }
        ResetTo::Offset(o) => o,
    };
    let mut pending = None;
    if execute && after != before.next {
        pending =
            Some(t.set_cursor(txn, subscription.as_str(), Some(Cursor { next: after, ..before }), epoch)?);
    }
    let outcome = ResetOutcome { before: before.next, after, log_start, commit, executed: execute };
    Ok(Ok((outcome, pending)))
}

/// Deletes a subscription: a cursor entry with no cursor.
pub(super) fn delete_subscription(
    txn: &Tx,
    t: &mut WriterTopic,
    subscription: &SubscriptionName,
    server: ServerId,
) -> StorageResult<Result<CursorChange, Error>> {
    let epoch = match t.check_leading(server) {
        Ok(e) => e,
        Err(e) => return Ok(Err(e)),
    };
    match t.cursors.latest(subscription.as_str()) {
        None => Ok(Err(t.unknown_subscription(subscription.as_str()))),
        Some(c) => {
            let at = t.set_cursor(txn, subscription.as_str(), None, epoch)?;
            Ok(Ok(CursorChange { cursor: c.next, pending: Some(at) }))
        }
    }
}
