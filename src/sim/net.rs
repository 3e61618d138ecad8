//! The simulated network: messages between nodes, each link in order (as a QUIC stream is),
//! with latency, loss, duplication and partitions chosen by the run's seed.

use std::collections::{BTreeMap, BTreeSet};

use crate::types::ServerId;
use crate::wire::{Request, Response};

/// A node of the simulated cluster: the naming server, a topic server, or a client.
pub type NodeId = u64;

/// The naming server's node id.
pub const NAMING: NodeId = 0;

/// Client node ids start here (topic servers are `1..`).
pub const FIRST_CLIENT: NodeId = 1000;

/// The node id of topic server `id`.
pub fn server_node(id: ServerId) -> NodeId {
    id
}

/// What travels.
#[derive(Debug, Clone)]
pub enum Payload {
    Request { id: u64, req: Box<Request> },
    Response { id: u64, resp: Box<Response> },
}

#[derive(Debug, Clone)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    pub payload: Payload,
}

/// How bad the network is (chosen per seed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weather {
    /// Chance that a message is lost.
    pub loss: f64,
    /// Chance that a message between servers, or an answer, arrives twice.
    pub duplication: f64,
    /// One-way latency, uniform in this range (ms).
    pub min_latency_ms: u64,
    pub max_latency_ms: u64,
}

impl Weather {
    pub fn calm() -> Self {
        Self { loss: 0.0, duplication: 0.0, min_latency_ms: 1, max_latency_ms: 1 }
    }
}

/// Links, their order, and the partitions in force.
#[derive(Debug, Clone)]
pub struct Net {
    pub weather: Weather,
    /// Directed links that drop everything.
    blocked: BTreeSet<(NodeId, NodeId)>,
    /// When the last message on each link arrives: later ones arrive after it.
    last: BTreeMap<(NodeId, NodeId), u64>,
}

impl Net {
    pub fn new(weather: Weather) -> Self {
        Self { weather, blocked: BTreeSet::new(), last: BTreeMap::new() }
    }

    pub fn is_blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.blocked.contains(&(from, to))
    }

    /// Cuts (or heals) both directions between `a` and `b`.
    pub fn cut(&mut self, a: NodeId, b: NodeId, cut: bool) {
        for link in [(a, b), (b, a)] {
            if cut {
                self.blocked.insert(link);
            } else {
                self.blocked.remove(&link);
            }
        }
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    /// When (and whether, and how many times) `msg` sent at `now` arrives.
    pub fn send(&mut self, rng: &mut fastrand::Rng, now: u64, msg: &Message) -> Vec<u64> {
        if self.is_blocked(msg.from, msg.to) || rng.f64() < self.weather.loss {
            return Vec::new();
        }
        let w = self.weather;
        let mut arrivals = Vec::new();
        // A client's request is never doubled by the network (a QUIC stream delivers once);
        // clients double their requests themselves, by retrying.
        let from_client = msg.from >= FIRST_CLIENT && matches!(msg.payload, Payload::Request { .. });
        let copies = if !from_client && rng.f64() < w.duplication { 2 } else { 1 };
        for _ in 0..copies {
            let latency = rng.u64(w.min_latency_ms..=w.max_latency_ms.max(w.min_latency_ms));
            let last = self.last.entry((msg.from, msg.to)).or_default();
            let at = (now + latency).max(*last);
            *last = at;
            arrivals.push(at);
        }
        arrivals
    }
}
