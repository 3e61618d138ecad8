//! The topics a server hosts: each one's replica, applied assignment, policies and
//! subscription holds, found by name (client requests) or by id (replication messages).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::error::Error;
use crate::policy::Policy;
use crate::replica::{Assignment, Replica};
use crate::types::{Epoch, SubscriptionName, TopicId, TopicName};
use crate::wire::{ConsumerSession, TopicConfig};

/// A hosted replica and the assignment this process applied to it (`None` until the first
/// one after a start: a restarted server waits for the book before it leads again).
pub(super) struct Hosted {
    pub(super) replica: Arc<Replica>,
    pub(super) applied: Mutex<Option<Assignment>>,
    /// The topic's policies as last given by the book (or stored, after a restart).
    pub(super) policy: RwLock<Arc<Policy>>,
    /// The consumer holding each subscription. Kept in the leader's memory: after a
    /// failover or restart, the first consumer to come takes a subscription.
    holders: Mutex<HashMap<String, Holder>>,
    /// When each subscription's cursor last moved here (ms since the Unix epoch).
    pub(super) last_acks: Mutex<HashMap<String, u64>>,
    /// An epoch this replica was told to lead and would not (reported to the naming server).
    pub(super) refused: Mutex<Option<Epoch>>,
}

/// Holds a topic keeps before it sweeps out the lapsed ones.
const MAX_IDLE_HOLDERS: usize = 1024;

/// A consumer's hold on a subscription.
struct Holder {
    session: u64,
    name: String,
    expires: Instant,
    /// Who took the subscription from this consumer with `--force`: the consumer's later
    /// requests are refused (`SubscriptionTakenOver`) while it keeps trying, and anyone else
    /// may take the subscription.
    taken_by: Option<String>,
}

impl Holder {
    /// What another consumer of the subscription is told.
    pub(super) fn busy(&self, topic: &TopicName, subscription: &str, now: Instant) -> Error {
        Error::SubscriptionBusy {
            topic: topic.to_string(),
            subscription: subscription.to_string(),
            holder: self.name.clone(),
            expires_in_ms: (self.expires - now).as_millis() as u64,
        }
    }
}

impl Hosted {
    pub(super) fn new(replica: Arc<Replica>, applied: Option<Assignment>, config: TopicConfig) -> Arc<Self> {
        Arc::new(Self {
            replica,
            applied: Mutex::new(applied),
            policy: RwLock::new(Arc::new(Policy::new(config))),
            holders: Mutex::new(HashMap::new()),
            last_acks: Mutex::new(HashMap::new()),
            refused: Mutex::new(None),
        })
    }

    /// Takes (or keeps) `subscription` for `session` for `hold` from now; refused while
    /// another consumer's hold lasts.
    pub(super) fn claim(
        &self,
        subscription: &SubscriptionName,
        session: &ConsumerSession,
        peer: SocketAddr,
        hold: Duration,
    ) -> Result<(), Error> {
        let now = Instant::now();
        let mut holders = self.holders.lock().expect("holders lock");
        if let Some(h) = holders.get_mut(subscription.as_str()) {
            if let (true, Some(by)) = (h.session == session.id, &h.taken_by) {
                // Fenced for as long as it keeps coming back.
                h.expires = now + hold;
                return Err(Error::SubscriptionTakenOver {
                    topic: self.replica.log.name.to_string(),
                    subscription: subscription.to_string(),
                    by: by.clone(),
                });
            }
            if h.session != session.id && h.expires > now && h.taken_by.is_none() {
                return Err(h.busy(&self.replica.log.name, subscription.as_str(), now));
            }
        }
        if holders.len() >= MAX_IDLE_HOLDERS {
            // Forget lapsed holds (e.g. of subscriptions since deleted) so the map stays small.
            holders.retain(|_, h| h.expires > now);
        }
        let expires = now + hold;
        match holders.get_mut(subscription.as_str()) {
            Some(h) if h.session == session.id => h.expires = h.expires.max(expires),
            _ => {
                info!(topic = %self.replica.log.name, subscription = %subscription, consumer = %session.name, %peer, "a consumer took the subscription");
                let name = format!("{} ({peer})", session.name);
                holders.insert(
                    subscription.to_string(),
                    Holder { session: session.id, name, expires, taken_by: None },
                );
            }
        }
        Ok(())
    }

    /// Ends `session`'s hold `lease` from now (after a long poll that held it longer).
    pub(super) fn renew(&self, subscription: &SubscriptionName, session: u64, lease: Duration) {
        if let Some(h) = self.holders.lock().expect("holders lock").get_mut(subscription.as_str()) {
            if h.session == session && h.taken_by.is_none() {
                h.expires = Instant::now() + lease;
            }
        }
    }

    pub(super) fn release(&self, subscription: &SubscriptionName, session: u64) {
        let mut holders = self.holders.lock().expect("holders lock");
        if holders.get(subscription.as_str()).is_some_and(|h| h.session == session) {
            holders.remove(subscription.as_str());
            info!(topic = %self.replica.log.name, subscription = %subscription, "a consumer released the subscription");
        }
    }

    /// Who holds `subscription` now, if anyone.
    pub(super) fn holder(&self, subscription: &str) -> Option<String> {
        let now = Instant::now();
        let holders = self.holders.lock().expect("holders lock");
        holders.get(subscription).filter(|h| h.expires > now && h.taken_by.is_none()).map(|h| h.name.clone())
    }

    /// `SubscriptionBusy` if a consumer holds `subscription` now.
    pub(super) fn refuse_if_held(&self, subscription: &str) -> Result<(), Error> {
        let now = Instant::now();
        let holders = self.holders.lock().expect("holders lock");
        match holders.get(subscription).filter(|h| h.expires > now && h.taken_by.is_none()) {
            Some(h) => Err(h.busy(&self.replica.log.name, subscription, now)),
            None => Ok(()),
        }
    }

    /// Before a reset or delete: refused while held, unless `force` (by `by`), which fences
    /// the holder so its stale position cannot undo the change.
    pub(super) fn take_over(&self, subscription: &str, force: bool, by: &str) -> Result<(), Error> {
        if !force {
            return self.refuse_if_held(subscription);
        }
        let now = Instant::now();
        let mut holders = self.holders.lock().expect("holders lock");
        if let Some(h) = holders.get_mut(subscription).filter(|h| h.expires > now && h.taken_by.is_none()) {
            warn!(topic = %self.replica.log.name, subscription, consumer = %h.name, by, "a subscription was taken from its consumer with --force");
            h.taken_by = Some(by.to_string());
        }
        Ok(())
    }

    /// After `subscription` was deleted: its last ack and its holder are forgotten, except
    /// a fenced holder, which stays fenced (a subscription made again under the name must not
    /// take its stale acks).
    pub(super) fn forget_subscription(&self, subscription: &str) {
        self.last_acks.lock().expect("acks lock").remove(subscription);
        let mut holders = self.holders.lock().expect("holders lock");
        if holders.get(subscription).is_some_and(|h| h.taken_by.is_none()) {
            holders.remove(subscription);
        }
    }

    pub(super) fn policy(&self) -> Arc<Policy> {
        self.policy.read().expect("policy lock").clone()
    }
}

/// The hosted topics, by name and by id (one entry each; both indexes always agree).
#[derive(Default)]
pub(super) struct HostedTopics {
    by_name: HashMap<TopicName, Arc<Hosted>>,
    by_id: HashMap<TopicId, Arc<Hosted>>,
}

impl HostedTopics {
    pub(super) fn get(&self, name: &TopicName) -> Option<&Arc<Hosted>> {
        self.by_name.get(name)
    }

    pub(super) fn by_id(&self, id: TopicId) -> Option<&Arc<Hosted>> {
        self.by_id.get(&id)
    }

    /// Hosts `hosted` under its name, in place of any topic of that name.
    pub(super) fn insert(&mut self, hosted: Arc<Hosted>) {
        let log = &hosted.replica.log;
        if let Some(old) = self.by_name.insert(log.name.clone(), hosted.clone()) {
            self.by_id.remove(&old.replica.log.id);
        }
        self.by_id.insert(log.id, hosted);
    }

    /// Stops hosting topic `id`, if it is hosted.
    pub(super) fn remove(&mut self, id: TopicId) {
        if let Some(h) = self.by_id.remove(&id) {
            self.by_name.remove(&h.replica.log.name);
        }
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Arc<Hosted>> {
        self.by_id.values()
    }
}
