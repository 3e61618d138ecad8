//! A record chunk: the records of one batch (those still stored when it was written), kept
//! as one redb value under the offset of its first record.
//!
//! One value per batch instead of one per record: a batch of 1,000 records is one B-tree
//! insert, not 1,000, and topics written side by side no longer rewrite a partly filled leaf
//! of each other's records in every group commit (with 100 topics that doubled the bytes
//! written per record). Kafka, Redpanda and Iggy store batches the same way.
//!
//! The same bytes travel: a follower gets the leader's chunk and stores it as it came, and
//! a fetch answer carries chunks ([`FetchedRecords`](crate::wire::FetchedRecords)) that the
//! consumer checks and decodes, so records are decoded only at the edges.
//!
//! # Encoding
//! `crc32c (u32, little endian, over everything after it) | timestamp_ms (varint) | count
//! (varint) | count × (length (varint) | the record, postcard)`. The length before each
//! record lets a reader size and skip records without decoding them; the checksum catches a
//! value damaged on disk (a bit flip redb's own page checks would not see), which is never
//! served.

use crate::types::{varint_len, Offset, Record};

/// Bytes of the checksum at the start of a chunk.
const CRC_BYTES: usize = 4;

/// Why a stored chunk cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("a record chunk fails its checksum (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("a record chunk is cut short or malformed: {0}")]
    Malformed(&'static str),
    #[error("a record in a chunk does not decode: {0}")]
    Record(#[from] postcard::Error),
}

/// Encodes `records`, all stamped `timestamp_ms`, as one chunk (allocated to its exact size).
pub fn encode(timestamp_ms: u64, records: &[Record]) -> Vec<u8> {
    let body: usize = records.iter().map(|r| varint_len(r.encoded_size() as u64) + r.encoded_size()).sum();
    let mut buf = start(timestamp_ms, records.len() as u64, body);
    for record in records {
        put_varint(&mut buf, record.encoded_size() as u64);
        let start = buf.len();
        buf = postcard::to_extend(record, buf).expect("records encode");
        debug_assert_eq!(buf.len() - start, record.encoded_size());
    }
    seal(buf)
}

/// Encodes records given as their stored bytes (slices of another chunk, from
/// [`Chunk::records`]) as one chunk: a chunk trimmed or forwarded without decoding a record.
pub fn encode_raw(timestamp_ms: u64, records: &[&[u8]]) -> Vec<u8> {
    let body: usize = records.iter().map(|r| varint_len(r.len() as u64) + r.len()).sum();
    let mut buf = start(timestamp_ms, records.len() as u64, body);
    for record in records {
        put_varint(&mut buf, record.len() as u64);
        buf.extend_from_slice(record);
    }
    seal(buf)
}

/// A chunk's header, with room for a body of `body` bytes; the checksum is filled by [`seal`].
fn start(timestamp_ms: u64, count: u64, body: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(CRC_BYTES + varint_len(timestamp_ms) + varint_len(count) + body);
    buf.extend_from_slice(&[0; CRC_BYTES]);
    put_varint(&mut buf, timestamp_ms);
    put_varint(&mut buf, count);
    buf
}

fn seal(mut buf: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&buf[CRC_BYTES..]);
    buf[..CRC_BYTES].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// Decodes every record of a chunk (checked first): what a reader at the edge does.
pub fn decode_records(bytes: &[u8]) -> Result<Vec<Record>, ChunkError> {
    Chunk::parse(bytes)?.records().map(|r| r.and_then(decode_record)).collect()
}

/// A stored chunk, checked and borrowed: its records are sliced out, decoded only on demand.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub timestamp_ms: u64,
    pub count: u64,
    /// The length-prefixed records.
    body: &'a [u8],
}

impl<'a> Chunk<'a> {
    /// Parses a stored chunk, checking its checksum.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ChunkError> {
        if bytes.len() < CRC_BYTES {
            return Err(ChunkError::Malformed("shorter than its checksum"));
        }
        let stored = u32::from_le_bytes(bytes[..CRC_BYTES].try_into().expect("four bytes"));
        let computed = crc32c::crc32c(&bytes[CRC_BYTES..]);
        if stored != computed {
            return Err(ChunkError::Checksum { stored, computed });
        }
        Self::parse_unchecked(bytes)
    }

    /// Parses the header only, without the checksum (to delete or size a chunk).
    pub fn parse_unchecked(bytes: &'a [u8]) -> Result<Self, ChunkError> {
        let mut rest = bytes.get(CRC_BYTES..).ok_or(ChunkError::Malformed("shorter than its checksum"))?;
        let timestamp_ms = take_varint(&mut rest)?;
        let count = take_varint(&mut rest)?;
        Ok(Self { timestamp_ms, count, body: rest })
    }

    /// Checks that its records are framed as its header says: `count` length-prefixed
    /// records and nothing after them. What a follower checks of a chunk it is shipped
    /// besides the checksum; the records themselves were checked by the leader.
    pub fn check_framing(&self) -> Result<(), ChunkError> {
        let mut records = self.records();
        for record in records.by_ref() {
            record?;
        }
        if records.rest.is_empty() {
            Ok(())
        } else {
            Err(ChunkError::Malformed("bytes after its last record"))
        }
    }

    /// One past the offset of its last record, for a chunk stored at `base`.
    pub fn end(&self, base: Offset) -> Offset {
        base + self.count
    }

    /// Each record's encoded bytes, in order.
    pub fn records(&self) -> RawRecords<'a> {
        RawRecords { rest: self.body, left: self.count }
    }

    /// The bytes a topic counts for a record (its backlog, lag and freed bytes): the record
    /// and its timestamp, as before chunks; the chunk's own framing is not counted.
    pub fn stored_size(&self, record: &[u8]) -> u64 {
        (varint_len(self.timestamp_ms) + record.len()) as u64
    }
}

/// Decodes one record's bytes from [`Chunk::records`].
pub fn decode_record(bytes: &[u8]) -> Result<Record, ChunkError> {
    Ok(postcard::from_bytes(bytes)?)
}

/// The records of a chunk, as byte slices.
pub struct RawRecords<'a> {
    rest: &'a [u8],
    left: u64,
}

impl<'a> Iterator for RawRecords<'a> {
    type Item = Result<&'a [u8], ChunkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let item = take_varint(&mut self.rest).and_then(|len| {
            let len = usize::try_from(len).map_err(|_| ChunkError::Malformed("record length"))?;
            if len > self.rest.len() {
                return Err(ChunkError::Malformed("a record runs past the chunk"));
            }
            let (record, rest) = self.rest.split_at(len);
            self.rest = rest;
            Ok(record)
        });
        if item.is_err() {
            self.left = 0;
        }
        Some(item)
    }
}

fn put_varint(buf: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Result<u64, ChunkError> {
    let mut n = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        n |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Ok(n);
        }
    }
    Err(ChunkError::Malformed("a varint runs past the chunk"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Header;

    fn record(i: usize) -> Record {
        Record {
            key: vec![i as u8; i % 3],
            headers: (0..i % 2).map(|h| Header { name: format!("h{h}"), value: vec![1; h] }).collect(),
            payload: vec![b'x'; i * 40],
        }
    }

    #[test]
    fn records_come_back_as_written() {
        let records: Vec<Record> = (0..20).map(record).collect();
        let buf = encode(1_700_000_000_000, &records);
        let chunk = Chunk::parse(&buf).unwrap();
        assert_eq!((chunk.timestamp_ms, chunk.count, chunk.end(500)), (1_700_000_000_000, 20, 520));
        let raw: Vec<&[u8]> = chunk.records().collect::<Result<_, _>>().unwrap();
        for (bytes, original) in raw.iter().zip(&records) {
            assert_eq!(&decode_record(bytes).unwrap(), original);
            assert_eq!(bytes.len(), original.encoded_size());
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_fails_the_checksum() {
        let buf = encode(7, &[record(3), record(4)]);
        for byte in 0..buf.len() {
            let mut damaged = buf.clone();
            damaged[byte] ^= 0x10;
            assert!(Chunk::parse(&damaged).is_err(), "byte {byte} flipped went unnoticed");
        }
    }

    #[test]
    fn a_cut_chunk_is_an_error_not_a_panic() {
        let buf = encode(7, &[record(5), record(6)]);
        for len in 0..buf.len() {
            let cut = &buf[..len];
            if let Ok(chunk) = Chunk::parse_unchecked(cut) {
                assert!(chunk.records().any(|r| r.is_err()), "a chunk cut at {len} read whole");
                assert!(chunk.check_framing().is_err(), "a chunk cut at {len} passed its framing check");
            }
        }
    }

    #[test]
    fn records_forwarded_as_bytes_make_the_same_chunk_as_records_encoded() {
        let records: Vec<Record> = (0..9).map(record).collect();
        let whole = encode(42, &records);
        let chunk = Chunk::parse(&whole).unwrap();
        chunk.check_framing().unwrap();
        let raw: Vec<&[u8]> = chunk.records().collect::<Result<_, _>>().unwrap();
        assert_eq!(encode_raw(42, &raw), whole);
        // A chunk trimmed of its first records, without decoding them, holds the rest.
        let tail = encode_raw(42, &raw[4..]);
        assert_eq!(decode_records(&tail).unwrap(), records[4..]);
        assert_eq!(tail, encode(42, &records[4..]));
    }

    #[test]
    fn bytes_after_the_last_record_fail_the_framing_check() {
        let mut buf = encode(7, &[record(2)]);
        buf.push(0);
        let crc = crc32c::crc32c(&buf[CRC_BYTES..]);
        buf[..CRC_BYTES].copy_from_slice(&crc.to_le_bytes());
        let chunk = Chunk::parse(&buf).unwrap();
        assert!(chunk.check_framing().is_err());
    }

    #[test]
    fn a_full_client_batch_is_stored_within_one_mebibyte() {
        use crate::client::{MAX_BATCH_BYTES, MAX_BATCH_RECORDS};
        // As the CLI fills a batch: records until the bytes reach the limit (the last may
        // pass it), at most MAX_BATCH_RECORDS. A page of room is left for redb's leaf header.
        for payload in [0, 1, 10, 100, 1000, 4000, 16_000] {
            let record = Record { payload: vec![7; payload], ..Record::default() };
            let count = MAX_BATCH_BYTES.div_ceil(record.encoded_size()).min(MAX_BATCH_RECORDS);
            let chunk = encode(u64::MAX, &vec![record; count]);
            assert!(
                chunk.len() <= 1024 * 1024 - 4096,
                "{payload}-byte records: a chunk of {} bytes",
                chunk.len()
            );
        }
    }
}
