//! Going on after a full disk or an I/O error, without a restart (matrix F20/F21).
//!
//! After an I/O error redb refuses every later write until the database is opened again
//! (the pages' fate is unknown). The writer then reopens it, with backoff, answering what
//! waits meanwhile; readers see a short `Storage` error while the handle is swapped.
//!
//! A full disk also puts the writer in low-space mode: it deletes its reserve file (so the
//! reopen, and the cursor moves and deletions that free space, have room) and refuses the
//! writes that only add data (produce, a follower's copy, leading a new epoch) with a typed
//! error naming the directory, until it can write the reserve again.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redb::Database;

/// Bytes kept in `DATA/reserve` and given back when the disk fills up: room for redb to
/// reopen and for the cursor moves that free records.
pub const RESERVE_BYTES: usize = 16 * 1024 * 1024;

/// The reserve file in a data directory.
pub const RESERVE_FILE: &str = "reserve";

/// How often, while low on space, the writer tries to take its reserve back.
pub const SPACE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Longest pause between two attempts to reopen the database.
pub const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Opens the database again (the same file, the same settings).
pub type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send>;

/// The database handle the readers and the writer share; `None` while it is reopened.
pub struct DbHandle(RwLock<Option<Arc<Database>>>);

impl DbHandle {
    pub fn new(db: Database) -> Arc<Self> {
        Arc::new(Self(RwLock::new(Some(Arc::new(db)))))
    }

    pub fn get(&self) -> Option<Arc<Database>> {
        self.0.read().expect("db lock").clone()
    }

    /// Takes the handle away from new readers (they get `None` until [`put`](Self::put)).
    pub fn take(&self) -> Option<Arc<Database>> {
        self.0.write().expect("db lock").take()
    }

    pub fn put(&self, db: Database) {
        *self.0.write().expect("db lock") = Some(Arc::new(db));
    }
}

/// Whether a storage error says the disk is full.
pub fn is_no_space(e: &redb::Error) -> bool {
    const ENOSPC: i32 = 28;
    match e {
        redb::Error::Io(io) => {
            io.raw_os_error() == Some(ENOSPC) || io.kind() == std::io::ErrorKind::StorageFull
        }
        other => other.to_string().contains("No space left"),
    }
}

/// The reserve file of a data directory (none for the simulator's disk).
pub struct Reserve {
    path: Option<PathBuf>,
}

impl Reserve {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { path: dir.map(|d| d.join(RESERVE_FILE)) }
    }

    /// Writes the reserve if it is missing or short; fails when the disk has no room for it.
    pub fn ensure(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        if std::fs::metadata(path).is_ok_and(|m| m.len() >= RESERVE_BYTES as u64) {
            return Ok(());
        }
        let written = Self::write_zeros(path);
        if written.is_err() {
            let _ = std::fs::remove_file(path);
        }
        written
    }

    /// Takes the reserve back and checks that as much again is free beyond it: writes resume
    /// only then, rather than fill what was freed at once and fail again.
    pub fn take_back(&self) -> std::io::Result<()> {
        self.ensure()?;
        let Some(path) = &self.path else { return Ok(()) };
        let probe = path.with_extension("probe");
        let written = Self::write_zeros(&probe);
        let _ = std::fs::remove_file(&probe);
        written
    }

    fn write_zeros(path: &std::path::Path) -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        // Written, not only sized: a sparse file would reserve nothing.
        let chunk = vec![0u8; 1024 * 1024];
        for _ in 0..RESERVE_BYTES / chunk.len() {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    }

    /// Gives the reserve's space back to the filesystem.
    pub fn release(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }

    pub fn dir(&self) -> String {
        self.path
            .as_ref()
            .and_then(|p| p.parent())
            .map_or_else(|| "the simulated disk".to_string(), |d| d.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_written_whole_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let reserve = Reserve::new(Some(dir.path().to_path_buf()));
        reserve.ensure().unwrap();
        let path = dir.path().join(RESERVE_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RESERVE_BYTES as u64);
        reserve.release();
        assert!(!path.exists());
        let io = std::io::Error::from_raw_os_error(28);
        assert!(is_no_space(&redb::Error::Io(io)));
        assert!(!is_no_space(&redb::Error::Io(std::io::Error::from_raw_os_error(5))));
    }
}
