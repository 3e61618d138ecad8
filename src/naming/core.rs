//! Every decision of the naming server, without I/O: liveness, placement, elections and
//! replica replacement. The driver (`naming::NamingServer`) and the simulator (`crate::sim`)
//! feed it requests, heartbeats, promise answers and the time, make the [`BookChange`]s it
//! decides durable, apply them, and carry its promise requests.
//!
//! # Liveness
//! A server is alive while its lease (renewed by heartbeats, on the caller's monotonic clock)
//! runs. Leases are not durable: after a (re)start every known server is **unknown** for a
//! grace period long enough to reconnect ([`Settings::grace_ms`]), and an unknown server is
//! never taken for dead, so a restart of the naming server fails no healthy leader over.
//! Topic servers also ping every naming member, so a member that becomes leader starts
//! with what it heard as a follower ([`NamingCore::with_heard`]) and needs no grace for
//! those servers.
//!
//! # Elections
//! A replicated topic needs an election when its leader is dead; when its leader reports it
//! will not lead the book's epoch (it held that epoch before a restart, and may have lost
//! entries its followers hold); when any voter reports a promise newer than the book's epoch
//! (an election that did not finish: the old leader may be fenced); or when the book records
//! an election epoch newer than its epoch (the naming server stopped mid-election). An
//! election bumps the epoch durably, asks the voters to promise it, and picks the most
//! up-to-date of a majority ([`choose_leader`]). One that cannot gather a majority is retried
//! with a new epoch after [`Settings::retry_ms`] for as long as the topic needs one.
//!
//! # Replacement
//! A voter dead for longer than [`Settings::replace_after_ms`] is replaced one step at a
//! time, each in a new epoch under the same leader and only once the leader reported its
//! current epoch committed (so every committed entry is on a majority of the current voters):
//! a live spare joins as a **learner**; once the leader reports it holds everything, it
//! becomes a voter; then the lost voter is removed. Each step changes the voters by one
//! server, so every majority of the old voters and every majority of the new ones share a
//! replica: no committed entry is ever held by a minority of the voters that can elect. A
//! lost voter that returns before its replacement became a voter cancels the replacement.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use super::book::{AclChange, Book, BookChange, ServerRecord, TopicRecord};
use super::changes::ChangeLog;
use crate::acl::AclView;
use crate::error::Error;
use crate::replication::{choose_leader, majority};
use crate::types::{Epoch, Index, ServerId, TopicId, TopicName, MAX_TOPICS_PER_REQUEST};
use crate::wire::{
    Assignments, LeaderMove, ReplicaInfo, Reports, Response, ServerInfo, TopicChanges, TopicConfig,
    TopicInfo, TopicReport, MAX_RECORD_BYTES_LIMIT,
};

/// Most replicas a topic may ask for.
pub const MAX_REPLICAS: u32 = 16;

/// Topics one cluster holds. The whole book travels in single frames (a `topic list` answer,
/// a full heartbeat answer to a server that holds every topic, a Raft snapshot): 10,000 topics of up to ~1.2 KB each (a
/// 128-byte name and 16 replicas' addresses) and every schema together stay within a frame.
pub const MAX_TOPICS: usize = 10_000;

/// Most topics one create or delete names (see [`MAX_TOPICS_PER_REQUEST`]).
pub const MAX_TOPICS_PER_CHANGE: usize = MAX_TOPICS_PER_REQUEST;

/// Most topics one page of `topic list` carries.
pub const TOPIC_PAGE_LIMIT: usize = 1000;

/// About the most bytes one page of `topic list` carries (a page always has one topic, and
/// one topic is at most a 64 KiB schema and ~1.2 KB more): well within the 1 MiB a topic
/// server's budget charges a metadata answer.
pub const TOPIC_PAGE_BYTES: usize = 512 * 1024;

/// Longest schema of one topic, in bytes (JSON Schemas are small: 64 KiB is a large one).
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// All schemas of a cluster together, in bytes (see [`MAX_TOPICS`]).
pub const MAX_TOTAL_SCHEMA_BYTES: usize = 2 * 1024 * 1024;

/// Timing of the naming server's decisions, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// A server is alive this long after its last heartbeat.
    pub lease_ms: u64,
    /// A voter dead this long is replaced.
    pub replace_after_ms: u64,
    /// After a start, servers not heard from yet are unknown (not dead) this long.
    pub grace_ms: u64,
    /// An election waits this long for promises.
    pub promise_wait_ms: u64,
    /// Once a majority promised, it waits this much longer for the others (a more
    /// up-to-date replica truncates less), at most until `promise_wait_ms`.
    pub promise_settle_ms: u64,
    /// A failed election is tried again (with a new epoch) after this long.
    pub retry_ms: u64,
    /// A topic's preferred leader takes its leadership back once it has been up this long
    /// and holds every entry of the leader (see [`PREFERRED_RETURN_LEASES`]); `None`: only
    /// on `topic rebalance`.
    pub preferred_pause_ms: Option<u64>,
}

/// Leases a topic's preferred leader must stay alive and caught up before leadership moves
/// back to it: long enough that a server that restarts or flaps does not pull leaders back
/// and forth (each move is an election: a short pause for the topic's clients), short
/// enough that a restarted server carries its share again within seconds.
pub const PREFERRED_RETURN_LEASES: u64 = 5;

/// How long a topic server may take to reach a restarted naming server: its heartbeat
/// notices the silence within a third of a lease plus `server::NAMING_ANSWER_GRACE`, then it
/// dials with `transport::CONNECT_TIMEOUT` and backs off at most
/// `server::NAMING_BACKOFF_MAX` (with jitter) between dials.
pub const RECONNECT_BOUND_MS: u64 = 1_000 + 2_000 + 750;

impl Settings {
    /// The settings for a lease and a replacement delay; the rest follows from them.
    pub fn new(lease_ms: u64, replace_after_ms: u64) -> Self {
        Self {
            lease_ms,
            replace_after_ms,
            grace_ms: lease_ms + lease_ms / 3 + RECONNECT_BOUND_MS,
            promise_wait_ms: 1_000,
            promise_settle_ms: 50,
            retry_ms: (lease_ms / 2).max(100),
            preferred_pause_ms: Some(lease_ms * PREFERRED_RETURN_LEASES),
        }
    }
}

/// What a live server carries, for placement.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    replicas: usize,
    leaders: usize,
}

/// What the naming server thinks of a server now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    /// Not heard from since the naming server started, within the grace period.
    Unknown,
}

/// A promise request the driver sends for an election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromiseAsk {
    pub topic: TopicId,
    pub name: TopicName,
    pub epoch: Epoch,
    pub server: ServerId,
    pub addr: SocketAddr,
}

/// What the driver does for one decision: make `change` durable and apply it, then (only if
/// that worked) send `asks`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    pub change: Option<BookChange>,
    pub asks: Vec<PromiseAsk>,
    /// A line for the log.
    pub note: String,
    /// This step publishes an election's winner.
    pub elected: bool,
}

/// An election under way.
#[derive(Debug, Clone)]
struct Election {
    epoch: Epoch,
    started_ms: u64,
    asked: Vec<ServerId>,
    /// `None`: the server answered with an error.
    answers: BTreeMap<ServerId, Option<(Epoch, Index)>>,
    /// When a majority had answered.
    majority_at: Option<u64>,
}

/// The naming server's decisions, over the durable book and what it heard lately.
#[derive(Debug, Clone)]
pub struct NamingCore {
    book: Book,
    settings: Settings,
    started_ms: u64,
    /// When each server last heartbeated (ms on the caller's monotonic clock).
    heard: BTreeMap<ServerId, u64>,
    /// The newest book version each server applied.
    applied: BTreeMap<ServerId, u64>,
    /// Each replica's latest report on each topic.
    reports: BTreeMap<(TopicId, ServerId), TopicReport>,
    /// The servers that sent this core all their reports: later heartbeats carry only
    /// the changed ones; the others are asked for all.
    all_reports: BTreeSet<ServerId>,
    /// Reports that may call for an election (a refused epoch, or a promise newer than the
    /// book's epoch when it came): [`tick`](Self::tick) looks at their topics, and at those
    /// a cheap look finds something to do for, not at every topic every tick.
    notable: BTreeSet<(TopicId, ServerId)>,
    /// Each topic's name by id, for reports.
    names: HashMap<TopicId, String>,
    elections: BTreeMap<TopicId, Election>,
    /// Topics whose last election failed, and when to try again.
    retry_at: BTreeMap<TopicId, u64>,
    /// Since when each server has been up: since it registered (a restart) or came back
    /// after its lease ran out.
    up_since: BTreeMap<ServerId, u64>,
    /// When leadership of a topic last tried to return to its preferred leader.
    preferred_tried: BTreeMap<TopicId, u64>,
    /// Leaders elected since the start.
    pub elected: u64,
    /// What changed at which version since this core started, for heartbeat answers.
    changes: ChangeLog,
    /// Topics whose record alone may call for a step (see [`unsettled`]): with every
    /// server alive, [`tick`](Self::tick) looks at these, the notable ones and those with an
    /// election under way, not at all 10,000.
    unsettled: BTreeSet<TopicId>,
}

/// Whether `t`'s record alone may call for a step: an election not concluded, a leader other
/// than the preferred one, a replacement under way or due.
fn unsettled(t: &TopicRecord) -> bool {
    t.election_epoch > t.epoch
        || t.leader != t.preferred()
        || !t.learners.is_empty()
        || t.replacing.is_some()
        || t.voters.len() != t.factor as usize
}

impl NamingCore {
    pub fn new(book: Book, settings: Settings, now_ms: u64) -> Self {
        let names = book.topics.values().map(|t| (t.id, t.name.to_string())).collect();
        let unsettled = book.topics.values().filter(|t| unsettled(t)).map(|t| t.id).collect();
        Self {
            book,
            settings,
            started_ms: now_ms,
            heard: BTreeMap::new(),
            applied: BTreeMap::new(),
            reports: BTreeMap::new(),
            all_reports: BTreeSet::new(),
            notable: BTreeSet::new(),
            names,
            elections: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            up_since: BTreeMap::new(),
            preferred_tried: BTreeMap::new(),
            elected: 0,
            changes: ChangeLog::default(),
            unsettled,
        }
    }

    /// A core that starts knowing when each server was last heard from (by a naming
    /// member that becomes leader, from the liveness pings it took as a follower): those
    /// servers need no grace period, so a server that died with the old naming leader is
    /// taken for dead one lease after it went silent.
    pub fn with_heard(book: Book, settings: Settings, now_ms: u64, heard: &BTreeMap<ServerId, u64>) -> Self {
        let mut core = Self::new(book, settings, now_ms);
        core.heard = heard.clone();
        core
    }

    /// A topic server said it is alive (a ping, not a heartbeat: it carries no reports).
    pub fn alive(&mut self, now_ms: u64, server: ServerId) {
        if self.book.servers.contains_key(&server) {
            self.heard_now(now_ms, server);
        }
    }

    /// Renews `server`'s lease, noting when it came back if its lease had run out (or, for a
    /// core that started knowing it was alive, when this core first heard from it).
    fn heard_now(&mut self, now_ms: u64, server: ServerId) {
        if !self.is_alive(server, now_ms) {
            self.up_since.insert(server, now_ms);
        } else {
            self.up_since.entry(server).or_insert(now_ms);
        }
        let t = self.heard.entry(server).or_default();
        *t = (*t).max(now_ms);
    }

    pub fn book(&self) -> &Book {
        &self.book
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Applies a change that is durable now.
    pub fn apply(&mut self, change: &BookChange) {
        self.changes.record(&self.book, change);
        for name in &change.removed {
            if let Some(t) = self.book.topics.get(name) {
                self.preferred_tried.remove(&t.id);
                self.names.remove(&t.id);
                self.unsettled.remove(&t.id);
            }
        }
        for t in &change.topics {
            if let Some(old) = self.book.topics.get(t.name.as_str()).filter(|old| old.id != t.id) {
                self.names.remove(&old.id);
                self.unsettled.remove(&old.id);
            }
            self.names.insert(t.id, t.name.to_string());
            if unsettled(t) {
                self.unsettled.insert(t.id);
            } else {
                self.unsettled.remove(&t.id);
            }
        }
        self.book.apply(change);
        for server in &change.retired {
            self.heard.remove(server);
            self.up_since.remove(server);
            self.applied.remove(server);
            self.reports.retain(|(_, s), _| s != server);
            self.all_reports.remove(server);
            self.notable.retain(|(_, s)| s != server);
        }
    }

    pub fn liveness(&self, server: ServerId, now_ms: u64) -> Liveness {
        match self.heard.get(&server) {
            Some(t) if now_ms.saturating_sub(*t) < self.settings.lease_ms => Liveness::Alive,
            Some(_) => Liveness::Dead,
            None if now_ms.saturating_sub(self.started_ms) < self.settings.grace_ms => Liveness::Unknown,
            None => Liveness::Dead,
        }
    }

    fn is_alive(&self, server: ServerId, now_ms: u64) -> bool {
        self.liveness(server, now_ms) == Liveness::Alive
    }

    /// When a server was last heard from (the naming server's start if never, since then).
    fn last_seen(&self, server: ServerId) -> u64 {
        self.heard.get(&server).copied().unwrap_or(self.started_ms)
    }

    /// A topic server announces itself; returns the change if its address is new.
    pub fn register(&mut self, now_ms: u64, server: ServerId, addr: SocketAddr) -> Option<BookChange> {
        self.heard.insert(server, now_ms);
        self.up_since.insert(server, now_ms); // it (re)started
        let known = self.book.servers.get(&server).is_some_and(|s| s.addr == addr);
        (!known)
            .then(|| BookChange { servers: vec![ServerRecord { id: server, addr }], ..BookChange::default() })
    }

    /// A heartbeat: renews the lease and records the server's reports.
    pub fn heartbeat(
        &mut self,
        now_ms: u64,
        server: ServerId,
        applied_version: u64,
        reports: Reports,
    ) -> Result<(), Error> {
        if !self.book.servers.contains_key(&server) {
            return Err(Error::Unavailable {
                detail: format!("server {server} is not registered; register first"),
            });
        }
        self.heard_now(now_ms, server);
        let applied = self.applied.entry(server).or_default();
        *applied = (*applied).max(applied_version);
        if reports.all {
            self.all_reports.insert(server);
        }
        for r in reports.topics {
            let epoch = self.names.get(&r.topic).and_then(|n| self.book.topics.get(n)).map(|t| t.epoch);
            if r.refused.is_some() || epoch.is_some_and(|e| r.promised > e) {
                self.notable.insert((r.topic, server));
            } else {
                self.notable.remove(&(r.topic, server));
            }
            self.reports.insert((r.topic, server), r);
        }
        Ok(())
    }

    /// Whether every replica of `topic` applied book `version`.
    pub fn applied_by_all(&self, topic: &TopicRecord, version: u64) -> bool {
        topic.members().all(|r| self.applied.get(&r).copied().unwrap_or(0) >= version)
    }

    /// Whether enough replicas of a topic took on book `version` to commit: a majority of
    /// its voters, its leader among them. `waited` is for the error.
    pub fn placed(&self, name: &TopicName, version: u64, waited: std::time::Duration) -> Result<(), Error> {
        let Some(t) = self.book.topics.get(name.as_str()) else { return Ok(()) };
        let took = |r: &ServerId| self.applied.get(r).copied().unwrap_or(0) >= version;
        let hosting = t.voters.iter().filter(|r| took(r)).count();
        let leader_hosts = took(&t.leader);
        if leader_hosts && hosting >= majority(t.voters.len()) {
            return Ok(());
        }
        Err(Error::NotPlaced {
            topic: name.to_string(),
            hosting: hosting as u32,
            replicas: t.voters.len() as u32,
            leader_hosts,
            waited_ms: waited.as_millis() as u64,
        })
    }

    pub fn topic_info(&self, t: &TopicRecord) -> TopicInfo {
        let info = |ids: &[ServerId]| -> Vec<ReplicaInfo> {
            ids.iter()
                .filter_map(|id| {
                    self.book.servers.get(id).map(|s| ReplicaInfo { server: s.id, addr: s.addr })
                })
                .collect()
        };
        TopicInfo {
            id: t.id,
            name: t.name.clone(),
            config: t.config.clone(),
            replicas: info(&t.voters),
            learners: info(&t.learners),
            leader: t.leader,
            epoch: t.epoch,
            created_ms: t.created_ms,
        }
    }

    pub fn lookup(&self, name: &TopicName) -> Result<TopicInfo, Error> {
        match self.book.topics.get(name.as_str()) {
            Some(t) => Ok(self.topic_info(t)),
            None => Err(Error::UnknownTopic { topic: name.to_string() }),
        }
    }

    pub fn list_topics(&self) -> Vec<TopicInfo> {
        self.book.topics.values().map(|t| self.topic_info(t)).collect()
    }

    /// Topics after `after` in name order: up to `limit` of them and about `max_bytes` as
    /// encoded (at least one), and the name to ask from next if there are more.
    pub fn list_topics_page(
        &self,
        after: Option<&TopicName>,
        limit: usize,
        max_bytes: usize,
    ) -> (Vec<TopicInfo>, Option<TopicName>) {
        use std::ops::Bound::{Excluded, Unbounded};
        let start = after.map_or(Unbounded, |a| Excluded(a.as_str().to_string()));
        let mut page = Vec::new();
        let mut bytes = 0;
        for t in self.book.topics.range((start, Unbounded)).map(|(_, t)| t) {
            let info = self.topic_info(t);
            let size = postcard::experimental::serialized_size(&info).unwrap_or(usize::MAX);
            if !page.is_empty() && (page.len() >= limit.max(1) || bytes + size > max_bytes) {
                let next = page.last().map(|i: &TopicInfo| i.name.clone());
                return (page, next);
            }
            bytes += size;
            page.push(info);
        }
        (page, None)
    }

    pub fn list_servers(&self, now_ms: u64) -> Vec<ServerInfo> {
        self.book
            .servers
            .values()
            .map(|s| ServerInfo {
                id: s.id,
                addr: s.addr,
                alive: self.is_alive(s.id, now_ms),
                topics: self.book.topics.values().filter(|t| t.members().any(|r| r == s.id)).count() as u32,
                leaders: self.book.topics.values().filter(|t| t.leader == s.id).count() as u32,
                preferred: self.book.topics.values().filter(|t| t.preferred() == s.id).count() as u32,
            })
            .collect()
    }

    /// Retires a server gone for good (`herald servers remove`): only one that is dead, not
    /// merely unknown after a restart, and that no topic holds any more (its replicas move to
    /// live servers after `replace_after_ms`), so no replica set ever names a server the
    /// book forgot.
    pub fn retire_server(&self, now_ms: u64, server: ServerId) -> Result<BookChange, Error> {
        if !self.book.servers.contains_key(&server) {
            return Err(Error::invalid(format!(
                "no server {server} in the book (`herald servers` lists them)"
            )));
        }
        if self.liveness(server, now_ms) != Liveness::Dead {
            return Err(Error::invalid(format!(
                "server {server} is alive, or not known dead yet: stop it for good first, then try again once `herald servers` shows it dead"
            )));
        }
        let holding: Vec<&str> = self
            .book
            .topics
            .values()
            .filter(|t| t.members().any(|r| r == server))
            .map(|t| t.name.as_str())
            .collect();
        if let Some(first) = holding.first() {
            return Err(Error::invalid(format!(
                "server {server} still holds replicas of {} topic(s) ({first}{}): they move to live servers {} s after it died; try again once `herald servers` shows it holds none",
                holding.len(),
                if holding.len() > 1 { ", ..." } else { "" },
                self.settings.replace_after_ms / 1000
            )));
        }
        Ok(BookChange { retired: vec![server], ..BookChange::default() })
    }

    /// Gives and takes back grants (revokes first). Refuses a change that would pass
    /// [`crate::acl::MAX_GRANTS`] and one that changes nothing.
    pub fn change_acl(&self, change: AclChange) -> Result<BookChange, Error> {
        let mut acl = self.book.acl.clone();
        let mut changed = false;
        for g in &change.revoke {
            changed |= acl.revoke(g);
        }
        for g in &change.grant {
            changed |= acl.grant(g.clone())?;
        }
        if !changed {
            return Err(Error::invalid(if change.grant.is_empty() {
                "no such grant to revoke (`herald acl list` shows the grants)"
            } else {
                "every one of those grants is already given"
            }));
        }
        Ok(BookChange { acl: Some(change), ..BookChange::default() })
    }

    /// The answer to a heartbeat of `server`, which knows book version `known`: nothing new
    /// when the book is at that version, else its assignments ([`Self::assignments_since`])
    /// and, when they changed since (or with a full list, or to a server that knows
    /// nothing yet), the grants with `superusers`.
    pub fn heartbeat_answer(&self, server: ServerId, known: u64, superusers: &BTreeSet<String>) -> Response {
        let version = self.book.version;
        let send_all_reports = !self.all_reports.contains(&server);
        if version == known {
            return Response::Heartbeat { version, assignments: None, acl: None, send_all_reports };
        }
        let assignments = self.assignments_since(server, known);
        let first = known == 0 || matches!(assignments, Assignments::All(_));
        let acl = (first || self.changes.acl_changed_since(&self.book, known))
            .then(|| AclView { acl: self.book.acl.clone(), superusers: superusers.clone() });
        Response::Heartbeat { version, assignments: Some(assignments), acl, send_all_reports }
    }

    /// What a heartbeat answer tells `server`, which knows book version `known`: what
    /// changed since then when this core saw every change since, else all its topics.
    pub fn assignments_since(&self, server: ServerId, known: u64) -> Assignments {
        match self.changes.since(&self.book, server, known) {
            Some(delta) => Assignments::Since {
                known,
                changed: delta.changed.iter().map(|name| self.topic_info(&self.book.topics[name])).collect(),
                dropped: delta.dropped,
            },
            None => Assignments::All(self.assignments_for(server)),
        }
    }

    pub fn assignments_for(&self, server: ServerId) -> Vec<TopicInfo> {
        self.book
            .topics
            .values()
            .filter(|t| t.members().any(|r| r == server))
            .map(|t| self.topic_info(t))
            .collect()
    }

    /// How many replicas each live server holds and how many topics it leads.
    fn loads(&self, now_ms: u64) -> BTreeMap<ServerId, Load> {
        let mut loads: BTreeMap<ServerId, Load> = self
            .book
            .servers
            .keys()
            .filter(|id| self.is_alive(**id, now_ms))
            .map(|id| (*id, Load::default()))
            .collect();
        for t in self.book.topics.values() {
            for r in t.members() {
                if let Some(l) = loads.get_mut(&r) {
                    l.replicas += 1;
                }
            }
            if let Some(l) = loads.get_mut(&t.leader) {
                l.leaders += 1;
            }
        }
        loads
    }

    /// Live servers by how many replicas they hold, least loaded first (ties by id).
    fn by_load(&self, now_ms: u64) -> Vec<ServerId> {
        let mut candidates: Vec<(usize, ServerId)> =
            self.loads(now_ms).into_iter().map(|(id, l)| (l.replicas, id)).collect();
        candidates.sort();
        candidates.into_iter().map(|(_, id)| id).collect()
    }

    /// How many topics each server leads.
    fn leaders(&self) -> BTreeMap<ServerId, usize> {
        let mut leads = BTreeMap::new();
        for t in self.book.topics.values() {
            *leads.entry(t.leader).or_default() += 1;
        }
        leads
    }

    /// Among equally up-to-date voters, the order an election prefers: the topic's preferred
    /// leader, then the voters leading fewest topics (`leads`, counting elections decided
    /// in the same tick), so a failover spreads a dead server's topics over the others
    /// instead of piling them on one.
    fn leader_order(t: &TopicRecord, leads: &BTreeMap<ServerId, usize>) -> Vec<ServerId> {
        let mut rest: Vec<ServerId> = t.voters.iter().copied().filter(|v| *v != t.preferred()).collect();
        rest.sort_by_key(|v| (leads.get(v).copied().unwrap_or(0), *v));
        std::iter::once(t.preferred()).chain(rest).collect()
    }

    /// Places a new topic (see [`create_topics`](Self::create_topics)).
    pub fn create_topic(
        &self,
        now_ms: u64,
        wall_ms: u64,
        name: TopicName,
        replicas: u32,
        config: TopicConfig,
    ) -> Result<BookChange, Error> {
        self.create_topics(now_ms, wall_ms, vec![name], replicas, config)
    }

    /// Places new topics, all or none, in one change: each on the live servers holding
    /// fewest replicas, led (in epoch 1, and preferably ever after) by the one of those
    /// leading fewest topics, counting the ones placed before it in the same batch. So
    /// replicas and leaders spread evenly whatever order topics come in.
    pub fn create_topics(
        &self,
        now_ms: u64,
        wall_ms: u64,
        names: Vec<TopicName>,
        replicas: u32,
        config: TopicConfig,
    ) -> Result<BookChange, Error> {
        if replicas == 0 || replicas > MAX_REPLICAS {
            return Err(Error::invalid(format!(
                "--replicas must be between 1 and {MAX_REPLICAS}, got {replicas}"
            )));
        }
        if names.is_empty() {
            return Err(Error::invalid("name at least one topic to create"));
        }
        if names.len() > MAX_TOPICS_PER_CHANGE {
            return Err(Error::invalid(format!(
                "{} topics in one request; at most {MAX_TOPICS_PER_CHANGE}: send several",
                names.len()
            )));
        }
        check_config(&config)?;
        let mut seen = BTreeSet::new();
        for name in &names {
            if self.book.topics.contains_key(name.as_str()) {
                return Err(Error::TopicExists { topic: name.to_string() });
            }
            if !seen.insert(name.as_str()) {
                return Err(Error::invalid(format!("topic {name} is named twice")));
            }
        }
        if self.book.topics.len() + names.len() > MAX_TOPICS {
            return Err(Error::LimitReached {
                what: format!(
                    "the cluster has {} topics and {} more were asked for",
                    self.book.topics.len(),
                    names.len()
                ),
                limit: MAX_TOPICS as u64,
                hint: "delete unused ones with `herald topic delete`".into(),
            });
        }
        let schema_bytes = config.schema.as_ref().map_or(0, |s| s.len() * names.len());
        self.check_schema_room(schema_bytes, None)?;
        let mut loads = self.loads(now_ms);
        if loads.len() < replicas as usize {
            return Err(Error::NotEnoughServers { requested: replicas, live: loads.len() as u32 });
        }
        let mut topics = Vec::with_capacity(names.len());
        for (i, name) in names.into_iter().enumerate() {
            let mut by_replicas: Vec<(usize, ServerId)> =
                loads.iter().map(|(id, l)| (l.replicas, *id)).collect();
            by_replicas.sort();
            let mut voters: Vec<ServerId> =
                by_replicas.into_iter().take(replicas as usize).map(|(_, id)| id).collect();
            let leader =
                *voters.iter().min_by_key(|v| (loads[v].leaders, **v)).expect("at least one replica");
            voters.retain(|v| *v != leader);
            voters.insert(0, leader);
            for v in &voters {
                loads.get_mut(v).expect("a live server").replicas += 1;
            }
            loads.get_mut(&leader).expect("a live server").leaders += 1;
            topics.push(TopicRecord {
                id: self.book.next_topic_id + i as u64,
                name,
                config: config.clone(),
                factor: replicas,
                leader,
                voters,
                learners: Vec::new(),
                epoch: 1,
                election_epoch: 1,
                created_ms: wall_ms,
                replacing: None,
            });
        }
        Ok(BookChange {
            next_topic_id: Some(self.book.next_topic_id + topics.len() as u64),
            topics,
            ..BookChange::default()
        })
    }

    /// Checks that `added` bytes of schemas (replacing `replaced`'s, if given) keep the
    /// cluster's schemas within [`MAX_TOTAL_SCHEMA_BYTES`].
    fn check_schema_room(&self, added: usize, replaced: Option<&TopicName>) -> Result<(), Error> {
        if added == 0 {
            return Ok(());
        }
        let others: usize = self
            .book
            .topics
            .values()
            .filter(|t| Some(&t.name) != replaced)
            .filter_map(|t| t.config.schema.as_ref().map(String::len))
            .sum();
        if others + added > MAX_TOTAL_SCHEMA_BYTES {
            return Err(Error::LimitReached {
                what: format!("the cluster's schemas would take {} bytes", others + added),
                limit: MAX_TOTAL_SCHEMA_BYTES as u64,
                hint: "remove schemas of unused topics".into(),
            });
        }
        Ok(())
    }

    /// Changes a topic's policies.
    pub fn alter_topic(&self, name: &TopicName, changes: TopicChanges) -> Result<BookChange, Error> {
        if let Some(Some(schema)) = &changes.schema {
            check_schema(schema)?;
        }
        if changes.backlog_limit == Some(Some(0)) {
            return Err(Error::invalid("--backlog-limit must be at least 1 byte"));
        }
        let Some(mut record) = self.book.topics.get(name.as_str()).cloned() else {
            return Err(Error::UnknownTopic { topic: name.to_string() });
        };
        if let Some(Some(schema)) = &changes.schema {
            self.check_schema_room(schema.len(), Some(name))?;
        }
        if let Some(schema) = changes.schema {
            record.config.schema = schema;
        }
        if let Some(limit) = changes.backlog_limit {
            record.config.backlog_limit = limit;
        }
        if let Some(policy) = changes.backlog_policy {
            record.config.backlog_policy = policy;
        }
        Ok(BookChange::topic(record))
    }

    pub fn delete_topic(&self, name: &TopicName) -> Result<BookChange, Error> {
        self.delete_topics(std::slice::from_ref(name))
    }

    /// Deletes topics, all or none, in one change.
    pub fn delete_topics(&self, names: &[TopicName]) -> Result<BookChange, Error> {
        if names.is_empty() {
            return Err(Error::invalid("name at least one topic to delete"));
        }
        if names.len() > MAX_TOPICS_PER_CHANGE {
            return Err(Error::invalid(format!(
                "{} topics in one request; at most {MAX_TOPICS_PER_CHANGE}: send several",
                names.len()
            )));
        }
        let mut removed = BTreeSet::new();
        for name in names {
            if !self.book.topics.contains_key(name.as_str()) {
                return Err(Error::UnknownTopic { topic: name.to_string() });
            }
            removed.insert(name.to_string());
        }
        Ok(BookChange { removed: removed.into_iter().collect(), ..BookChange::default() })
    }

    /// The latest report of `server` on `topic`.
    fn report(&self, topic: TopicId, server: ServerId) -> Option<&TopicReport> {
        self.reports.get(&(topic, server))
    }

    /// Why `t` needs an election now, if it does.
    fn election_reason(&self, t: &TopicRecord, now_ms: u64) -> Option<String> {
        if t.voters.len() < 2 {
            return None; // a single voter is its own majority and resumes its epoch
        }
        if self.liveness(t.leader, now_ms) == Liveness::Dead {
            return Some(format!("leader {} is dead", t.leader));
        }
        if let Some(r) = self.report(t.id, t.leader) {
            if r.refused == Some(t.epoch) {
                return Some(format!("leader {} will not lead epoch {} again", t.leader, t.epoch));
            }
        }
        for v in &t.voters {
            if let Some(r) = self.report(t.id, *v).filter(|r| r.promised > t.epoch) {
                return Some(format!(
                    "server {v} promised epoch {} after the book's {}",
                    r.promised, t.epoch
                ));
            }
        }
        if t.election_epoch > t.epoch {
            return Some(format!("the election of epoch {} did not finish", t.election_epoch));
        }
        None
    }

    /// Everything due now: elections to start, finish or give up, and replacement steps.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Step> {
        // A cheap look at every topic first: most have nothing to do.
        let down: BTreeSet<ServerId> =
            self.book.servers.keys().copied().filter(|s| !self.is_alive(*s, now_ms)).collect();
        let notable: BTreeSet<TopicId> = self.notable.iter().map(|(t, _)| *t).collect();
        let may_act = |t: &&TopicRecord| self.may_act(t, now_ms, &down, &notable);
        let names: Vec<String> = if down.is_empty() {
            // Only a record, a report or an election can call for a step: look at those.
            let ids: BTreeSet<TopicId> =
                self.unsettled.iter().chain(&notable).chain(self.elections.keys()).copied().collect();
            let mut names: Vec<String> = ids
                .iter()
                .filter_map(|id| self.book.topics.get(self.names.get(id)?.as_str()))
                .filter(may_act)
                .map(|t| t.name.to_string())
                .collect();
            names.sort_unstable(); // the order the full look takes
            debug_assert_eq!(
                names,
                self.book.topics.values().filter(may_act).map(|t| t.name.to_string()).collect::<Vec<_>>(),
                "the narrow look missed a topic the full look acts on"
            );
            names
        } else {
            self.book.topics.values().filter(may_act).map(|t| t.name.to_string()).collect()
        };
        if names.is_empty() {
            return Vec::new();
        }
        let mut steps = Vec::new();
        let mut leads = self.leaders();
        for name in names {
            let t = self.book.topics[&name].clone();
            if let Some(e) = self.elections.get(&t.id).cloned() {
                if let Some(step) = self.conclude(&t, &e, now_ms, &mut leads) {
                    steps.push(step);
                }
                continue;
            }
            if self.retry_at.get(&t.id).is_some_and(|at| *at > now_ms) {
                continue;
            }
            if let Some(reason) = self.election_reason(&t, now_ms) {
                if let Some(step) = self.start_election(&t, reason, now_ms) {
                    steps.push(step);
                }
                continue;
            }
            if let Some(step) = self.replacement_step(&t, now_ms) {
                steps.push(step);
                continue;
            }
            if let Some(step) = self.preferred_return(&t, now_ms, false) {
                steps.push(step);
            }
        }
        steps
    }

    /// Whether [`tick`](Self::tick) may have something to do for `t`: an election under
    /// way or due (a dead or unknown voter, a notable report, an unfinished election), a
    /// replacement under way or due, or a leader other than the preferred one. Never false
    /// when the full look would act; allocation-free, as it runs for every topic every tick.
    fn may_act(
        &self,
        t: &TopicRecord,
        now_ms: u64,
        down: &BTreeSet<ServerId>,
        notable: &BTreeSet<TopicId>,
    ) -> bool {
        if !self.elections.is_empty() && self.elections.contains_key(&t.id) {
            return true;
        }
        if !self.retry_at.is_empty() && self.retry_at.get(&t.id).is_some_and(|at| *at > now_ms) {
            return false;
        }
        unsettled(t)
            || (!down.is_empty() && t.members().any(|m| down.contains(&m)))
            || (!notable.is_empty() && notable.contains(&t.id))
    }

    /// Whether leadership of `t` may move to its preferred leader now: it does not lead,
    /// it is alive, and the leader (alive, leading the book's epoch, committed, not giving
    /// it up) reported that it holds every entry. Not during a replacement, which changes
    /// the voters. `Err` says why not, for `topic rebalance`.
    pub fn preferred_ready(&self, t: &TopicRecord, now_ms: u64) -> Result<(), String> {
        let preferred = t.preferred();
        if t.leader == preferred {
            return Err(format!("{preferred} leads already"));
        }
        if !t.learners.is_empty() || t.replacing.is_some() || t.voters.len() != t.factor as usize {
            return Err("a replica is being replaced".into());
        }
        if !self.is_alive(preferred, now_ms) {
            return Err(format!("preferred leader {preferred} is not alive"));
        }
        if !self.is_alive(t.leader, now_ms) || self.elections.contains_key(&t.id) {
            return Err("an election is under way".into());
        }
        let report = self.report(t.id, t.leader).ok_or("the leader has not reported yet")?;
        if report.leading != Some(t.epoch) || !report.ready || report.refused.is_some() {
            return Err(format!("leader {} has not committed epoch {} yet", t.leader, t.epoch));
        }
        if !report.holders.contains(&preferred) {
            return Err(format!("preferred leader {preferred} has not caught up"));
        }
        Ok(())
    }

    /// Starts an election that hands `t` back to its preferred leader once that server has
    /// been up for [`Settings::preferred_pause_ms`] and the leader last reported it caught
    /// up (at once when `now`, for `topic rebalance`). The election is an ordinary one: the
    /// preferred leader wins only if it is as up to date as any voter that answers; if the
    /// leader wrote more meanwhile, it leads again in the new epoch, and the next try waits
    /// the pause again.
    fn preferred_return(&mut self, t: &TopicRecord, now_ms: u64, now: bool) -> Option<Step> {
        if self.preferred_ready(t, now_ms).is_err() {
            return None;
        }
        if !now {
            let pause = self.settings.preferred_pause_ms?;
            let settled = self.up_since.get(&t.preferred()).is_some_and(|since| now_ms >= since + pause);
            let tried_lately = self.preferred_tried.get(&t.id).is_some_and(|at| now_ms < at + pause);
            if !settled || tried_lately {
                return None;
            }
        }
        self.preferred_tried.insert(t.id, now_ms);
        let reason = format!("preferred leader {} is back and caught up", t.preferred());
        self.start_election(t, reason, now_ms)
    }

    /// `topic rebalance`: hands every topic whose preferred leader is ready back to it now.
    /// Returns the elections to run and, for every topic not led by its preferred leader,
    /// the move (`moving`) or why not.
    pub fn rebalance(&mut self, now_ms: u64) -> (Vec<Step>, Vec<LeaderMove>) {
        let mut steps = Vec::new();
        let mut moves = Vec::new();
        let names: Vec<String> = self.book.topics.keys().cloned().collect();
        for name in names {
            let t = self.book.topics[&name].clone();
            if t.leader == t.preferred() {
                continue;
            }
            let skipped = self.preferred_ready(&t, now_ms).err();
            let step = match skipped {
                None => self.preferred_return(&t, now_ms, true),
                Some(_) => None,
            };
            let skipped = match (&step, skipped) {
                (_, Some(why)) => Some(why),
                (None, None) => Some("no majority of its voters is reachable".into()),
                (Some(_), None) => None,
            };
            steps.extend(step);
            moves.push(LeaderMove {
                topic: t.name.clone(),
                from: t.leader,
                to: t.preferred(),
                skipped,
                moved: false,
            });
        }
        (steps, moves)
    }

    fn start_election(&mut self, t: &TopicRecord, reason: String, now_ms: u64) -> Option<Step> {
        let reachable: Vec<ServerId> =
            t.voters.iter().copied().filter(|v| self.liveness(*v, now_ms) != Liveness::Dead).collect();
        if reachable.len() < majority(t.voters.len()) {
            return None; // no majority could answer: each attempt would only burn an epoch
        }
        let promised =
            t.voters.iter().filter_map(|v| self.report(t.id, *v)).map(|r| r.promised).max().unwrap_or(0);
        let epoch = t.next_epoch().max(promised + 1);
        let asks: Vec<PromiseAsk> = reachable
            .iter()
            .filter_map(|v| self.book.servers.get(v))
            .map(|s| PromiseAsk { topic: t.id, name: t.name.clone(), epoch, server: s.id, addr: s.addr })
            .collect();
        self.elections.insert(
            t.id,
            Election {
                epoch,
                started_ms: now_ms,
                asked: asks.iter().map(|a| a.server).collect(),
                answers: BTreeMap::new(),
                majority_at: None,
            },
        );
        let record = TopicRecord { election_epoch: epoch, ..t.clone() };
        let note = format!("electing {} in epoch {epoch}: {reason}", t.name);
        Some(Step { change: Some(BookChange::topic(record)), asks, note, elected: false })
    }

    /// A voter's answer to a promise request (`None`: it failed or timed out).
    pub fn on_promise(
        &mut self,
        now_ms: u64,
        topic: TopicId,
        epoch: Epoch,
        server: ServerId,
        answer: Option<(Epoch, Index)>,
    ) {
        let voters = match self.book.topics.values().find(|t| t.id == topic) {
            Some(t) => t.voters.clone(),
            None => return,
        };
        let Some(e) = self.elections.get_mut(&topic).filter(|e| e.epoch == epoch) else { return };
        e.answers.insert(server, answer);
        let promised = e.answers.iter().filter(|(s, a)| a.is_some() && voters.contains(s)).count();
        if e.majority_at.is_none() && promised >= majority(voters.len()) {
            e.majority_at = Some(now_ms);
        }
    }

    /// Finishes an election that has its answers, or gives up one that cannot.
    fn conclude(
        &mut self,
        t: &TopicRecord,
        e: &Election,
        now_ms: u64,
        leads: &mut BTreeMap<ServerId, usize>,
    ) -> Option<Step> {
        let all_answered = e.asked.iter().all(|s| e.answers.contains_key(s));
        let settled = e.majority_at.is_some_and(|at| now_ms >= at + self.settings.promise_settle_ms);
        let timed_out = now_ms >= e.started_ms + self.settings.promise_wait_ms;
        if !(all_answered || settled || timed_out) {
            return None;
        }
        self.elections.remove(&t.id);
        if t.election_epoch != e.epoch {
            return None; // the topic was deleted and made again, or changed meanwhile
        }
        let reports: Vec<(ServerId, Epoch, Index)> =
            e.answers.iter().filter_map(|(s, a)| a.map(|(last, end)| (*s, last, end))).collect();
        // A leader that hands its epoch on (it cannot write) is chosen again only if no
        // replica as up to date answered.
        let handing_on =
            self.report(t.id, t.leader).is_some_and(|r| r.refused.is_some() && !r.holders.is_empty());
        let order = Self::leader_order(t, leads);
        match choose_leader(&t.voters, &reports, &order, handing_on.then_some(t.leader)) {
            Some(winner) => {
                *leads.entry(winner).or_default() += 1;
                if let Some(n) = leads.get_mut(&t.leader) {
                    *n = n.saturating_sub(1);
                }
                self.retry_at.remove(&t.id);
                self.elected += 1;
                let record = TopicRecord { leader: winner, epoch: e.epoch, ..t.clone() };
                let preferred = if winner == t.preferred() { ", its preferred leader," } else { "" };
                let note = format!(
                    "elected {winner}{preferred} to lead {} in epoch {} from {reports:?}",
                    t.name, e.epoch
                );
                Some(Step { change: Some(BookChange::topic(record)), asks: Vec::new(), note, elected: true })
            }
            None => {
                self.retry_at.insert(t.id, now_ms + self.settings.retry_ms);
                let note = format!(
                    "no majority of {}'s {} voters promised epoch {} ({} did); trying again in {} ms",
                    t.name,
                    t.voters.len(),
                    e.epoch,
                    reports.len(),
                    self.settings.retry_ms
                );
                Some(Step { change: None, asks: Vec::new(), note, elected: false })
            }
        }
    }

    /// The next step of replacing a lost voter of `t`, if one is due and safe.
    fn replacement_step(&self, t: &TopicRecord, now_ms: u64) -> Option<Step> {
        if t.voters.len() < 2 && t.learners.is_empty() {
            return None;
        }
        // Only when the leader leads the book's epoch and reported it committed: then every
        // committed entry is on a majority of the current voters.
        if !self.is_alive(t.leader, now_ms) {
            return None;
        }
        let report = self.report(t.id, t.leader)?;
        if report.leading != Some(t.epoch) || !report.ready {
            return None;
        }
        let next = TopicRecord { epoch: t.next_epoch(), election_epoch: t.next_epoch(), ..t.clone() };
        let step = |record: TopicRecord, note: String| {
            Some(Step { change: Some(BookChange::topic(record)), asks: Vec::new(), note, elected: false })
        };
        if t.voters.len() > t.factor as usize {
            // One voter too many: the last step of a replacement. The lost voter leaves, or,
            // if it came back and leads again, a dead voter, else the newest one.
            let leaving = t
                .replacing
                .filter(|l| t.voters.contains(l) && *l != t.leader)
                .or_else(|| {
                    t.voters
                        .iter()
                        .copied()
                        .find(|v| *v != t.leader && self.liveness(*v, now_ms) == Liveness::Dead)
                })
                .or_else(|| t.voters.iter().rev().copied().find(|v| *v != t.leader))?;
            let voters = t.voters.iter().copied().filter(|v| *v != leaving).collect();
            return step(
                TopicRecord { voters, replacing: None, ..next },
                format!("{}: voter {leaving} leaves (epoch {})", t.name, t.next_epoch()),
            );
        }
        if let Some(lost) = t.replacing {
            if !t.learners.is_empty() {
                if self.is_alive(lost, now_ms) {
                    return step(
                        TopicRecord { learners: Vec::new(), replacing: None, ..next },
                        format!("{}: voter {lost} is back; replacement called off", t.name),
                    );
                }
                if t.learners.iter().all(|l| report.holders.contains(l)) {
                    let mut voters = t.voters.clone();
                    voters.extend(&t.learners);
                    return step(
                        TopicRecord { voters, learners: Vec::new(), ..next },
                        format!(
                            "{}: learner {:?} caught up and votes now (epoch {})",
                            t.name,
                            t.learners,
                            t.next_epoch()
                        ),
                    );
                }
                return None;
            }
            return step(
                TopicRecord { replacing: None, ..t.clone() },
                format!("{}: replacement of {lost} done", t.name),
            );
        }
        let lost = t.voters.iter().copied().find(|v| {
            self.liveness(*v, now_ms) == Liveness::Dead
                && now_ms.saturating_sub(self.last_seen(*v)) > self.settings.replace_after_ms
        })?;
        let members: BTreeSet<ServerId> = t.members().collect();
        let spare = self.by_load(now_ms).into_iter().find(|s| !members.contains(s))?;
        step(
            TopicRecord { learners: vec![spare], replacing: Some(lost), ..next },
            format!("{}: voter {lost} lost; {spare} joins as a learner (epoch {})", t.name, t.next_epoch()),
        )
    }
}

/// Checks a schema's size, then that it compiles.
fn check_schema(schema: &str) -> Result<(), Error> {
    if schema.len() > MAX_SCHEMA_BYTES {
        return Err(Error::LimitReached {
            what: format!("the schema is {} bytes", schema.len()),
            limit: MAX_SCHEMA_BYTES as u64,
            hint: "split it, or move shared parts out of it".into(),
        });
    }
    crate::policy::compile_schema(schema).map(|_| ())
}

/// Checks a topic's policies as `topic create` gives them.
fn check_config(config: &TopicConfig) -> Result<(), Error> {
    if let Some(schema) = &config.schema {
        check_schema(schema)?;
    }
    if config.backlog_limit == Some(0) {
        return Err(Error::invalid("--backlog-limit must be at least 1 byte"));
    }
    if config.max_record_bytes == 0 || config.max_record_bytes > MAX_RECORD_BYTES_LIMIT {
        return Err(Error::invalid(format!(
            "--max-record-bytes must be 1..={MAX_RECORD_BYTES_LIMIT}, got {}",
            config.max_record_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: u64 = 1000;

    fn addr(id: ServerId) -> SocketAddr {
        format!("127.0.0.1:{}", 7400 + id).parse().unwrap()
    }

    /// A core with `n` registered servers, all heartbeating at `now`.
    fn core(n: u64, now: u64) -> NamingCore {
        let mut c = NamingCore::new(Book::default(), Settings::new(LEASE, 3000), now);
        for id in 1..=n {
            let change = c.register(now, id, addr(id)).unwrap();
            c.apply(&change);
        }
        c
    }

    fn beat(c: &mut NamingCore, now: u64, servers: &[ServerId]) {
        for s in servers {
            c.heartbeat(now, *s, 0, Reports::default()).unwrap();
        }
    }

    fn report(c: &mut NamingCore, now: u64, server: ServerId, r: TopicReport) {
        c.heartbeat(now, server, 0, Reports { topics: vec![r], all: false }).unwrap();
    }

    fn leading(topic: TopicId, epoch: Epoch, holders: &[ServerId]) -> TopicReport {
        TopicReport {
            topic,
            promised: epoch,
            leading: Some(epoch),
            refused: None,
            ready: true,
            holders: holders.to_vec(),
        }
    }

    fn create(c: &mut NamingCore, now: u64) -> TopicRecord {
        let name = TopicName::new("t").unwrap();
        let change = c.create_topic(now, 0, name.clone(), 3, TopicConfig::default()).unwrap();
        c.apply(&change);
        c.book().topics["t"].clone()
    }

    /// Only a dead server that no topic holds may be retired; then the book forgets it.
    #[test]
    fn only_a_dead_server_holding_nothing_is_retired() {
        let mut c = core(4, 0);
        let t = create(&mut c, 0);
        let spare = (1..=4).find(|s| !t.voters.contains(s)).unwrap();
        let voter = t.voters[0];
        assert!(c.retire_server(0, 9).is_err(), "unknown");
        let alive = c.retire_server(0, spare).unwrap_err();
        assert!(alive.to_string().contains("alive"), "{alive}");
        // Both go silent past their leases.
        let later = LEASE * 2;
        let others: Vec<ServerId> = (1..=4).filter(|s| *s != spare && *s != voter).collect();
        beat(&mut c, later, &others);
        let holds = c.retire_server(later, voter).unwrap_err();
        assert!(holds.to_string().contains("still holds replicas of 1 topic(s) (t)"), "{holds}");
        let change = c.retire_server(later, spare).unwrap();
        c.apply(&change);
        assert!(!c.book().servers.contains_key(&spare));
        assert!(c.list_servers(later).iter().all(|s| s.id != spare));
    }

    /// A core asks each server for all its reports until it had them; a heartbeat with only
    /// the changed ones keeps the others' last word.
    #[test]
    fn a_core_asks_for_all_reports_once_and_keeps_them() {
        let mut c = core(3, 0);
        let t = create(&mut c, 0);
        let send_all = |c: &NamingCore| match c.heartbeat_answer(1, c.book().version, &BTreeSet::new()) {
            Response::Heartbeat { send_all_reports, .. } => send_all_reports,
            other => panic!("{other:?}"),
        };
        assert!(send_all(&c), "a new core has none of server 1's reports");
        c.heartbeat(10, 1, 0, Reports { topics: vec![leading(t.id, t.epoch, &[1, 2, 3])], all: false })
            .unwrap();
        assert!(send_all(&c), "some reports are not all of them");
        c.heartbeat(20, 1, 0, Reports { topics: vec![leading(t.id, t.epoch, &[1, 2, 3])], all: true })
            .unwrap();
        assert!(!send_all(&c));
        c.heartbeat(30, 1, 0, Reports::default()).unwrap();
        assert_eq!(c.report(t.id, 1).map(|r| r.holders.clone()), Some(vec![1, 2, 3]), "kept while unchanged");
    }

    /// A server that knows nothing yet gets the grants with its first answer; later ones
    /// carry them only when they changed.
    #[test]
    fn heartbeat_answers_carry_the_grants_first_and_when_they_change() {
        use crate::acl::{Grant, Grantee, Operation};
        let mut c = core(3, 0);
        let supers: BTreeSet<String> = ["admin".to_string()].into();
        let acl_of = |r: Response| match r {
            Response::Heartbeat { acl, .. } => acl,
            other => panic!("{other:?}"),
        };
        let first = acl_of(c.heartbeat_answer(1, 0, &supers)).expect("the first answer has the grants");
        assert_eq!(first.superusers, supers);
        let known = c.book().version;
        create(&mut c, 0);
        assert_eq!(acl_of(c.heartbeat_answer(1, known, &supers)), None, "unchanged grants");
        let known = c.book().version;
        let grant =
            Grant { grantee: Grantee::Everyone, operation: Operation::Describe, prefix: String::new() };
        c.apply(&c.change_acl(AclChange { grant: vec![grant.clone()], revoke: vec![] }).unwrap());
        let told = acl_of(c.heartbeat_answer(1, known, &supers)).expect("changed grants");
        assert!(told.acl.grants().any(|g| *g == grant));
        assert!(c.change_acl(AclChange { grant: vec![grant], revoke: vec![] }).is_err(), "nothing to change");
    }

    #[test]
    fn heartbeat_answers_carry_changes_since_the_servers_version() {
        let mut c = core(4, 0);
        let registered = c.book().version;
        let t = create(&mut c, 0);
        let holder = t.voters[0];
        let outsider = (1..=4).find(|s| !t.voters.contains(s)).unwrap();
        // Since a version this core saw: only what changed, and nothing for a non-replica.
        match c.assignments_since(holder, registered) {
            Assignments::Since { known, changed, dropped } => {
                assert_eq!((known, changed.len(), dropped.len()), (registered, 1, 0));
                assert_eq!(changed[0].id, t.id);
            }
            other => panic!("{other:?}"),
        }
        let nothing = Assignments::Since { known: registered, changed: vec![], dropped: vec![] };
        assert_eq!(c.assignments_since(outsider, registered), nothing);
        let change = BookChange { removed: vec!["t".into()], ..BookChange::default() };
        c.apply(&change);
        let before = c.book().version - 1;
        assert_eq!(
            c.assignments_since(holder, before),
            Assignments::Since { known: before, changed: vec![], dropped: vec![t.id] }
        );
        // A core that did not see the versions since (a new naming leader) lists everything.
        let fresh = NamingCore::new(c.book().clone(), Settings::new(LEASE, 3000), 0);
        assert_eq!(fresh.assignments_since(holder, before), Assignments::All(vec![]));
    }

    /// With many topics, one change costs each server a few hundred bytes, not its whole list.
    #[test]
    fn one_change_among_many_topics_answers_with_that_topic_only() {
        let mut c = core(3, 0);
        for i in 0..2_000 {
            let name = TopicName::new(format!("topic-{i:05}")).unwrap();
            c.apply(&c.create_topic(0, 0, name, 3, TopicConfig::default()).unwrap());
        }
        let known = c.book().version;
        c.apply(
            &c.create_topic(0, 0, TopicName::new("one-more").unwrap(), 3, TopicConfig::default()).unwrap(),
        );
        let size = |a: &Assignments| postcard::to_stdvec(a).unwrap().len();
        let delta = c.assignments_since(1, known);
        let full = Assignments::All(c.assignments_for(1));
        assert!(matches!(&delta, Assignments::Since { changed, .. } if changed.len() == 1), "{delta:?}");
        println!(
            "answer to one change among 2,001 topics: {} bytes, all topics: {} bytes",
            size(&delta),
            size(&full)
        );
        assert!(size(&delta) * 1000 < size(&full), "{} vs {}", size(&delta), size(&full));
    }

    #[test]
    fn topic_pages_cover_the_book_once_in_name_order() {
        let mut c = core(1, 0);
        for i in 0..25 {
            let change =
                c.create_topic(0, 0, TopicName::new(format!("t{i:02}")).unwrap(), 1, TopicConfig::default());
            c.apply(&change.unwrap());
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = c.list_topics_page(after.as_ref(), 10, usize::MAX);
            assert!(page.len() <= 10 && !page.is_empty());
            seen.extend(page.into_iter().map(|t| t.name.to_string()));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let all: Vec<String> = (0..25).map(|i| format!("t{i:02}")).collect();
        assert_eq!(seen, all);
        // A byte budget smaller than a topic still moves on, one topic per page.
        let (page, next) = c.list_topics_page(None, 10, 1);
        assert_eq!((page.len(), next.map(|n| n.to_string())), (1, Some("t00".to_string())));
    }

    #[test]
    fn the_book_is_bounded_in_topics_and_schema_bytes() {
        let mut c = core(1, 0);
        let with_schema = |len: usize| TopicConfig {
            // A valid schema padded with a description to `len` bytes.
            schema: Some(format!(r#"{{"description":"{}"}}"#, "d".repeat(len - 18))),
            ..TopicConfig::default()
        };
        let name = |i: usize| TopicName::new(format!("t{i}")).unwrap();
        let big = c.create_topic(0, 0, name(0), 1, with_schema(MAX_SCHEMA_BYTES + 1)).unwrap_err();
        assert!(
            matches!(big, Error::LimitReached { limit, .. } if limit == MAX_SCHEMA_BYTES as u64),
            "{big}"
        );
        // Schemas of at most 64 KiB each, until the cluster's 2 MiB are used.
        let fit = MAX_TOTAL_SCHEMA_BYTES / MAX_SCHEMA_BYTES;
        for i in 0..fit {
            let change = c.create_topic(0, 0, name(i), 1, with_schema(MAX_SCHEMA_BYTES)).unwrap();
            c.apply(&change);
        }
        let full = c.create_topic(0, 0, name(fit), 1, with_schema(100)).unwrap_err();
        assert!(matches!(full, Error::LimitReached { .. }), "{full}");
        // Replacing a topic's schema counts the new one instead of the old.
        let smaller = TopicChanges { schema: Some(with_schema(1000).schema), ..TopicChanges::default() };
        c.alter_topic(&name(0), smaller).unwrap();
        // And the number of topics is bounded.
        for i in fit..MAX_TOPICS {
            let change = c.create_topic(0, 0, name(i), 1, TopicConfig::default()).unwrap();
            c.apply(&change);
        }
        let many = c.create_topic(0, 0, name(MAX_TOPICS), 1, TopicConfig::default()).unwrap_err();
        assert!(matches!(many, Error::LimitReached { limit, .. } if limit == MAX_TOPICS as u64), "{many}");
    }

    /// Runs ticks every 10 ms from `from` to `to`, applying every change and answering every
    /// promise with `answer`; returns the notes.
    fn run(
        c: &mut NamingCore,
        from: u64,
        to: u64,
        alive: &[ServerId],
        answer: &dyn Fn(ServerId) -> Option<(Epoch, Index)>,
    ) -> Vec<String> {
        run_with(c, from, to, alive, answer, &|_, _| {})
    }

    /// [`run`], calling `each` (e.g. to send reports) before every tick.
    fn run_with(
        c: &mut NamingCore,
        from: u64,
        to: u64,
        alive: &[ServerId],
        answer: &dyn Fn(ServerId) -> Option<(Epoch, Index)>,
        each: &dyn Fn(&mut NamingCore, u64),
    ) -> Vec<String> {
        let mut notes = Vec::new();
        let mut now = from;
        while now <= to {
            beat(c, now, alive);
            each(c, now);
            for step in c.tick(now) {
                if let Some(change) = &step.change {
                    c.apply(change);
                }
                notes.push(step.note);
                for ask in step.asks {
                    c.on_promise(now, ask.topic, ask.epoch, ask.server, answer(ask.server));
                }
            }
            now += 10;
        }
        notes
    }

    fn names(prefix: &str, n: usize) -> Vec<TopicName> {
        (0..n).map(|i| TopicName::new(format!("{prefix}{i}")).unwrap()).collect()
    }

    /// Leaders and replicas spread evenly, one topic at a time or in a batch, and each
    /// topic's leader is its preferred (first) voter.
    #[test]
    fn new_topics_spread_leaders_and_replicas_evenly() {
        let mut c = core(3, 0);
        for name in names("one", 30) {
            let change = c.create_topic(0, 0, name, 3, TopicConfig::default()).unwrap();
            c.apply(&change);
        }
        assert_eq!(c.leaders(), BTreeMap::from([(1, 10), (2, 10), (3, 10)]));
        let change = c.create_topics(0, 0, names("many", 300), 3, TopicConfig::default()).unwrap();
        assert_eq!(change.topics.len(), 300, "one change for the batch");
        c.apply(&change);
        assert_eq!(c.leaders(), BTreeMap::from([(1, 110), (2, 110), (3, 110)]));
        assert!(c.book().topics.values().all(|t| t.leader == t.preferred()));
        let ids: BTreeSet<TopicId> = c.book().topics.values().map(|t| t.id).collect();
        assert_eq!(ids.len(), 330, "every topic its own id");

        // Five servers, two replicas: replicas spread too.
        let mut c = core(5, 0);
        let change = c.create_topics(0, 0, names("t", 100), 2, TopicConfig::default()).unwrap();
        c.apply(&change);
        let servers = c.list_servers(0);
        assert!(
            servers.iter().all(|s| s.topics == 40 && s.leaders == 20 && s.preferred == 20),
            "{servers:?}"
        );
    }

    /// A batch is all or none: one taken name, a name twice or too many topics refuse it.
    #[test]
    fn a_batch_create_or_delete_is_all_or_none() {
        let mut c = core(3, 0);
        let change = c.create_topics(0, 0, names("t", 3), 3, TopicConfig::default()).unwrap();
        c.apply(&change);
        let mut batch = names("u", 5);
        batch.push(TopicName::new("t1").unwrap());
        assert!(matches!(
            c.create_topics(0, 0, batch, 3, TopicConfig::default()),
            Err(Error::TopicExists { topic }) if topic == "t1"
        ));
        let twice = vec![TopicName::new("x").unwrap(), TopicName::new("x").unwrap()];
        assert!(c.create_topics(0, 0, twice, 3, TopicConfig::default()).is_err());
        let too_many = names("v", MAX_TOPICS_PER_CHANGE + 1);
        assert!(c.create_topics(0, 0, too_many, 3, TopicConfig::default()).is_err());
        assert!(matches!(
            c.delete_topics(&[TopicName::new("t0").unwrap(), TopicName::new("nope").unwrap()]),
            Err(Error::UnknownTopic { .. })
        ));
        let change = c.delete_topics(&names("t", 3)).unwrap();
        c.apply(&change);
        assert!(c.book().topics.is_empty());
    }

    /// A failover spreads the dead server's topics over the others; once it has been up for
    /// the pause and caught up, each topic it prefers goes back to it, and only then.
    #[test]
    fn leadership_returns_to_the_preferred_leader_after_a_pause() {
        let mut c = core(3, 0);
        let change = c.create_topics(0, 0, names("t", 6), 3, TopicConfig::default()).unwrap();
        c.apply(&change);
        let on_1: Vec<String> =
            c.book().topics.values().filter(|t| t.leader == 1).map(|t| t.name.to_string()).collect();
        assert_eq!(on_1.len(), 2);
        let answer = |_s: ServerId| Some((1, 5));
        run(&mut c, 0, 3000, &[2, 3], &answer);
        let new_leaders: BTreeSet<ServerId> = on_1.iter().map(|n| c.book().topics[n].leader).collect();
        assert_eq!(new_leaders, BTreeSet::from([2, 3]), "server 1's topics spread over 2 and 3");

        // Server 1 is back (it registers again) and caught up on every topic.
        c.register(3000, 1, addr(1));
        let pause = c.settings().preferred_pause_ms.unwrap();
        let report_all = |c: &mut NamingCore, now: u64| {
            for t in c.book().topics.values().cloned().collect::<Vec<_>>() {
                report(c, now, t.leader, leading(t.id, t.epoch, &[1, 2, 3]));
            }
        };
        let mut now = 3000;
        while now < 3000 + pause - 100 {
            beat(&mut c, now, &[1, 2, 3]);
            report_all(&mut c, now);
            assert!(c.tick(now).is_empty(), "nothing moves within the pause ({now})");
            now += 100;
        }
        let notes = run_with(&mut c, now, 3000 + pause + 3000, &[1, 2, 3], &answer, &report_all);
        for n in &on_1 {
            assert_eq!(c.book().topics[n].leader, 1, "{n} is back on 1: {notes:?}");
        }
        assert!(c.book().topics.values().all(|t| t.leader == t.preferred()));
    }

    /// A naming leader that took over knowing every server alive (no registration, no lease
    /// running out) still hands topics back once the preferred leader has been up the pause.
    #[test]
    fn a_new_naming_leader_returns_leadership_too() {
        let mut c = core(3, 0);
        let change = c.create_topics(0, 0, names("t", 3), 3, TopicConfig::default()).unwrap();
        c.apply(&change);
        let t = c.book().topics.values().find(|t| t.preferred() == 1).unwrap().clone();
        c.apply(&BookChange::topic(TopicRecord { leader: 2, epoch: 2, election_epoch: 2, ..t.clone() }));
        let heard = BTreeMap::from([(1, 1000), (2, 1000), (3, 1000)]);
        let mut c = NamingCore::with_heard(c.book().clone(), Settings::new(LEASE, 3000), 1000, &heard);
        let pause = c.settings().preferred_pause_ms.unwrap();
        let mut now = 1000;
        let mut started = false;
        while now < 1000 + pause + 2000 && !started {
            beat(&mut c, now, &[1, 2, 3]);
            report(&mut c, now, 2, leading(t.id, 2, &[1, 2, 3]));
            started = c.tick(now).iter().any(|s| s.note.contains("is back and caught up"));
            now += 100;
        }
        assert!(started, "the return starts within the pause after the core started");
        assert!(now > 1000 + pause, "and not before it");
    }

    /// `topic rebalance` moves only topics whose preferred leader is alive and caught up,
    /// and says why not for the others.
    #[test]
    fn rebalance_moves_what_is_ready_at_once_and_says_why_not() {
        let mut c = core(3, 0);
        let change = c.create_topics(0, 0, names("t", 3), 3, TopicConfig::default()).unwrap();
        c.apply(&change);
        // Every topic is led by 3 now (say an operator's elections did it).
        for t in c.book().topics.values().cloned().collect::<Vec<_>>() {
            let moved = TopicRecord { leader: 3, epoch: 2, election_epoch: 2, ..t };
            c.apply(&BookChange::topic(moved));
        }
        let topics: Vec<TopicRecord> = c.book().topics.values().cloned().collect();
        beat(&mut c, 100, &[1, 2, 3]);
        for t in &topics {
            // Server 2 lags on the topic it prefers.
            let holders: Vec<ServerId> = if t.preferred() == 2 { vec![1, 3] } else { vec![1, 2, 3] };
            report(&mut c, 100, 3, leading(t.id, 2, &holders));
        }
        let (steps, moves) = c.rebalance(100);
        assert_eq!(moves.len(), 2, "the topic 3 prefers needs no move: {moves:?}");
        assert_eq!(steps.len(), 1, "only 1's topic moves now");
        let to_2 = moves.iter().find(|m| m.to == 2).unwrap();
        assert_eq!(to_2.skipped.as_deref(), Some("preferred leader 2 has not caught up"));
        assert!(moves.iter().find(|m| m.to == 1).unwrap().skipped.is_none());
    }

    #[test]
    fn a_dead_leader_is_replaced_by_the_most_up_to_date_of_a_majority() {
        let mut c = core(3, 0);
        let t = create(&mut c, 0);
        assert_eq!((t.leader, t.epoch), (1, 1));
        let answer = |s: ServerId| Some((1, if s == 3 { 9 } else { 5 }));
        let notes = run(&mut c, 0, 3000, &[2, 3], &answer);
        let t = &c.book().topics["t"];
        assert_eq!((t.leader, t.epoch), (3, 2), "{notes:?}");
    }

    #[test]
    fn a_failed_election_is_retried_with_a_new_epoch_until_a_majority_answers() {
        let mut c = core(3, 0);
        let first = create(&mut c, 0);
        // Leader 1 is gone and 2 does not answer its promise requests: no majority.
        let silent_two = |s: ServerId| (s == 3).then_some((1, 5));
        run(&mut c, 0, 3000, &[2, 3], &silent_two);
        let t = c.book().topics["t"].clone();
        assert_eq!(t.epoch, 1, "no leader without a majority");
        assert!(t.election_epoch > 2, "tried more than once: {t:?}");
        // 3 reports the promise, and 1 comes back heartbeating as if it still led: the
        // elections go on until one succeeds.
        report(
            &mut c,
            3000,
            3,
            TopicReport { promised: t.election_epoch, leading: None, ..leading(first.id, 0, &[]) },
        );
        let answer = |_| Some((1, 5));
        run(&mut c, 3000, 6000, &[1, 2, 3], &answer);
        let t = &c.book().topics["t"];
        assert!(t.epoch > 1 && t.epoch == t.election_epoch, "{t:?}");
    }

    #[test]
    fn a_leader_that_will_not_lead_its_epoch_again_is_replaced_by_an_election() {
        let mut c = core(3, 0);
        let t = create(&mut c, 0);
        beat(&mut c, 100, &[1, 2, 3]);
        assert!(c.tick(100).is_empty(), "a healthy leader keeps its epoch");
        report(&mut c, 200, 1, TopicReport { refused: Some(1), leading: None, ..leading(t.id, 1, &[]) });
        let answer = |s: ServerId| Some((1, if s == 1 { 3 } else { 5 }));
        run(&mut c, 200, 1000, &[1, 2, 3], &answer);
        let t = &c.book().topics["t"];
        assert_eq!((t.leader, t.epoch), (2, 2), "a new epoch, whoever wins");
    }

    #[test]
    fn after_a_restart_unknown_servers_are_given_time_to_report() {
        let mut c = core(3, 0);
        create(&mut c, 0);
        // The naming server restarts at 10 s: it knows the book, not the leases.
        let mut c = NamingCore::new(c.book().clone(), *c.settings(), 10_000);
        let grace = c.settings().grace_ms;
        // Followers report at once; the leader only near the end of the grace period.
        let notes = run(&mut c, 10_000, 10_000 + grace - 20, &[2, 3], &|_| Some((1, 5)));
        assert!(notes.is_empty(), "{notes:?}");
        let notes =
            run(&mut c, 10_000 + grace - 10, 10_000 + grace + 2 * LEASE, &[1, 2, 3], &|_| Some((1, 5)));
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(c.book().topics["t"].epoch, 1);
        // A leader that never reports is dead once the grace period ends.
        let mut c = NamingCore::new(c.book().clone(), *c.settings(), 20_000);
        run(&mut c, 20_000, 20_000 + grace + 500, &[2, 3], &|_| Some((1, 5)));
        assert_eq!(c.book().topics["t"].leader, 2);
    }

    #[test]
    fn a_lost_voter_is_replaced_one_voter_at_a_time_and_only_once_each_epoch_committed() {
        let mut c = core(4, 0);
        create(&mut c, 0);
        // Voter 3 stops heartbeating; 1 leads on with 2.
        let mut now = 0;
        let mut steps = Vec::new();
        while now < 10_000 {
            beat(&mut c, now, &[1, 2, 4]);
            let t = c.book().topics["t"].clone();
            // The leader reports its epoch committed only a little after each change, and the
            // learner caught up only after 500 ms.
            let holders: Vec<ServerId> = if now > 5000 { vec![1, 2, 4] } else { vec![1, 2] };
            report(&mut c, now, 1, leading(t.id, t.epoch, &holders));
            for step in c.tick(now) {
                let change = step.change.unwrap();
                let before = c.book().topics["t"].clone();
                c.apply(&change);
                let after = c.book().topics["t"].clone();
                assert!(after.epoch > before.epoch, "every change is a new epoch");
                let added = after.voters.iter().filter(|v| !before.voters.contains(v)).count();
                let removed = before.voters.iter().filter(|v| !after.voters.contains(v)).count();
                assert!(added + removed <= 1, "{before:?} -> {after:?}");
                steps.push((after.voters.clone(), after.learners.clone()));
            }
            now += 50;
        }
        assert_eq!(
            steps,
            vec![(vec![1, 2, 3], vec![4]), (vec![1, 2, 3, 4], vec![]), (vec![1, 2, 4], vec![])],
            "learner, then voter, then the lost voter leaves"
        );
    }

    #[test]
    fn no_replacement_step_while_the_leader_has_not_committed_its_epoch() {
        let mut c = core(4, 0);
        let t = create(&mut c, 0);
        beat(&mut c, 5000, &[1, 2, 4]);
        report(&mut c, 5000, 1, TopicReport { ready: false, ..leading(t.id, 1, &[1, 2]) });
        assert!(c.tick(5000).is_empty(), "the epoch is not committed yet");
        report(&mut c, 5000, 1, leading(t.id, 1, &[1, 2]));
        assert_eq!(c.tick(5000).len(), 1);
    }
}
