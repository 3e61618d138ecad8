//! The redb tables and how values are encoded in them (postcard).

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::types::Record;

/// id -> [`TopicMeta`](super::TopicMeta).
pub(super) const TOPICS: TableDefinition<u64, &[u8]> = TableDefinition::new("topics");
/// (id, index) -> [`Entry`](crate::replication::Entry).
pub(super) const ENTRIES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("entries");
/// (id, offset) -> [`StoredValue`].
pub(super) const RECORDS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("records");
/// (id, subscription) -> applied [`Cursor`](crate::replication::Cursor).
pub(super) const CURSORS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("cursors");
/// (id, producer) -> [`ProducerState`](crate::replication::ProducerState).
pub(super) const PRODUCERS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("producers");
/// (id, epoch) -> index of the epoch's first entry.
pub(super) const EPOCHS: TableDefinition<(u64, u64), u64> = TableDefinition::new("epochs");
/// Server id, naming book id, storage format.
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A stored record: what consumers read by offset. The batch it came in is an entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredValue {
    pub timestamp_ms: u64,
    pub record: Record,
}

/// [`StoredValue`] borrowing its record, for writing (the same encoding).
#[derive(Serialize)]
pub(super) struct StoredValueRef<'a> {
    pub timestamp_ms: u64,
    pub record: &'a Record,
}

pub(super) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("storage values encode")
}
