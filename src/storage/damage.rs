//! Chunks found damaged (a checksum that fails), kept until a peer's copy repairs them (F19).
//!
//! Reads note what they find here instead of only failing, so the server can ask another
//! replica for the chunk and put it back (`Store::repair_chunk`). Bounded: a disk that
//! damages more than [`MAX_DAMAGED`] chunks at once is failing, and the rest are found again
//! by the next reads that meet them.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::types::{Offset, TopicId};

/// Damaged chunks remembered at most.
pub const MAX_DAMAGED: usize = 1_024;

/// The damaged chunks found and not yet repaired, by topic and base offset.
#[derive(Debug, Default)]
pub struct Damaged {
    found: Mutex<BTreeSet<(TopicId, Offset)>>,
    news: Notify,
    repaired: AtomicU64,
}

impl Damaged {
    /// Notes the chunk at `base` of `topic` as damaged; wakes [`Self::wait`] if it is new.
    pub fn note(&self, topic: TopicId, base: Offset) {
        let mut found = self.found.lock().expect("damage lock");
        if found.len() < MAX_DAMAGED && found.insert((topic, base)) {
            tracing::warn!(topic, base, "a stored chunk fails its checksum: it is not served, and is repaired from another replica's copy");
            self.news.notify_one();
        }
    }

    /// Every damaged chunk known now.
    pub fn list(&self) -> Vec<(TopicId, Offset)> {
        self.found.lock().expect("damage lock").iter().copied().collect()
    }

    /// The chunk is gone (deleted, truncated) or reads well again without a repair.
    pub fn forget(&self, topic: TopicId, base: Offset) {
        self.found.lock().expect("damage lock").remove(&(topic, base));
    }

    /// The chunk was replaced by a peer's good copy.
    pub fn repaired(&self, topic: TopicId, base: Offset) {
        self.forget(topic, base);
        self.repaired.fetch_add(1, Ordering::Relaxed);
    }

    /// Chunks repaired from a peer's copy since the store was opened.
    pub fn repaired_count(&self) -> u64 {
        self.repaired.load(Ordering::Relaxed)
    }

    /// Waits until a chunk not known before is noted.
    pub async fn wait(&self) {
        self.news.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_noted_once_and_forgotten_when_repaired() {
        let d = Damaged::default();
        d.note(1, 0);
        d.note(1, 0);
        d.note(2, 5);
        assert_eq!(d.list(), vec![(1, 0), (2, 5)]);
        d.repaired(1, 0);
        assert_eq!(d.list(), vec![(2, 5)]);
        assert_eq!(d.repaired_count(), 1);
        d.forget(2, 5);
        assert_eq!((d.list(), d.repaired_count()), (vec![], 1));
        for i in 0..2 * MAX_DAMAGED as u64 {
            d.note(3, i);
        }
        assert_eq!(d.list().len(), MAX_DAMAGED, "bounded");
    }
}
