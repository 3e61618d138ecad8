//! Reads, each in its own read transaction: never waiting for the writer, and seeing only
//! committed (durable) data.

use bytes::Bytes;
use redb::{ReadableTable, ReadableTableMetadata};

use super::chunk::{self, Chunk};
use super::dedup::Dedup;
use super::state::{LogState, TopicLog, TopicMeta};
use super::tables::{decode, stored_chunk_end, CHUNKS, CURSORS, ENTRIES, EPOCHS, PRODUCERS, TOPICS};
use super::Store;
use crate::error::Error;
use crate::replication::{
    Cursor, Entry, EntryKind, EpochHistory, ProducerState, ReplicaReset, ShippedEntry, SHIPPED_ENTRY_OVERHEAD,
};
use crate::types::{Index, Offset, ProducerId, SubscriptionName, TopicId};
use crate::wire::{FetchedRecords, SubscriptionInfo, CHUNK_ANSWER_OVERHEAD};

/// Records behind a cursor up to which its lag in bytes is summed exactly.
pub const LAG_BYTES_SCAN: u64 = 100_000;

impl Store {
    /// Reads records `from..end` for a fetch answer, as stored: whole chunks forwarded as
    /// their bytes, a chunk the range starts or stops inside re-framed around the records
    /// taken (without decoding them). At most `max_records`, and at most `max_bytes` as
    /// encoded in the answer ([`FetchedRecords::record_size`] and
    /// [`CHUNK_ANSWER_OVERHEAD`] a chunk), so an answer always fits the
    /// budget it was given. When the first record alone is larger, the answer is
    /// [`Error::FetchTooSmall`] with the size it needs, so the reader can ask again with room
    /// for it: no record can block a subscription. Every chunk read is checked against its
    /// checksum first; the consumer checks it again on arrival.
    pub fn read_chunks(
        &self,
        topic: &TopicLog,
        from: Offset,
        end: Offset,
        max_records: u32,
        max_bytes: u32,
    ) -> Result<FetchedRecords, Error> {
        let txn = self.read_txn()?;
        let chunks = txn.open_table(CHUNKS).map_err(|e| self.storage_err(e))?;
        // Records below the log start may still sit in its first chunk: never shown.
        let from = from.max(self.log_start_in(&txn, topic.id)?);
        let mut out = FetchedRecords::default();
        if from >= end {
            return Ok(out);
        }
        let (mut bytes, mut records) = (0usize, 0u32);
        self.each_chunk(&chunks, topic.id, from, end, |base, stored, chunk| {
            let lo = from.max(base);
            let hi = chunk.end(base).min(end);
            // Records `lo..lo + taken` of this chunk go into the answer.
            let mut taken = 0u64;
            let mut full = false;
            for raw in chunk.records().skip((lo - base) as usize).take((hi - lo) as usize) {
                let raw = raw.map_err(|e| self.chunk_err(topic.id, base, e))?;
                let size =
                    FetchedRecords::record_size(raw) + if taken == 0 { CHUNK_ANSWER_OVERHEAD } else { 0 };
                let over = bytes + size > max_bytes as usize;
                if records == 0 && over {
                    return Err(Error::FetchTooSmall {
                        topic: topic.name.to_string(),
                        offset: lo,
                        size: size as u64,
                        max_bytes: max_bytes as u64,
                    });
                }
                // At least one record, whatever `max_records` says (as before chunks).
                if records > 0 && (over || records >= max_records) {
                    full = true;
                    break;
                }
                bytes += size;
                records += 1;
                taken += 1;
            }
            if taken == chunk.count {
                out.chunks.push((lo, Bytes::copy_from_slice(stored)));
            } else if taken > 0 {
                let kept: Vec<&[u8]> = chunk
                    .records()
                    .skip((lo - base) as usize)
                    .take(taken as usize)
                    .collect::<Result<_, _>>()
                    .map_err(|e| self.chunk_err(topic.id, base, e))?;
                out.chunks.push((lo, Bytes::from(chunk::encode_raw(chunk.timestamp_ms, &kept))));
            }
            Ok(!full)
        })?;
        Ok(out)
    }

    /// The first offset of `log_start..end` whose record was stamped at or after `time_ms`
    /// (ms since the Unix epoch), or `end` when none is. A record's stamp is the leader's
    /// clock when it appended the record's batch, so stamps rise with offsets unless a
    /// leader's clock stepped back; the search halves the offsets (one chunk lookup a step,
    /// about 20 for a million chunks) and, where stamps do fall back, lands near the time.
    pub fn offset_at_time(
        &self,
        topic: &TopicLog,
        log_start: Offset,
        end: Offset,
        time_ms: u64,
    ) -> Result<Offset, Error> {
        let txn = self.read_txn()?;
        let chunks = txn.open_table(CHUNKS).map_err(|e| self.storage_err(e))?;
        // Everything below `lo` was stamped before `time_ms`; the answer is in `lo..=hi`.
        let (mut lo, mut hi) = (log_start, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let base = self.first_chunk(&chunks, topic.id, mid)?;
            let stored = chunks.get((topic.id, base)).map_err(|e| self.storage_err(e))?.ok_or_else(|| {
                self.storage_err(format!("topic #{}: no chunk holds offset {mid}", topic.id))
            })?;
            let chunk = Chunk::parse(stored.value()).map_err(|e| self.chunk_err(topic.id, base, e))?;
            if chunk.timestamp_ms >= time_ms {
                hi = base.max(lo);
            } else {
                lo = chunk.end(base).min(hi);
            }
        }
        Ok(lo)
    }

    /// Calls `each(base, stored bytes, chunk)` for the chunks holding records `from..end`,
    /// in order, until it returns false; every chunk read is checked against its checksum
    /// first.
    fn each_chunk(
        &self,
        chunks: &redb::ReadOnlyTable<(u64, u64), &'static [u8]>,
        topic: TopicId,
        from: Offset,
        end: Offset,
        mut each: impl FnMut(Offset, &[u8], &Chunk<'_>) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        if from >= end {
            return Ok(());
        }
        let first = self.first_chunk(chunks, topic, from)?;
        for row in chunks.range((topic, first)..(topic, end)).map_err(|e| self.storage_err(e))? {
            let (key, value) = row.map_err(|e| self.storage_err(e))?;
            let (base, stored) = (key.value().1, value.value());
            let chunk = Chunk::parse(stored).map_err(|e| self.chunk_err(topic, base, e))?;
            if chunk.end(base) > from && !each(base, stored, &chunk)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Calls `each(offset, chunk, record bytes)` for the stored records `from..end` in order,
    /// until it returns false; every chunk read is checked against its checksum first.
    fn each_record(
        &self,
        chunks: &redb::ReadOnlyTable<(u64, u64), &'static [u8]>,
        topic: TopicId,
        from: Offset,
        end: Offset,
        mut each: impl FnMut(Offset, &Chunk<'_>, &[u8]) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        let mut more = true;
        self.each_chunk(chunks, topic, from, end, |base, _, chunk| {
            for (offset, raw) in (base..).zip(chunk.records()) {
                if offset >= end {
                    more = false;
                    break;
                }
                let raw = raw.map_err(|e| self.chunk_err(topic, base, e))?;
                if offset >= from && !each(offset, chunk, raw)? {
                    more = false;
                    break;
                }
            }
            Ok(more)
        })
    }

    /// Where a read from `from` starts: the chunk holding `from` (the last at or below it).
    fn first_chunk(
        &self,
        chunks: &redb::ReadOnlyTable<(u64, u64), &'static [u8]>,
        topic: TopicId,
        from: Offset,
    ) -> Result<Offset, Error> {
        match chunks.range((topic, 0)..=(topic, from)).map_err(|e| self.storage_err(e))?.next_back() {
            Some(row) => Ok(row.map_err(|e| self.storage_err(e))?.0.value().1),
            None => Ok(from),
        }
    }

    /// A topic's log start as of `txn` (0 for a topic not stored).
    fn log_start_in(&self, txn: &redb::ReadTransaction, topic: TopicId) -> Result<Offset, Error> {
        let topics = txn.open_table(TOPICS).map_err(|e| self.storage_err(e))?;
        let meta = topics.get(topic).map_err(|e| self.storage_err(e))?;
        match meta {
            Some(v) => Ok(decode::<TopicMeta>(v.value()).map_err(|e| self.storage_err(e))?.log_start),
            None => Ok(0),
        }
    }

    /// A chunk that cannot be read: never served, reported with where it is.
    fn chunk_err(&self, topic: TopicId, base: Offset, e: chunk::ChunkError) -> Error {
        self.damaged.note(topic, base);
        self.storage_err(format!("topic #{topic}, the chunk at offset {base}: {e}"))
    }

    /// Entries `from..end` with their records, for a follower: whole entries, as many as fit
    /// in `max_bytes` as encoded (stored sizes), and always the first, so an entry larger
    /// than a chunk's budget still moves (a batch is at most
    /// [`MAX_PRODUCE_BATCH_BYTES`](crate::wire::MAX_PRODUCE_BATCH_BYTES), which fits in a frame).
    /// A batch whose first records were deleted comes with the rest.
    pub fn read_entries(
        &self,
        topic: TopicId,
        from: Index,
        end: Index,
        max_bytes: usize,
    ) -> Result<Vec<ShippedEntry>, Error> {
        let txn = self.read_txn()?;
        let entries = txn.open_table(ENTRIES).map_err(|e| self.storage_err(e))?;
        let chunks = txn.open_table(CHUNKS).map_err(|e| self.storage_err(e))?;
        let log_start = self.log_start_in(&txn, topic)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for row in entries.range((topic, from)..(topic, end)).map_err(|e| self.storage_err(e))? {
            let (key, value) = row.map_err(|e| self.storage_err(e))?;
            let entry: Entry = decode(value.value()).map_err(|e| self.storage_err(e))?;
            let chunk = match entry.kind {
                EntryKind::Batch { .. } => {
                    self.batch_chunk(&chunks, topic, entry.base().max(log_start), entry.end)?
                }
                _ => Bytes::new(),
            };
            let size = SHIPPED_ENTRY_OVERHEAD + chunk.len();
            if bytes + size > max_bytes && !out.is_empty() {
                break;
            }
            bytes += size;
            out.push(ShippedEntry { index: key.value().1, entry, chunk });
        }
        Ok(out)
    }

    /// A batch's stored records `from..end` as one chunk for a follower: the stored bytes
    /// themselves when the chunk holds exactly those (always, unless the log start moved into
    /// it), else its records from `from` on, re-framed without decoding them. Checked against
    /// its checksum first, like every read.
    fn batch_chunk(
        &self,
        chunks: &redb::ReadOnlyTable<(u64, u64), &'static [u8]>,
        topic: TopicId,
        from: Offset,
        end: Offset,
    ) -> Result<Bytes, Error> {
        if from >= end {
            return Ok(Bytes::new());
        }
        let holding = chunks.range((topic, 0)..=(topic, from)).map_err(|e| self.storage_err(e))?.next_back();
        let Some(row) = holding else {
            return Err(self.storage_err(format!("topic #{topic}: no chunk holds offset {from}")));
        };
        let (key, value) = row.map_err(|e| self.storage_err(e))?;
        let (base, bytes) = (key.value().1, value.value());
        let chunk = Chunk::parse(bytes).map_err(|e| self.chunk_err(topic, base, e))?;
        // A chunk never spans two entries: the batch's records are all in this one.
        if chunk.end(base) != end {
            return Err(self.storage_err(format!(
                "topic #{topic}: the chunk at offset {base} ends at {}, its batch at {end}",
                chunk.end(base)
            )));
        }
        if base == from {
            return Ok(Bytes::copy_from_slice(bytes));
        }
        let kept: Vec<&[u8]> = chunk
            .records()
            .skip((from - base) as usize)
            .collect::<Result<_, _>>()
            .map_err(|e| self.chunk_err(topic, base, e))?;
        Ok(Bytes::from(chunk::encode_raw(chunk.timestamp_ms, &kept)))
    }

    /// One step of a scrub: checks stored chunks against their checksums in key order from
    /// `from` (a topic and base offset), noting each damaged one (`Store::damaged`) so a peer's
    /// copy can replace it, until about `budget` bytes were read. Returns where the next step
    /// starts; `None` once every chunk was checked. Disks damage data that nobody reads, and
    /// a damaged chunk found only when a failover makes this replica serve it is found late.
    pub fn scrub(&self, from: (TopicId, Offset), budget: usize) -> Result<Option<(TopicId, Offset)>, Error> {
        let txn = self.read_txn()?;
        let chunks = txn.open_table(CHUNKS).map_err(|e| self.storage_err(e))?;
        let mut read = 0usize;
        for row in chunks.range(from..).map_err(|e| self.storage_err(e))? {
            let (key, value) = row.map_err(|e| self.storage_err(e))?;
            let (topic, base) = key.value();
            if read >= budget {
                return Ok(Some((topic, base)));
            }
            read += value.value().len();
            if Chunk::parse(value.value()).is_err() {
                self.damaged.note(topic, base);
            }
        }
        Ok(None)
    }

    /// Where the chunk of `topic` stored at `base` ends, if it is still stored and still
    /// fails its checksum (`None`: deleted, truncated or repaired, so nothing to ask a peer
    /// for). A chunk runs to the next one, or to `log_end` for the last: batches are dense.
    pub fn damaged_chunk_end(
        &self,
        topic: TopicId,
        base: Offset,
        log_end: Offset,
    ) -> Result<Option<Offset>, Error> {
        let txn = self.read_txn()?;
        let chunks = txn.open_table(CHUNKS).map_err(|e| self.storage_err(e))?;
        match chunks.get((topic, base)).map_err(|e| self.storage_err(e))? {
            Some(v) if Chunk::parse(v.value()).is_err() => {}
            _ => return Ok(None),
        }
        stored_chunk_end(&chunks, topic, base, log_end).map(Some).map_err(|e| self.storage_err(e))
    }

    /// The stored records `base..end` of `topic` as one chunk, for a peer repairing its copy
    /// (F19): the bytes a follower would have stored for that range (a chunk starting lower
    /// is trimmed), checked against their checksum, and only when `end` is at or below
    /// `commit` (this replica's commit point): committed chunks are the same on every replica.
    pub fn committed_chunk(
        &self,
        topic: TopicId,
        base: Offset,
        end: Offset,
        commit: Offset,
    ) -> Result<Bytes, Error> {
        if end > commit || base >= end {
            return Err(self.storage_err(format!(
                "topic #{topic}: records {base}..{end} are not all committed here (commit point {commit})"
            )));
        }
        let txn = self.read_txn()?;
        let chunks = txn.open_table(CHUNKS).map_err(|e| self.storage_err(e))?;
        self.batch_chunk(&chunks, topic, base, end)
    }

    /// The stored meta of `topic`, as `txn` sees it.
    fn topic_meta_in(&self, txn: &redb::ReadTransaction, topic: TopicId) -> Result<TopicMeta, Error> {
        let topics = txn.open_table(TOPICS).map_err(|e| self.storage_err(e))?;
        match topics.get(topic).map_err(|e| self.storage_err(e))? {
            Some(v) => decode(v.value()).map_err(|e| self.storage_err(e)),
            None => Err(Error::internal(format!("topic #{topic} is not stored"))),
        }
    }

    /// A follower's restart at this replica's first stored entry: the applied state (cursors,
    /// log start), the epochs before it and the producers' dedup windows, read together.
    pub fn reset_snapshot(&self, topic: TopicId) -> Result<ReplicaReset, Error> {
        let txn = self.read_txn()?;
        let err = |e: &dyn std::fmt::Display| self.storage_err(e);
        let meta = self.topic_meta_in(&txn, topic)?;
        let mut history = Vec::new();
        for row in txn
            .open_table(EPOCHS)
            .map_err(|e| err(&e))?
            .range((topic, 0)..=(topic, u64::MAX))
            .map_err(|e| err(&e))?
        {
            let (k, v) = row.map_err(|e| err(&e))?;
            history.push((k.value().1, v.value()));
        }
        let mut cursors = Vec::new();
        for row in txn
            .open_table(CURSORS)
            .map_err(|e| err(&e))?
            .range((topic, "")..(topic + 1, ""))
            .map_err(|e| err(&e))?
        {
            let (k, v) = row.map_err(|e| err(&e))?;
            cursors.push((k.value().1.to_string(), decode::<Cursor>(v.value()).map_err(|e| err(&e))?));
        }
        Ok(ReplicaReset {
            start_index: meta.start_index,
            start_offset: meta.start_offset,
            history: EpochHistory::new(history).prefix(meta.start_index),
            applied: meta.applied.max(meta.start_index),
            log_start: meta.log_start,
            cursors,
            // Only what the entries before the restart point built: the follower takes the
            // rest from the entries themselves (some may never commit).
            producers: self
                .producer_states_in(&txn, &meta, meta.start_index)?
                .into_iter()
                .filter_map(|(p, mut s)| {
                    s.truncate(meta.start_index);
                    (!s.recent.is_empty()).then_some((p, s))
                })
                .collect(),
        })
    }

    /// A subscription's applied cursor: where a consumer resumes (every acknowledged move is
    /// applied before its ack is answered).
    pub fn cursor(&self, topic: TopicId, subscription: &SubscriptionName) -> Result<Option<Cursor>, Error> {
        let txn = self.read_txn()?;
        let table = txn.open_table(CURSORS).map_err(|e| self.storage_err(e))?;
        let value = table.get((topic, subscription.as_str())).map_err(|e| self.storage_err(e))?;
        value.map(|v| decode(v.value()).map_err(|e| self.storage_err(e))).transpose()
    }

    /// Every subscription of a topic with its applied cursor and lag behind the commit
    /// offset of `state`. Lag in bytes is summed over the records when at most
    /// [`LAG_BYTES_SCAN`] are behind, and estimated from the topic's average stored record
    /// beyond that, so a listing or a metrics scrape costs the same however large a backlog
    /// grows.
    pub fn subscriptions(&self, topic: TopicId, state: &LogState) -> Result<Vec<SubscriptionInfo>, Error> {
        let commit = state.commit;
        let txn = self.read_txn()?;
        let table = txn.open_table(CURSORS).map_err(|e| self.storage_err(e))?;
        let mut out = Vec::new();
        for row in table.range((topic, "")..(topic + 1, "")).map_err(|e| self.storage_err(e))? {
            let (key, value) = row.map_err(|e| self.storage_err(e))?;
            let c: Cursor = decode(value.value()).map_err(|e| self.storage_err(e))?;
            let name = SubscriptionName::new(key.value().1).map_err(|e| self.storage_err(e))?;
            out.push(SubscriptionInfo {
                name,
                cursor: c.next,
                lag: commit.saturating_sub(c.next),
                lag_bytes: 0,
                last_ack_ms: None,
                consumer: None,
                evicted: c.evicted,
                evicted_at_ms: (c.evicted_at_ms > 0).then_some(c.evicted_at_ms),
            });
        }
        drop(table);
        let chunks = txn.open_table(CHUNKS).map_err(|e| self.storage_err(e))?;
        let stored = state.log_end.saturating_sub(state.log_start).max(1);
        for sub in &mut out {
            if sub.lag > LAG_BYTES_SCAN {
                sub.lag_bytes = (sub.lag as u128 * state.bytes as u128 / stored as u128) as u64;
            } else if sub.cursor < commit {
                let mut lag = 0;
                self.each_record(&chunks, topic, sub.cursor, commit, |_, chunk, raw| {
                    lag += chunk.stored_size(raw);
                    Ok(true)
                })?;
                sub.lag_bytes = lag;
            }
        }
        Ok(out)
    }

    /// The dedup state of every producer of a topic, as of its log end.
    pub fn producer_states(&self, topic: TopicId) -> Result<Vec<(ProducerId, ProducerState)>, Error> {
        let txn = self.read_txn()?;
        let meta = self.topic_meta_in(&txn, topic)?;
        self.producer_states_in(&txn, &meta, Index::MAX)
    }

    /// The checkpoint and the outcomes of the entries after it, up to entry `to` (see
    /// `dedup`).
    fn producer_states_in(
        &self,
        txn: &redb::ReadTransaction,
        meta: &TopicMeta,
        to: Index,
    ) -> Result<Vec<(ProducerId, ProducerState)>, Error> {
        let err = |e: &dyn std::fmt::Display| self.storage_err(e);
        let checkpoint = txn.open_table(PRODUCERS).map_err(|e| err(&e))?;
        let entries = txn.open_table(ENTRIES).map_err(|e| err(&e))?;
        let dedup =
            Dedup::load(&checkpoint, &entries, meta.id, meta.producers_index, to).map_err(|e| err(&e))?;
        Ok(dedup.states.into_iter().collect())
    }

    /// Number of records stored for all topics, those hidden below a log start not counted
    /// (for tests and diagnostics).
    pub fn record_count(&self) -> Result<u64, Error> {
        let txn = self.read_txn()?;
        let chunks = txn.open_table(CHUNKS).map_err(|e| self.storage_err(e))?;
        let mut log_starts = std::collections::HashMap::new();
        let mut count = 0;
        for row in chunks.iter().map_err(|e| self.storage_err(e))? {
            let (key, value) = row.map_err(|e| self.storage_err(e))?;
            let (topic, base) = key.value();
            let log_start = match log_starts.get(&topic) {
                Some(s) => *s,
                None => *log_starts.entry(topic).or_insert(self.log_start_in(&txn, topic)?),
            };
            let chunk = Chunk::parse(value.value()).map_err(|e| self.chunk_err(topic, base, e))?;
            count += chunk.end(base).saturating_sub(base.max(log_start));
        }
        Ok(count)
    }

    /// Checks every invariant of the stored logs (see the module doc): what a reopened store
    /// must satisfy after any crash, power cut or failed write, for the replication rules to
    /// accept it. Returns the first violation found.
    pub fn check_consistency(&self) -> Result<(), String> {
        self.check_consistency_except(&[])
    }

    /// [`Self::check_consistency`], but the chunks in `damaged` (a topic and base offset) may
    /// fail their checksum: a test damaged them on purpose, and their repair is what it tests.
    pub fn check_consistency_except(&self, damaged: &[(TopicId, Offset)]) -> Result<(), String> {
        let txn = self.read_txn().map_err(|e| e.to_string())?;
        let fail = |e: &dyn std::fmt::Display| e.to_string();
        let topics = txn.open_table(TOPICS).map_err(|e| fail(&e))?;
        let entries = txn.open_table(ENTRIES).map_err(|e| fail(&e))?;
        let chunks = txn.open_table(CHUNKS).map_err(|e| fail(&e))?;
        let cursors = txn.open_table(CURSORS).map_err(|e| fail(&e))?;
        let epochs = txn.open_table(EPOCHS).map_err(|e| fail(&e))?;
        for row in topics.iter().map_err(|e| fail(&e))? {
            let (_, v) = row.map_err(|e| fail(&e))?;
            let meta: TopicMeta = decode(v.value()).map_err(|e| fail(&e))?;
            let (id, name) = (meta.id, meta.name.as_str());
            let mut history = Vec::new();
            for row in epochs.range((id, 0)..=(id, u64::MAX)).map_err(|e| fail(&e))? {
                let (k, v) = row.map_err(|e| fail(&e))?;
                history.push((k.value().1, v.value()));
            }
            if !history.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1) {
                return Err(format!("{name}: epoch history out of order: {history:?}"));
            }
            let history = EpochHistory::new(history);
            let (mut next, mut end) = (meta.start_index, meta.start_offset);
            for row in entries.range((id, 0)..=(id, u64::MAX)).map_err(|e| fail(&e))? {
                let (k, v) = row.map_err(|e| fail(&e))?;
                let index = k.value().1;
                let entry: Entry = decode(v.value()).map_err(|e| fail(&e))?;
                if index != next {
                    return Err(format!("{name}: entry {index} where {next} was expected"));
                }
                if entry.base() != end {
                    return Err(format!(
                        "{name}: entry {index} starts at offset {}, the log ended at {end}",
                        entry.base()
                    ));
                }
                if history.epoch_at(index) != entry.epoch {
                    return Err(format!(
                        "{name}: entry {index} of epoch {} but the history says {}",
                        entry.epoch,
                        history.epoch_at(index)
                    ));
                }
                end = entry.end;
                next += 1;
            }
            if !(meta.start_index..=next).contains(&meta.producers_index) {
                return Err(format!(
                    "{name}: the producers' checkpoint at entry {} is outside the stored entries {}..{next}",
                    meta.producers_index, meta.start_index
                ));
            }
            // Chunks: each checked, in order without gaps up to the log end, none wholly below
            // the log start. They start at or below the log start, or at the first stored
            // entry of a follower restarted at its leader's state (which has no records
            // before it).
            let need_from = meta.log_start.max(meta.start_offset.min(end));
            let mut last: Option<Offset> = None;
            let mut stored = Vec::new();
            for row in chunks.range((id, 0)..=(id, u64::MAX)).map_err(|e| fail(&e))? {
                let (k, v) = row.map_err(|e| fail(&e))?;
                stored.push((k.value().1, v.value().to_vec()));
            }
            for (i, (base, bytes)) in stored.iter().enumerate() {
                let base = *base;
                let chunk_end = match Chunk::parse(bytes) {
                    // Damaged on purpose: it runs to the next chunk (or the log end).
                    Err(_) if damaged.contains(&(id, base)) => stored.get(i + 1).map_or(end, |(b, _)| *b),
                    parsed => {
                        let chunk = parsed.map_err(|e| format!("{name}: chunk at {base}: {e}"))?;
                        if chunk.records().any(|r| r.is_err()) || chunk.count == 0 {
                            return Err(format!("{name}: chunk at {base} is malformed or empty"));
                        }
                        chunk.end(base)
                    }
                };
                match last {
                    None if base > need_from => {
                        return Err(format!("{name}: records from {need_from} to {base} are missing"));
                    }
                    None if chunk_end <= meta.log_start => {
                        return Err(format!(
                            "{name}: chunk {base}..{chunk_end} is wholly below the log start {}",
                            meta.log_start
                        ));
                    }
                    Some(last) if base != last => {
                        return Err(format!("{name}: chunk at {base} where {last} was expected"));
                    }
                    _ => {}
                }
                last = Some(chunk_end);
            }
            match last {
                Some(last) if last != end => {
                    return Err(format!("{name}: records end at {last}, the log at {end}"));
                }
                None if end > need_from => {
                    return Err(format!("{name}: records {need_from}..{end} are missing"));
                }
                _ => {}
            }
            if meta.applied < meta.start_index {
                return Err(format!(
                    "{name}: applied {} below the first stored entry {}",
                    meta.applied, meta.start_index
                ));
            }
            for row in cursors.range((id, "")..(id + 1, "")).map_err(|e| fail(&e))? {
                let (k, v) = row.map_err(|e| fail(&e))?;
                let c: Cursor = decode(v.value()).map_err(|e| fail(&e))?;
                if c.next < meta.log_start {
                    return Err(format!(
                        "{name}: subscription {} at {} below the log start {}",
                        k.value().1,
                        c.next,
                        meta.log_start
                    ));
                }
            }
        }
        Ok(())
    }

    /// Number of entries stored for all topics (for tests and diagnostics).
    pub fn entry_count(&self) -> Result<u64, Error> {
        let txn = self.read_txn()?;
        let table = txn.open_table(ENTRIES).map_err(|e| self.storage_err(e))?;
        table.len().map_err(|e| self.storage_err(e))
    }
}
