//! What a leader server knows of its followers between fetches: each follower server says,
//! every half lease, the epoch it follows each topic in (`FollowerAlive`), which is contact
//! for the leaders' majority checks while idle fetches wait or are parked.
//!
//! With thousands of topics a list per message was most of an idle server's work (sent,
//! decoded, and applied to every replica twice a second), so a follower sends its list only
//! when it changed, and otherwise only the list's [`digest`]: a leader that holds the list
//! with that digest counts the message as contact for every topic on it, without looking at
//! any replica. A leader that does not (it restarted, or a list was lost) asks for the list.
//! Messages are idempotent: a late one does no more than a lost one would.

use std::collections::HashMap;

use crate::types::{Epoch, ServerId, TopicId};

/// A deterministic 64-bit digest of a follower's list (FNV-1a over the ids and epochs, in
/// the order sent: sorted by topic id).
pub fn digest(topics: &[(TopicId, Epoch)]) -> u64 {
    crate::types::fnv1a(topics.iter().flat_map(|(t, e)| t.to_le_bytes().into_iter().chain(e.to_le_bytes())))
}

/// One follower server's last list, and when it last said it still holds.
#[derive(Debug)]
struct View {
    digest: u64,
    epochs: HashMap<TopicId, Epoch>,
    heard_ms: u64,
}

/// What a `FollowerAlive` message did.
#[derive(Debug, PartialEq, Eq)]
pub enum AliveOutcome {
    /// Contact noted. These entries are new or changed: their replicas check them (a newer
    /// epoch deposes the leader).
    Noted(Vec<(TopicId, Epoch)>),
    /// A digest of a list this leader does not hold: the follower should send the list.
    ListWanted,
}

/// The leader server's side: each follower server's last list (see the module doc).
#[derive(Debug, Default)]
pub struct AliveBook {
    followers: HashMap<ServerId, View>,
}

impl AliveBook {
    /// Follower `from` says at `now_ms` it follows what its list with `digest` says; `topics`
    /// is the list, when sent.
    pub fn on_alive(
        &mut self,
        from: ServerId,
        digest: u64,
        topics: Option<Vec<(TopicId, Epoch)>>,
        now_ms: u64,
    ) -> AliveOutcome {
        let Some(topics) = topics else {
            return match self.followers.get_mut(&from) {
                Some(v) if v.digest == digest => {
                    v.heard_ms = v.heard_ms.max(now_ms);
                    AliveOutcome::Noted(Vec::new())
                }
                _ => AliveOutcome::ListWanted,
            };
        };
        let old = self.followers.remove(&from).map(|v| v.epochs).unwrap_or_default();
        let changed = topics.iter().filter(|(t, e)| old.get(t) != Some(e)).copied().collect();
        let epochs = topics.into_iter().collect();
        self.followers.insert(from, View { digest, epochs, heard_ms: now_ms });
        AliveOutcome::Noted(changed)
    }

    /// When follower `from` last said it follows `topic` in `epoch`, if its list says so.
    pub fn heard_at(&self, from: ServerId, topic: TopicId, epoch: Epoch) -> Option<u64> {
        let v = self.followers.get(&from)?;
        (v.epochs.get(&topic) == Some(&epoch)).then_some(v.heard_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_renews_contact_only_for_the_list_it_names() {
        let mut book = AliveBook::default();
        let list = vec![(1, 3), (2, 5)];
        let d = digest(&list);
        assert_eq!(book.on_alive(7, d, None, 100), AliveOutcome::ListWanted, "no list yet");
        assert_eq!(book.on_alive(7, d, Some(list.clone()), 200), AliveOutcome::Noted(list.clone()));
        assert_eq!(book.heard_at(7, 1, 3), Some(200));
        assert_eq!(book.heard_at(7, 1, 4), None, "another epoch is no contact");
        assert_eq!(book.heard_at(8, 1, 3), None, "another follower");
        assert_eq!(book.on_alive(7, d, None, 700), AliveOutcome::Noted(Vec::new()));
        assert_eq!(book.heard_at(7, 2, 5), Some(700), "the digest renewed every topic of the list");
        assert_eq!(book.on_alive(7, d ^ 1, None, 900), AliveOutcome::ListWanted, "a list it never had");
        assert_eq!(book.heard_at(7, 2, 5), Some(700), "which renews nothing");
    }

    #[test]
    fn a_new_list_reports_only_what_changed_and_forgets_what_left() {
        let mut book = AliveBook::default();
        let first = vec![(1, 3), (2, 5)];
        book.on_alive(7, digest(&first), Some(first), 100);
        let next = vec![(2, 6), (4, 1)];
        assert_eq!(
            book.on_alive(7, digest(&next), Some(next), 200),
            AliveOutcome::Noted(vec![(2, 6), (4, 1)])
        );
        assert_eq!(book.heard_at(7, 1, 3), None, "topic 1 left the list");
        assert_eq!(book.heard_at(7, 2, 6), Some(200));
    }

    #[test]
    fn digests_differ_with_ids_epochs_and_order() {
        let a = digest(&[(1, 2), (3, 4)]);
        assert_ne!(a, digest(&[(1, 2), (3, 5)]));
        assert_ne!(a, digest(&[(1, 2)]));
        assert_ne!(a, digest(&[(3, 4), (1, 2)]));
        assert_eq!(a, digest(&[(1, 2), (3, 4)]));
        assert_ne!(digest(&[]), digest(&[(0, 0)]));
    }
}
