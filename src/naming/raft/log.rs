//! The naming group's Raft log, durable in redb: raft-rs reads it through [`Storage`]; the
//! group ([`super::BookNode`]) writes what each `Ready` asks, in one transaction, before it
//! sends the messages that depend on it.
//!
//! Everything is also kept in memory (the book's log is small: a snapshot replaces the
//! entries it covers), so raft-rs's reads never touch the disk.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use redb::{Database, ReadableDatabase, TableDefinition};

/// Raft entries by index.
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
/// The hard state, the configuration and the latest snapshot, each a protobuf message.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("raft log storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("raft log: a stored message does not decode: {0}")]
    Corrupt(#[from] protobuf::ProtobufError),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for LogError {
            fn from(e: $t) -> Self {
                LogError::Storage(e.into())
            }
        }
    )*};
}
from_redb!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

#[derive(Default)]
struct Inner {
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot: the book as of its index (empty data before the first).
    snapshot: Snapshot,
    /// Entries after the snapshot, from `snapshot.index + 1`.
    entries: Vec<Entry>,
}

impl Inner {
    fn first_index(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last_index(&self) -> u64 {
        self.snapshot.get_metadata().index + self.entries.len() as u64
    }
}

/// What one `Ready` asks to make durable, in raft-rs's order: a snapshot replaces the log,
/// then entries are appended (replacing any conflicting tail), then the hard state.
#[derive(Default)]
pub struct Persist<'a> {
    pub snapshot: Option<&'a Snapshot>,
    pub entries: &'a [Entry],
    pub hard_state: Option<&'a HardState>,
}

/// The log of one naming server; clones share it.
#[derive(Clone)]
pub struct RaftLog {
    db: Arc<Database>,
    inner: Arc<RwLock<Inner>>,
}

fn encode(m: &impl protobuf::Message) -> Vec<u8> {
    m.write_to_bytes().expect("a raft message encodes")
}

impl RaftLog {
    /// Opens the log in `db` (empty on first start).
    pub fn open(db: Arc<Database>) -> Result<Self, LogError> {
        let txn = db.begin_write()?;
        txn.open_table(ENTRIES)?;
        txn.open_table(STATE)?;
        txn.commit()?;
        let mut inner = Inner::default();
        let txn = db.begin_read()?;
        let state = txn.open_table(STATE)?;
        if let Some(v) = state.get("hard_state")? {
            inner.hard_state = HardState::parse_from_bytes(v.value())?;
        }
        if let Some(v) = state.get("conf_state")? {
            inner.conf_state = ConfState::parse_from_bytes(v.value())?;
        }
        if let Some(v) = state.get("snapshot")? {
            inner.snapshot = Snapshot::parse_from_bytes(v.value())?;
        }
        // A snapshot holds committed entries only; the stored commit may be older (a commit
        // learnt outside a hard state is kept in memory), and raft-rs refuses to start with
        // a commit before its first index.
        inner.hard_state.commit = inner.hard_state.commit.max(inner.snapshot.get_metadata().index);
        let first = inner.first_index();
        for row in txn.open_table(ENTRIES)?.range(first..)? {
            let (_, v) = row?;
            inner.entries.push(Entry::parse_from_bytes(v.value())?);
        }
        drop(state);
        Ok(Self { db, inner: Arc::new(RwLock::new(inner)) })
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the log was ever given a configuration (a group member that started before).
    pub fn initialized(&self) -> bool {
        let inner = self.read();
        !inner.conf_state.voters.is_empty() || inner.last_index() > 0
    }

    /// The latest snapshot (the book as of its index).
    pub fn snapshot_now(&self) -> Snapshot {
        self.read().snapshot.clone()
    }

    /// Makes `p` durable (one transaction, one fsync), then shows it to raft-rs.
    pub fn persist(&self, p: Persist<'_>) -> Result<(), LogError> {
        if p.snapshot.is_none() && p.entries.is_empty() && p.hard_state.is_none() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut entries = txn.open_table(ENTRIES)?;
            let mut state = txn.open_table(STATE)?;
            if let Some(s) = p.snapshot {
                entries.retain(|_, _| false)?;
                state.insert("snapshot", encode(s).as_slice())?;
                state.insert("conf_state", encode(s.get_metadata().get_conf_state()).as_slice())?;
            }
            if let Some(first) = p.entries.first() {
                entries.retain_in(first.index.., |_, _| false)?;
                for e in p.entries {
                    entries.insert(e.index, encode(e).as_slice())?;
                }
            }
            if let Some(hs) = p.hard_state {
                state.insert("hard_state", encode(hs).as_slice())?;
            }
        }
        txn.commit()?;
        let mut inner = self.write();
        if let Some(s) = p.snapshot {
            inner.conf_state = s.get_metadata().get_conf_state().clone();
            let meta = s.get_metadata();
            inner.hard_state.commit = inner.hard_state.commit.max(meta.index);
            inner.hard_state.term = inner.hard_state.term.max(meta.term);
            inner.snapshot = s.clone();
            inner.entries.clear();
        }
        if let Some(first) = p.entries.first() {
            let keep = first.index.saturating_sub(inner.first_index()) as usize;
            inner.entries.truncate(keep);
            inner.entries.extend_from_slice(p.entries);
        }
        if let Some(hs) = p.hard_state {
            inner.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Records a commit index raft-rs reported outside a hard state (kept in memory: after a
    /// restart the group learns it again).
    pub fn set_commit(&self, commit: u64) {
        let mut inner = self.write();
        inner.hard_state.commit = inner.hard_state.commit.max(commit);
    }

    /// Makes a configuration change durable once it is applied.
    pub fn set_conf_state(&self, cs: ConfState) -> Result<(), LogError> {
        let txn = self.db.begin_write()?;
        txn.open_table(STATE)?.insert("conf_state", encode(&cs).as_slice())?;
        txn.commit()?;
        self.write().conf_state = cs;
        Ok(())
    }

    /// Replaces the entries up to `index` (applied, with `data` the book as of it) by a
    /// snapshot, so the log stays small.
    pub fn compact(&self, index: u64, data: Vec<u8>) -> Result<(), LogError> {
        let mut snapshot = Snapshot::default();
        {
            let inner = self.read();
            if index < inner.first_index() || index > inner.last_index() || index > inner.hard_state.commit {
                return Ok(());
            }
            let term = inner.entries[(index - inner.first_index()) as usize].term;
            let meta = snapshot.mut_metadata();
            meta.index = index;
            meta.term = term;
            meta.set_conf_state(inner.conf_state.clone());
            snapshot.data = data.into();
        }
        let txn = self.db.begin_write()?;
        {
            txn.open_table(ENTRIES)?.retain_in(..=index, |_, _| false)?;
            txn.open_table(STATE)?.insert("snapshot", encode(&snapshot).as_slice())?;
        }
        txn.commit()?;
        let mut inner = self.write();
        let drop_upto = (index + 1 - inner.first_index()) as usize;
        inner.entries.drain(..drop_upto);
        inner.snapshot = snapshot;
        Ok(())
    }

    /// The index a member rebuilding from an empty log must apply before it votes again
    /// (see `BookNode`), if it is rebuilding; kept across restarts.
    pub fn rebuilding(&self) -> Result<Option<u64>, LogError> {
        let txn = self.db.begin_read()?;
        let state = txn.open_table(STATE)?;
        Ok(state.get("rebuilding")?.map(|v| u64::from_le_bytes(v.value().try_into().unwrap_or([0; 8]))))
    }

    pub fn set_rebuilding(&self, until: Option<u64>) -> Result<(), LogError> {
        let txn = self.db.begin_write()?;
        {
            let mut state = txn.open_table(STATE)?;
            match until {
                Some(i) => state.insert("rebuilding", i.to_le_bytes().as_slice())?,
                None => state.remove("rebuilding")?,
            };
        }
        txn.commit()?;
        Ok(())
    }

    /// The voters of the configuration this log holds (empty before the first start).
    pub fn voters(&self) -> Vec<u64> {
        self.read().conf_state.voters.clone()
    }

    /// Entries stored after the snapshot (for tests and diagnostics).
    pub fn entry_count(&self) -> usize {
        self.read().entries.len()
    }
}

impl Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let inner = self.read();
        Ok(RaftState::new(inner.hard_state.clone(), inner.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let inner = self.read();
        if low < inner.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= inner.last_index() + 1,
            "entries up to {high} asked, the log ends at {}",
            inner.last_index()
        );
        let offset = inner.first_index();
        let mut entries = inner.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let inner = self.read();
        let meta = inner.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < inner.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > inner.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(inner.entries[(idx - inner.first_index()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let inner = self.read();
        if inner.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(inner.snapshot.clone())
    }
}
