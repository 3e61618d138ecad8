//! How a follower tells each leader server that it is still there: every half lease (see
//! [`FOLLOWER_ALIVE_PER_LEASE`](crate::replica::FOLLOWER_ALIVE_PER_LEASE)), one
//! `FollowerAlive` message per leader server lists the epoch it follows each topic in. That
//! is the contact the leaders' majority checks need while idle fetches wait or are parked.
//!
//! The lists are kept, not rebuilt: only the topics whose state changed since the last
//! round are read again. A list goes to its leader only when it changed; otherwise its
//! digest does (see [`AliveBook`](crate::replication::AliveBook)), so an idle topic costs no
//! bytes on the wire and no look at its replica on either side.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use super::{TopicServer, LEADER_CONTACT_LEASES};
use crate::storage::ChangeReader;
use crate::types::{Epoch, TopicId};
use crate::wire::{Request, Response};

/// The topics followed from one leader with their epochs, sorted by id, as sent.
pub type FollowedList = Vec<(TopicId, Epoch)>;

/// The epoch this server follows each topic in, by leader (`K`: the leader's address, or
/// its id in the simulator).
#[derive(Debug)]
pub struct Followed<K> {
    leader_of: HashMap<TopicId, K>,
    by_leader: BTreeMap<K, FromLeader>,
}

/// The topics followed from one leader, and the digest of that list (`None`: not computed
/// since it changed), so an unchanged list costs nothing per round.
#[derive(Debug, Default)]
struct FromLeader {
    topics: BTreeMap<TopicId, Epoch>,
    digest: Option<u64>,
}

impl<K> Default for Followed<K> {
    fn default() -> Self {
        Self { leader_of: HashMap::new(), by_leader: BTreeMap::new() }
    }
}

impl<K: Ord + Copy> Followed<K> {
    /// Topic `id` now follows `following` (its leader and epoch), or nothing (it leads, or is
    /// no longer hosted).
    pub fn update(&mut self, id: TopicId, following: Option<(K, Epoch)>) {
        if let Some(old) = self.leader_of.remove(&id) {
            if let Some(from) = self.by_leader.get_mut(&old) {
                from.topics.remove(&id);
                from.digest = None;
                if from.topics.is_empty() {
                    self.by_leader.remove(&old);
                }
            }
        }
        if let Some((leader, epoch)) = following {
            self.leader_of.insert(id, leader);
            let from = self.by_leader.entry(leader).or_default();
            from.topics.insert(id, epoch);
            from.digest = None;
        }
    }

    /// Each leader's next `FollowerAlive`: the digest of the topics followed from it (sorted
    /// by id, with their epochs), and the list itself unless `told` says the leader holds it.
    pub fn messages(&mut self, told: &Told<K>) -> Vec<(K, u64, Option<FollowedList>)> {
        let list =
            |topics: &BTreeMap<TopicId, Epoch>| topics.iter().map(|(t, e)| (*t, *e)).collect::<Vec<_>>();
        self.by_leader
            .iter_mut()
            .map(|(k, from)| {
                let topics = &from.topics;
                let digest = *from.digest.get_or_insert_with(|| crate::replication::digest(&list(topics)));
                (*k, digest, (!told.holds(*k, digest)).then(|| list(topics)))
            })
            .collect()
    }
}

/// The digest of the list each leader holds, as its answers said.
#[derive(Debug)]
pub struct Told<K>(BTreeMap<K, u64>);

impl<K> Default for Told<K> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<K: Ord + Copy> Told<K> {
    pub fn holds(&self, leader: K, digest: u64) -> bool {
        self.0.get(&leader) == Some(&digest)
    }

    /// `leader` answered a message naming `digest` (`sent_list`: it carried the list):
    /// `noted`, or not (`ListWanted`, an error, no answer), after which the list goes again.
    pub fn answered(&mut self, leader: K, digest: u64, sent_list: bool, noted: bool) {
        if !noted {
            self.0.remove(&leader);
        } else if sent_list {
            self.0.insert(leader, digest);
        }
    }
}

/// Tells the leaders, every half lease, what this server follows from them (see the module
/// doc), until `shutdown`.
pub(super) async fn tell_leaders_alive(server: Arc<TopicServer>, shutdown: CancellationToken) {
    let mut followed = Followed::default();
    let mut first = true;
    let told: Arc<Mutex<Told<SocketAddr>>> = Arc::default();
    loop {
        let lease_ms = server.lease_ms.load(Ordering::Relaxed);
        let every = Duration::from_millis(lease_ms / crate::replica::FOLLOWER_ALIVE_PER_LEASE)
            .clamp(Duration::from_millis(50), crate::replica::FOLLOWER_ALIVE_EVERY);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // Taken before reading, so a change while reading is read again next round.
        let changed = server.node.store.changed_topics().take(ChangeReader::FollowerAlive);
        {
            let topics = server.topics.read().expect("topics lock");
            let following = |id| {
                let (_, addr, epoch) = topics.by_id(id)?.replica.following_epoch()?;
                Some((addr?, epoch))
            };
            let ids: Vec<TopicId> = if std::mem::take(&mut first) {
                topics.values().map(|h| h.replica.log.id).collect()
            } else {
                changed.into_iter().collect()
            };
            for id in ids {
                followed.update(id, following(id));
            }
        }
        let messages = followed.messages(&told.lock().expect("told lock"));
        for (addr, digest, topics) in messages {
            let sent_list = topics.is_some();
            let req = Request::FollowerAlive { replica: server.node.id, digest, topics };
            let (node, told) = (server.node.clone(), told.clone());
            // One at a time per leader would let a dead one hold up the rest: each its own task,
            // bounded by the leader's contact window (a slow delivery still counts until then;
            // a new message goes every half lease meanwhile). Messages are idempotent, so an
            // overtaken one does no harm; a lost list is sent again when the leader asks.
            let window = Duration::from_millis(lease_ms * LEADER_CONTACT_LEASES).max(every);
            tokio::spawn(
                async move {
                    let sent = tokio::time::timeout(window, node.call_peer(addr, &req)).await;
                    let noted = matches!(sent, Ok(Ok(Response::Noted)));
                    told.lock().expect("told lock").answered(addr, digest, sent_list, noted);
                    if let Ok(Err(e)) = sent {
                        debug!(leader = %addr, error = %e, "telling a leader this follower is alive failed");
                    }
                }
                .in_current_span(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_each_leaders_list_as_topics_move() {
        let mut f = Followed::default();
        let told = Told::default();
        let lists = |f: &mut Followed<u64>| -> Vec<(u64, Vec<(TopicId, Epoch)>)> {
            f.messages(&told)
                .into_iter()
                .map(|(k, d, l)| (k, l.expect("a list the leader lacks"), d))
                .map(|(k, l, d)| {
                    assert_eq!(d, crate::replication::digest(&l));
                    (k, l)
                })
                .collect()
        };
        f.update(1, Some((10, 1)));
        f.update(2, Some((10, 1)));
        f.update(3, Some((20, 4)));
        assert_eq!(lists(&mut f), vec![(10, vec![(1, 1), (2, 1)]), (20, vec![(3, 4)])]);
        f.update(2, Some((20, 2))); // a new leader
        f.update(1, None); // this server leads it now, or dropped it
        f.update(9, None); // never followed
        assert_eq!(lists(&mut f), vec![(20, vec![(2, 2), (3, 4)])]);
        f.update(2, None);
        f.update(3, None);
        assert!(lists(&mut f).is_empty(), "no leader is left with an empty list");
    }

    #[test]
    fn a_list_goes_until_its_leader_noted_it_and_again_when_asked() {
        let mut f = Followed::default();
        let mut told = Told::default();
        f.update(1, Some((10, 1)));
        let [(_, digest, list)] = f.messages(&told).try_into().unwrap();
        assert!(list.is_some());
        told.answered(10, digest, true, false); // lost
        assert!(f.messages(&told)[0].2.is_some(), "sent again");
        told.answered(10, digest, true, true);
        assert_eq!(f.messages(&told), vec![(10, digest, None)], "the digest alone now");
        told.answered(10, digest, false, false); // `ListWanted`
        assert!(f.messages(&told)[0].2.is_some(), "the leader asked for it");
        told.answered(10, digest, true, true);
        f.update(2, Some((10, 1)));
        let [(_, changed, list)] = f.messages(&told).try_into().unwrap();
        assert_ne!(changed, digest);
        assert_eq!(list, Some(vec![(1, 1), (2, 1)]), "a changed list goes whole");
    }
}
