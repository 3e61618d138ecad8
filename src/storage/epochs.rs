//! Epochs: a replica's promises and the start of an epoch it leads.

use super::topic::WriterTopic;
use super::writer::{StorageResult, Tx};
use crate::error::Error;
use crate::replication::{Entry, EntryKind};
use crate::types::{Epoch, Index, ServerId};

/// Durably promises `epoch` (never lower than before) and steps down from any older epoch;
/// answers what an election compares: the last epoch held and the log end index.
pub(super) fn promise(txn: &Tx, t: &mut WriterTopic, epoch: Epoch) -> StorageResult<(Epoch, Index)> {
    if epoch > t.meta.promised {
        t.meta.promised = epoch;
        t.save_meta(txn)?;
    }
    if t.leading.is_some_and(|e| e < epoch) {
        t.leading = None;
    }
    Ok((t.history.last_epoch(), t.end_index))
}

/// Starts `epoch` as its leader with a `Begin` entry. Refused for an epoch this replica
/// promised against, or one it already held: a restarted leader may have lost entries of its
/// old epoch that its followers hold, and writing others at their indexes would fork the
/// log. A single replica has no followers to fork from and resumes its epoch.
pub(super) fn become_leader(
    txn: &Tx,
    t: &mut WriterTopic,
    epoch: Epoch,
    server: ServerId,
) -> StorageResult<Result<(), Error>> {
    let stale = |current| Error::StaleEpoch { topic: t.name(), server, epoch, current };
    if epoch < t.meta.promised {
        return Ok(Err(stale(t.meta.promised)));
    }
    if t.leading == Some(epoch) {
        return Ok(Ok(()));
    }
    let resume = t.meta.is_solo() && epoch == t.history.last_epoch();
    if !resume {
        if epoch <= t.history.last_epoch() {
            return Ok(Err(stale(t.history.last_epoch() + 1)));
        }
        let entry = Entry { epoch, end: t.log_end, kind: EntryKind::Begin };
        let ship = !t.meta.is_solo();
        t.write_entry(txn, entry, bytes::Bytes::new(), ship)?;
    }
    t.evicting = None;
    t.begun = true;
    t.leading = Some(epoch);
    t.meta.promised = epoch;
    t.meta.epoch = epoch;
    t.meta.leader = server;
    t.save_meta(txn)?;
    Ok(Ok(()))
}
