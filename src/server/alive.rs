//! How a follower tells each leader server that it is still there: every half lease (see
//! [`FOLLOWER_ALIVE_PER_LEASE`](crate::replica::FOLLOWER_ALIVE_PER_LEASE)), one
//! `FollowerAlive` message per leader server lists the epoch it follows each topic in. That
//! is the contact the leaders' majority checks need while idle fetches wait.
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

/// The epoch this server follows each topic in, by leader (`K`: the leader's address, or
/// its id in the simulator).
#[derive(Debug)]
pub struct Followed<K> {
    leader_of: HashMap<TopicId, K>,
    by_leader: BTreeMap<K, BTreeMap<TopicId, Epoch>>,
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
            if let Some(topics) = self.by_leader.get_mut(&old) {
                topics.remove(&id);
                if topics.is_empty() {
                    self.by_leader.remove(&old);
                }
            }
        }
        if let Some((leader, epoch)) = following {
            self.leader_of.insert(id, leader);
            self.by_leader.entry(leader).or_default().insert(id, epoch);
        }
    }

    /// Each leader's message: the topics followed from it, with their epochs.
    pub fn lists(&self) -> impl Iterator<Item = (K, Vec<(TopicId, Epoch)>)> + '_ {
        self.by_leader.iter().map(|(k, topics)| (*k, topics.iter().map(|(t, e)| (*t, *e)).collect()))
    }
}

/// Tells the leaders, every half lease, what this server follows from them (see the module
/// doc), until `shutdown`.
pub(super) async fn tell_leaders_alive(server: Arc<TopicServer>, shutdown: CancellationToken) {
    let mut followed = Followed::default();
    let mut first = true;
    // The digest of the list each leader holds, as far as this server knows.
    let told: Arc<Mutex<HashMap<SocketAddr, u64>>> = Arc::default();
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
        for (addr, list) in followed.lists() {
            let digest = crate::replication::digest(&list);
            let known = told.lock().expect("told lock").get(&addr) == Some(&digest);
            let topics = (!known).then_some(list);
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
                    let mut told = told.lock().expect("told lock");
                    match sent {
                        Ok(Ok(Response::Noted)) if sent_list => {
                            told.insert(addr, digest);
                        }
                        Ok(Ok(Response::Noted)) => {}
                        other => {
                            told.remove(&addr);
                            if let Ok(Err(e)) = other {
                                debug!(leader = %addr, error = %e, "telling a leader this follower is alive failed");
                            }
                        }
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
        f.update(1, Some((10, 1)));
        f.update(2, Some((10, 1)));
        f.update(3, Some((20, 4)));
        assert_eq!(f.lists().collect::<Vec<_>>(), vec![(10, vec![(1, 1), (2, 1)]), (20, vec![(3, 4)])]);
        f.update(2, Some((20, 2))); // a new leader
        f.update(1, None); // this server leads it now, or dropped it
        f.update(9, None); // never followed
        assert_eq!(f.lists().collect::<Vec<_>>(), vec![(20, vec![(2, 2), (3, 4)])]);
        f.update(2, None);
        f.update(3, None);
        assert_eq!(f.lists().count(), 0, "no leader is left with an empty list");
    }
}
