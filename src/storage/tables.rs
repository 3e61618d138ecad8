//! The redb tables and how values are encoded in them (postcard).

use redb::{ReadableTable, StorageError, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::types::{Offset, TopicId};

/// id -> [`TopicMeta`](super::TopicMeta).
pub(super) const TOPICS: TableDefinition<u64, &[u8]> = TableDefinition::new("topics");
/// (id, index) -> [`Entry`](crate::replication::Entry).
pub(super) const ENTRIES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("entries");
/// (id, offset of its first record) -> a [`chunk`](super::chunk) of one batch's records.
pub(super) const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("record_chunks");
/// (id, subscription) -> applied [`Cursor`](crate::replication::Cursor).
pub(super) const CURSORS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("cursors");
/// (id, producer) -> [`ProducerState`](crate::replication::ProducerState).
pub(super) const PRODUCERS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("producers");
/// (id, epoch) -> index of the epoch's first entry.
pub(super) const EPOCHS: TableDefinition<(u64, u64), u64> = TableDefinition::new("epochs");
/// Server id, naming book id, storage format.
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub(super) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("storage values encode")
}

/// Where the stored chunk of `topic` at `base` ends: where the next one starts, the log's
/// last one at `log_end` (batches are dense), whatever its header says (it may be damaged).
pub(super) fn stored_chunk_end(
    chunks: &impl ReadableTable<(u64, u64), &'static [u8]>,
    topic: TopicId,
    base: Offset,
    log_end: Offset,
) -> Result<Offset, StorageError> {
    let next = chunks.range((topic, base + 1)..(topic, Offset::MAX))?.next().transpose()?;
    Ok(next.map_or(log_end, |(k, _)| k.value().1))
}
