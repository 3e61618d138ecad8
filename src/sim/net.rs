//! The simulated network: messages between nodes, each link in order (as a QUIC stream is),
//! with latency, loss, duplication and partitions chosen by the run's seed.

use std::collections::{BTreeMap, BTreeSet};

use std::net::SocketAddr;

use crate::error::Error;
use crate::types::ServerId;
use crate::wire::{Request, Response};

/// A node of the simulated cluster: the naming server, a topic server, or a client.
pub type NodeId = u64;

/// Naming member `m`'s node id is this plus `m` (members are numbered from 1).
pub const NAMING_BASE: NodeId = 900;

/// Client node ids start here (topic servers are `1..`).
pub const FIRST_CLIENT: NodeId = 1000;

/// The node id of topic server `id`.
pub fn server_node(id: ServerId) -> NodeId {
    id
}

/// The node id of naming member `member`.
pub fn naming_node(member: u64) -> NodeId {
    NAMING_BASE + member
}

/// Whether `node` is a naming member.
pub fn is_naming(node: NodeId) -> bool {
    node > NAMING_BASE && node < FIRST_CLIENT
}

/// The made-up address of naming member `member` (redirects name it).
pub fn member_addr(member: u64) -> SocketAddr {
    SocketAddr::from(([10, 9, 0, member as u8], 7400))
}

/// Which naming member a server or client asks: the leader a redirect named, else the
/// members in turn (as `client::NamingRoute` does).
#[derive(Debug, Clone)]
pub struct NamingTarget {
    pub member: u64,
    members: u64,
}

impl NamingTarget {
    pub fn new(members: u64) -> Self {
        Self { member: 1, members }
    }

    pub fn node(&self) -> NodeId {
        naming_node(self.member)
    }

    /// After a failed call: go where a redirect points, else to the next member.
    pub fn failed(&mut self, e: &Error) {
        match e {
            Error::NamingNotLeader { leader: Some(addr), .. } => {
                if let std::net::IpAddr::V4(ip) = addr.ip() {
                    self.member = u64::from(ip.octets()[3]);
                }
            }
            _ => self.member = self.member % self.members + 1,
        }
    }
}

/// What travels.
#[derive(Debug, Clone)]
pub enum Payload {
    Request {
        id: u64,
        req: Box<Request>,
    },
    Response {
        id: u64,
        resp: Box<Response>,
    },
    /// Raft messages between naming members (`sender_empty`: the sender's log is empty).
    Raft {
        msg: Box<raft::eraftpb::Message>,
        sender_empty: bool,
    },
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
