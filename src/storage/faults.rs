//! Storage backends that fail on purpose: power loss, failed fsyncs and full disks, injected
//! under redb (its `StorageBackend` seam), so tests exercise the real engine and the real
//! recovery path rather than a model of them.
//!
//! Both keep every write in memory until `sync_data`, as a disk's volatile cache does:
//! - [`VolatileFile`] sits on a real file, so a `kill -9` of the process loses exactly what a
//!   power cut would (what was written but not yet fsynced). `herald server
//!   --volatile-writes` uses it for the power-loss tests with real processes.
//! - [`SimDisk`] is a disk in memory that a test can cut the power of, make fail the next
//!   fsyncs with `EIO`, or fill up (`ENOSPC`), then reopen.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Granularity of the unsynced overlay.
const PAGE: u64 = 4096;

/// Writes not yet synced, page by page, over a base that holds what was synced.
#[derive(Debug, Default)]
struct Unsynced {
    pages: BTreeMap<u64, Vec<u8>>,
    /// The length the storage has now (the base keeps the synced length until a sync).
    len: Option<u64>,
}

/// What the overlay needs of the storage below it.
trait Base {
    fn base_len(&self) -> io::Result<u64>;
    fn base_read(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;
    fn base_write(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn base_set_len(&mut self, len: u64) -> io::Result<()>;
    fn base_sync(&mut self) -> io::Result<()>;
}

impl Unsynced {
    fn len(&self, base: &dyn Base) -> io::Result<u64> {
        match self.len {
            Some(len) => Ok(len),
            None => base.base_len(),
        }
    }

    /// One whole page as the storage holds it now.
    fn page(&self, base: &dyn Base, number: u64) -> io::Result<Vec<u8>> {
        if let Some(p) = self.pages.get(&number) {
            return Ok(p.clone());
        }
        let mut page = vec![0; PAGE as usize];
        let start = number * PAGE;
        let synced = base.base_len()?.min(self.len(base)?);
        if start < synced {
            let n = (synced - start).min(PAGE) as usize;
            base.base_read(start, &mut page[..n])?;
        }
        Ok(page)
    }

    fn read(&self, base: &dyn Base, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let end = offset + out.len() as u64;
        if end > self.len(base)? {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the storage"));
        }
        let mut at = offset;
        while at < end {
            let number = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = ((PAGE as usize - within) as u64).min(end - at) as usize;
            let dst = &mut out[(at - offset) as usize..(at - offset) as usize + n];
            match self.pages.get(&number) {
                Some(p) => dst.copy_from_slice(&p[within..within + n]),
                None => dst.copy_from_slice(&self.page(base, number)?[within..within + n]),
            }
            at += n as u64;
        }
        Ok(())
    }

    fn write(&mut self, base: &dyn Base, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        if end > self.len(base)? {
            self.len = Some(end);
        }
        let mut at = offset;
        while at < end {
            let number = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = ((PAGE as usize - within) as u64).min(end - at) as usize;
            let mut page = self.page(base, number)?;
            page[within..within + n]
                .copy_from_slice(&data[(at - offset) as usize..(at - offset) as usize + n]);
            self.pages.insert(number, page);
            at += n as u64;
        }
        Ok(())
    }

    fn set_len(&mut self, base: &dyn Base, len: u64) -> io::Result<()> {
        let old = self.len(base)?;
        self.len = Some(len);
        // Bytes past a shrink read as zeros if the storage grows again.
        let first_gone = len / PAGE;
        let kept: Vec<u64> = self.pages.range(first_gone..).map(|(n, _)| *n).collect();
        for n in kept {
            if n * PAGE >= len {
                self.pages.remove(&n);
            } else if let Some(p) = self.pages.get_mut(&n) {
                p[(len - n * PAGE) as usize..].fill(0);
            }
        }
        if len < old && len % PAGE != 0 && !self.pages.contains_key(&first_gone) {
            let mut page = self.page(base, first_gone)?;
            page[(len % PAGE) as usize..].fill(0);
            self.pages.insert(first_gone, page);
        }
        Ok(())
    }

    /// Makes everything durable in the base, then syncs it.
    fn sync(&mut self, base: &mut dyn Base) -> io::Result<()> {
        let len = self.len(base)?;
        if base.base_len()? != len {
            base.base_set_len(len)?;
        }
        for (number, page) in &self.pages {
            let start = number * PAGE;
            if start < len {
                let n = (len - start).min(PAGE) as usize;
                base.base_write(start, &page[..n])?;
            }
        }
        base.base_sync()?;
        self.pages.clear();
        self.len = None;
        Ok(())
    }
}

/// A redb backend on a real file that keeps writes in memory until they are synced: killing
/// the process loses what a power cut would. For tests; it is as durable as the file backend
/// once `sync_data` returns, but holds every unsynced page in memory until then.
#[derive(Debug)]
pub struct VolatileFile {
    file: FileBackend,
    unsynced: Mutex<Unsynced>,
}

impl VolatileFile {
    pub fn new(file: File) -> Result<Self, redb::DatabaseError> {
        Ok(Self { file: FileBackend::new(file)?, unsynced: Mutex::default() })
    }
}

/// [`Base`] for a file backend (its writes go to the file at once).
struct OnFile<'a>(&'a FileBackend);

impl Base for OnFile<'_> {
    fn base_len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn base_read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, out)
    }
    fn base_write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
    fn base_set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn base_sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl StorageBackend for VolatileFile {
    fn len(&self) -> io::Result<u64> {
        self.unsynced.lock().expect("unsynced lock").len(&OnFile(&self.file))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.unsynced.lock().expect("unsynced lock").read(&OnFile(&self.file), offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.unsynced.lock().expect("unsynced lock").set_len(&OnFile(&self.file), len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.unsynced.lock().expect("unsynced lock").sync(&mut OnFile(&self.file))
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.unsynced.lock().expect("unsynced lock").write(&OnFile(&self.file), offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.query_lock_range(start, end)
    }
}

/// A disk in memory with a volatile cache, whose power a test can cut and whose next fsyncs or
/// free space it can take away. Clone it to keep it across a reopen.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<DiskState>>,
}

#[derive(Debug, Default)]
struct DiskState {
    /// What survives a power cut.
    durable: Vec<u8>,
    unsynced: Unsynced,
    /// The power is off: every operation fails until [`SimDisk::power_on`].
    off: bool,
    /// Fsyncs still to fail with `EIO` (each drops the unsynced writes, as Linux does).
    failing_syncs: u32,
    /// Most bytes the storage may grow to (`ENOSPC` beyond).
    capacity: Option<u64>,
    /// Writes until the power goes (a write torn by a power cut in the middle of a commit).
    writes_left: Option<u64>,
    syncs: u64,
}

impl Base for Vec<u8> {
    fn base_len(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn base_read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let start = offset as usize;
        out.copy_from_slice(&self[start..start + out.len()]);
        Ok(())
    }
    fn base_write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = offset as usize;
        self[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn base_set_len(&mut self, len: u64) -> io::Result<()> {
        self.resize(len as usize, 0);
        Ok(())
    }
    fn base_sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn powered_off() -> io::Error {
    io::Error::other("the disk has no power")
}

impl SimDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// A redb backend on this disk.
    pub fn backend(&self) -> SimDiskBackend {
        SimDiskBackend { disk: self.clone() }
    }

    /// Cuts the power: unsynced writes are gone and every operation fails until
    /// [`power_on`](Self::power_on) (so a database still open cannot write on its way out).
    /// Injected fsync failures end with it.
    pub fn power_cut(&self) {
        let mut s = self.state.lock().expect("disk lock");
        s.unsynced = Unsynced::default();
        s.off = true;
        s.failing_syncs = 0;
        s.writes_left = None;
    }

    pub fn power_on(&self) {
        self.state.lock().expect("disk lock").off = false;
    }

    /// The next `n` fsyncs fail with `EIO`.
    pub fn fail_syncs(&self, n: u32) {
        self.state.lock().expect("disk lock").failing_syncs = n;
    }

    /// The power goes during the `n`-th write from now (that write is lost with everything
    /// else unsynced): a power cut in the middle of a commit.
    pub fn cut_after_writes(&self, n: u64) {
        self.state.lock().expect("disk lock").writes_left = Some(n);
    }

    /// Takes back [`cut_after_writes`](Self::cut_after_writes) not yet reached.
    pub fn disarm(&self) {
        self.state.lock().expect("disk lock").writes_left = None;
    }

    /// The storage may grow to `bytes` at most (`None`: no limit).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state.lock().expect("disk lock").capacity = bytes;
    }

    /// Bytes the storage takes now (synced or not).
    pub fn len(&self) -> u64 {
        let s = self.state.lock().expect("disk lock");
        s.unsynced.len(&s.durable).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fsyncs that succeeded.
    pub fn syncs(&self) -> u64 {
        self.state.lock().expect("disk lock").syncs
    }
}

/// [`SimDisk`] as a redb backend.
#[derive(Debug)]
pub struct SimDiskBackend {
    disk: SimDisk,
}

impl SimDiskBackend {
    fn with<T>(&self, f: impl FnOnce(&mut DiskState) -> io::Result<T>) -> io::Result<T> {
        let mut s = self.disk.state.lock().expect("disk lock");
        if s.off {
            return Err(powered_off());
        }
        f(&mut s)
    }
}

fn no_space(capacity: u64) -> io::Error {
    io::Error::new(io::ErrorKind::StorageFull, format!("no space left on the disk ({capacity} bytes)"))
}

impl StorageBackend for SimDiskBackend {
    fn len(&self) -> io::Result<u64> {
        self.with(|s| s.unsynced.len(&s.durable))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.with(|s| s.unsynced.read(&s.durable, offset, out))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(|s| {
            if let Some(cap) = s.capacity.filter(|cap| len > *cap) {
                return Err(no_space(cap));
            }
            let DiskState { durable, unsynced, .. } = s;
            unsynced.set_len(durable, len)
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|s| {
            if s.failing_syncs > 0 {
                s.failing_syncs -= 1;
                // As on Linux: the failed pages are dropped, not retried by a later fsync.
                s.unsynced = Unsynced::default();
                return Err(io::Error::other("EIO: fsync failed (injected)"));
            }
            let DiskState { durable, unsynced, .. } = s;
            unsynced.sync(durable)?;
            s.syncs += 1;
            Ok(())
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with(|s| {
            if let Some(left) = s.writes_left.as_mut() {
                *left = left.saturating_sub(1);
                if *left == 0 {
                    s.unsynced = Unsynced::default();
                    s.off = true;
                    s.writes_left = None;
                    return Err(powered_off());
                }
            }
            let end = offset + data.len() as u64;
            if let Some(cap) = s.capacity.filter(|cap| end > *cap) {
                return Err(no_space(cap));
            }
            let DiskState { durable, unsynced, .. } = s;
            unsynced.write(durable, offset, data)
        })
    }
}

impl super::Store {
    /// Damages the oldest stored chunk of `topic` holding records `from..upto` only, as a
    /// failing disk would (F19: a bit flips in a value, which redb's own checks do not see),
    /// durably: `pick` chooses the bit, counted from the chunk's end (0: the last bit of its
    /// last byte; any other may hit the checksum, the header or a record's length). Returns
    /// its base offset (`None`: no such chunk). For the simulator and tests only; the writer
    /// must not be mid-group.
    pub fn damage_chunk(
        &self,
        topic: crate::types::TopicId,
        from: crate::types::Offset,
        upto: crate::types::Offset,
        pick: u64,
    ) -> Result<Option<crate::types::Offset>, crate::error::Error> {
        use redb::ReadableTable;
        let db = self.db.get().ok_or_else(|| self.storage_err("the database is being reopened"))?;
        let txn = db.begin_write().map_err(|e| self.storage_err(e))?;
        let damaged = {
            let mut table = txn.open_table(super::tables::CHUNKS).map_err(|e| self.storage_err(e))?;
            let mut found = None;
            for row in table.range((topic, from)..(topic, upto)).map_err(|e| self.storage_err(e))? {
                let (key, value) = row.map_err(|e| self.storage_err(e))?;
                let base = key.value().1;
                let chunk =
                    super::chunk::Chunk::parse_unchecked(value.value()).map_err(|e| self.storage_err(e))?;
                if chunk.end(base) <= upto {
                    found = Some((base, value.value().to_vec()));
                    break;
                }
            }
            if let Some((base, mut bytes)) = found {
                let len = bytes.len() as u64;
                bytes[(len - 1 - pick % len) as usize] ^= 1 << ((pick / len) % 8);
                table.insert((topic, base), bytes.as_slice()).map_err(|e| self.storage_err(e))?;
                Some(base)
            } else {
                None
            }
        };
        txn.commit().map_err(|e| self.storage_err(e))?;
        Ok(damaged)
    }
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase, TableDefinition};

    use super::*;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn open(disk: &SimDisk) -> Database {
        Database::builder().create_with_backend(disk.backend()).expect("opens")
    }

    fn get(db: &Database, k: u64) -> Option<u64> {
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(T).unwrap();
        table.get(k).unwrap().map(|v| v.value())
    }

    fn put(db: &Database, k: u64, v: u64) -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(T)?.insert(k, v)?;
        txn.commit()?;
        Ok(())
    }

    #[test]
    fn a_power_cut_keeps_what_was_synced_and_only_that() {
        let disk = SimDisk::new();
        let db = open(&disk);
        put(&db, 1, 10).unwrap();
        // A write the engine never syncs: an uncommitted transaction's pages.
        let txn = db.begin_write().unwrap();
        txn.open_table(T).unwrap().insert(2, 20).unwrap();
        disk.power_cut();
        drop(txn);
        drop(db);
        disk.power_on();
        let db = open(&disk);
        assert_eq!(get(&db, 1), Some(10));
        assert_eq!(get(&db, 2), None);
    }

    #[test]
    fn a_power_cut_in_the_middle_of_a_commit_recovers_to_the_last_commit() {
        for n in 1..12 {
            let disk = SimDisk::new();
            let db = open(&disk);
            put(&db, 1, 10).unwrap();
            disk.cut_after_writes(n);
            let torn = put(&db, 2, 20);
            drop(db);
            disk.power_on();
            let db = open(&disk);
            assert_eq!(get(&db, 1), Some(10), "cut after {n} writes");
            // The commit either happened whole or not at all.
            assert_eq!(get(&db, 2), torn.ok().map(|_| 20), "cut after {n} writes");
        }
    }

    #[test]
    fn a_failed_fsync_fails_the_commit_and_a_reopen_recovers() {
        let disk = SimDisk::new();
        let db = open(&disk);
        put(&db, 1, 10).unwrap();
        disk.fail_syncs(1);
        assert!(put(&db, 2, 20).is_err(), "the commit reports the failed fsync");
        drop(db);
        let db = open(&disk);
        assert_eq!(get(&db, 1), Some(10));
        put(&db, 3, 30).unwrap();
        assert_eq!(get(&db, 3), Some(30));
    }

    #[test]
    fn a_full_disk_fails_writes_and_space_coming_back_lets_them_through() {
        let disk = SimDisk::new();
        let db = open(&disk);
        put(&db, 1, 10).unwrap();
        disk.set_capacity(Some(disk.len()));
        let big = |db: &Database| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(T)?;
                for k in 100..20_000 {
                    t.insert(k, k)?;
                }
            }
            txn.commit()?;
            Ok(())
        };
        assert!(big(&db).is_err(), "ENOSPC");
        drop(db);
        disk.set_capacity(None);
        let db = open(&disk);
        assert_eq!(get(&db, 1), Some(10));
        big(&db).unwrap();
    }
}
