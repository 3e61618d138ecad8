//! The simulated naming group: one to three members made of the production code
//! ([`NamingMember`]: raft-rs, the redb Raft log over a [`SimDisk`] that loses unsynced
//! writes when the power goes, and the naming core), and their messages.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::net::{member_addr, naming_node, server_node, Message, NodeId, Payload};
use super::server::{addr, Ctx};
use crate::error::Error;
use crate::naming::book::Book;
use crate::naming::core::Settings;
use crate::naming::member::{Admin, Done, Effects, NamingMember};
use crate::naming::raft::{GroupSettings, RaftLog};
use crate::storage::faults::SimDisk;
use crate::types::{Epoch, ServerId, TopicId, TopicName};
use crate::wire::{Request, Response};

/// Applied book changes between two snapshots in a run: a run applies tens of changes, so
/// with the production figure (`COMPACT_EVERY`) no member would ever be sent a snapshot.
const SIM_COMPACT_EVERY: u64 = 8;

/// Who waits for an [`Admin`] request's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// A topic server's registration.
    Register { to: NodeId, id: u64 },
    /// The run's own topic creation (before the clients start).
    Setup(TopicName),
}

/// A heartbeat held until the book changes (the long poll).
struct Held {
    to: NodeId,
    id: u64,
    server: ServerId,
    known: u64,
    deadline: u64,
}

/// One naming member: a process that may crash, and its disk.
pub struct SimMember {
    pub id: u64,
    pub disk: SimDisk,
    pub member: Option<NamingMember<Pending>>,
    pub paused: bool,
    /// Bumped by every crash, so timers of a dead process are ignored.
    pub incarnation: u64,
    held: Vec<Held>,
    /// Promise requests out: id -> (topic, epoch, server, sent at).
    asks: BTreeMap<u64, (TopicId, Epoch, ServerId, u64)>,
}

/// What the world hears back from the group.
#[derive(Debug, Default)]
pub struct Heard {
    pub notes: Vec<String>,
    /// Setup creations that ended (`Err`: to try again).
    pub created: Vec<(TopicName, Result<(), Error>)>,
    /// A member could not write its log: it stops, as the real one exits.
    pub fatal: Option<String>,
}

/// The naming group.
pub struct SimNaming {
    pub members: BTreeMap<u64, SimMember>,
    settings: Settings,
    peers: BTreeMap<u64, SocketAddr>,
    /// Topic leaders elected, by every leader the group had.
    pub elected: u64,
}

impl SimNaming {
    pub fn new(settings: Settings, members: u64) -> Self {
        let peers = (1..=members).map(|m| (m, member_addr(m))).collect();
        let members = (1..=members)
            .map(|id| {
                let m = SimMember {
                    id,
                    disk: SimDisk::new(),
                    member: None,
                    paused: false,
                    incarnation: 0,
                    held: Vec::new(),
                    asks: BTreeMap::new(),
                };
                (id, m)
            })
            .collect();
        Self { members, settings, peers, elected: 0 }
    }

    pub fn is_up(&self, member: u64) -> bool {
        self.members.get(&member).is_some_and(|m| m.member.is_some())
    }

    /// The member that leads and decides now, if any (of the newest term: a leader cut off
    /// may not know yet that another replaced it).
    pub fn leader(&self) -> Option<u64> {
        self.leaders().max_by_key(|(_, term, _)| *term).map(|(id, _, _)| id)
    }

    /// Every member that takes itself for leader: id, term, book version.
    pub fn leaders(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.members.values().filter_map(|m| {
            let n = m.member.as_ref().filter(|n| n.core().is_some())?;
            Some((m.id, n.status().term, n.book().version))
        })
    }

    /// The deciding core of the leader, if any.
    pub fn core(&self) -> Option<&crate::naming::core::NamingCore> {
        let leader = self.leader()?;
        self.members.get(&leader)?.member.as_ref()?.core()
    }

    /// The newest book any running member applied (for reports).
    pub fn book(&self) -> Option<&Book> {
        self.members.values().filter_map(|m| m.member.as_ref()).map(|n| n.book()).max_by_key(|b| b.version)
    }

    /// Starts (or restarts) member `id` from its disk.
    pub fn start(&mut self, id: u64) -> Result<(), String> {
        let m = self.members.get_mut(&id).expect("member");
        if m.member.is_some() {
            return Ok(());
        }
        m.disk.power_on();
        let db = redb::Database::builder()
            .create_with_backend(m.disk.backend())
            .map_err(|e| format!("naming member {id} does not open: {e}"))?;
        let log = RaftLog::open(Arc::new(db)).map_err(|e| format!("naming member {id}'s log: {e}"))?;
        let group =
            GroupSettings { randomized: false, compact_every: SIM_COMPACT_EVERY, ..GroupSettings::default() };
        let member = NamingMember::open(id, self.peers.clone(), log, group, self.settings, 7)
            .map_err(|e| format!("naming member {id} does not start: {e}"))?;
        m.member = Some(member);
        m.incarnation += 1;
        Ok(())
    }

    /// The process dies and its power goes (unsynced writes are lost).
    pub fn crash(&mut self, id: u64) {
        let m = self.members.get_mut(&id).expect("member");
        if m.member.take().is_some() {
            m.disk.power_cut();
        }
        m.held.clear();
        m.asks.clear();
        m.paused = false;
        m.incarnation += 1;
    }

    /// Loses member `id`'s disk (its data directory): it restarts empty.
    pub fn wipe(&mut self, id: u64) {
        self.crash(id);
        self.members.get_mut(&id).expect("member").disk = SimDisk::new();
    }

    /// The world's own topic creation, through the leader.
    pub fn create(
        &mut self,
        ctx: &mut Ctx,
        name: TopicName,
        replicas: u32,
        config: crate::wire::TopicConfig,
        next_id: &mut dyn FnMut() -> u64,
    ) -> Heard {
        let Some(leader) = self.leader() else { return Heard::default() };
        let admin = Admin::CreateTopics { names: vec![name.clone()], replicas, config, wall_ms: ctx.now };
        let m = self.members.get_mut(&leader).expect("member");
        let fx = m.member.as_mut().expect("up").submit(ctx.now, admin, Pending::Setup(name));
        self.carry(ctx, leader, fx, next_id)
    }

    /// A tick of member `id`'s clock.
    pub fn tick(&mut self, ctx: &mut Ctx, id: u64, next_id: &mut dyn FnMut() -> u64) -> Heard {
        let now = ctx.now;
        let Some(member) = self.members.get_mut(&id).and_then(|m| m.member.as_mut()) else {
            return Heard::default();
        };
        let fx = member.tick(now);
        let mut heard = self.carry(ctx, id, fx, next_id);
        // Promise requests nobody answered in time count as refusals.
        let m = self.members.get_mut(&id).expect("member");
        let wait = self.settings.promise_wait_ms;
        let late: Vec<u64> = m.asks.iter().filter(|(_, a)| now >= a.3 + wait).map(|(id, _)| *id).collect();
        for ask in late {
            let (topic, epoch, server, _) = m.asks.remove(&ask).expect("ask");
            if let Some(member) = m.member.as_mut() {
                member.on_promise(now, topic, epoch, server, None);
            }
        }
        self.answer_held(ctx, id, true);
        heard.notes.retain(|n| !n.is_empty());
        heard
    }

    /// Member `id`'s Raft messages to member `to` were lost (`snapshot`: one was a snapshot).
    pub fn undelivered(
        &mut self,
        ctx: &mut Ctx,
        id: u64,
        to: u64,
        snapshot: bool,
        next_id: &mut dyn FnMut() -> u64,
    ) -> Heard {
        let Some(member) = self.members.get_mut(&id).and_then(|m| m.member.as_mut()) else {
            return Heard::default();
        };
        let fx = member.undelivered(ctx.now, to, snapshot);
        self.carry(ctx, id, fx, next_id)
    }

    /// A message for member `id`.
    pub fn handle(
        &mut self,
        ctx: &mut Ctx,
        id: u64,
        msg: Message,
        next_id: &mut dyn FnMut() -> u64,
    ) -> Heard {
        let now = ctx.now;
        let me = naming_node(id);
        let Some(m) = self.members.get_mut(&id) else { return Heard::default() };
        let Some(member) = m.member.as_mut() else { return Heard::default() };
        let mut heard = Heard::default();
        match msg.payload {
            Payload::Raft { msg, sender_empty } => {
                let fx = member.step(now, *msg, sender_empty);
                heard = self.carry(ctx, id, fx, next_id);
            }
            Payload::Response { id: req, resp } => {
                if let Some((topic, epoch, server, _)) = m.asks.remove(&req) {
                    let answer = match *resp {
                        Response::Promised { last_epoch, log_end } => Some((last_epoch, log_end)),
                        _ => None,
                    };
                    member.on_promise(now, topic, epoch, server, answer);
                }
            }
            Payload::Request { id: req, req: request } => {
                let answer = match *request {
                    Request::Register { server, addr } => {
                        let fx = member.submit(
                            now,
                            Admin::Register { server, addr },
                            Pending::Register { to: msg.from, id: req },
                        );
                        heard = self.carry(ctx, id, fx, next_id);
                        None
                    }
                    Request::Heartbeat { server, known_version, applied_version, wait_ms, reports } => {
                        match member.heartbeat(now, server, applied_version, reports) {
                            Err(e) => Some(Response::Error(e)),
                            Ok(()) if member.book().version != known_version => {
                                let core = member.core().expect("a member that took a heartbeat leads");
                                Some(core.heartbeat_answer(
                                    server,
                                    known_version,
                                    &crate::naming::default_superusers(),
                                ))
                            }
                            Ok(()) => {
                                let deadline = now + (wait_ms as u64).min(self.settings.lease_ms / 3);
                                m.held.push(Held {
                                    to: msg.from,
                                    id: req,
                                    server,
                                    known: known_version,
                                    deadline,
                                });
                                None
                            }
                        }
                    }
                    Request::NamingAlive { server } => {
                        member.alive(now, server);
                        Some(Response::Noted)
                    }
                    // The simulated clients look topics up; an AwaitLeader is answered as it
                    // stands (held requests are the real server's business).
                    Request::LookupTopic { name } | Request::AwaitLeader { name, .. } => Some(
                        member
                            .serving()
                            .and_then(|core| core.lookup(&name))
                            .map(Response::Topic)
                            .unwrap_or_else(Response::Error),
                    ),
                    Request::ListServers => Some(
                        member
                            .serving()
                            .map(|core| Response::Servers(core.list_servers(now)))
                            .unwrap_or_else(Response::Error),
                    ),
                    other => Some(Response::Error(Error::invalid(format!(
                        "the simulated naming member does not serve {}",
                        crate::transport::request_name(&other)
                    )))),
                };
                if let Some(answer) = answer {
                    ctx.send(me, msg.from, Payload::Response { id: req, resp: Box::new(answer) });
                }
            }
        }
        self.answer_held(ctx, id, false);
        heard
    }

    /// Carries what member `id` produced.
    fn carry(
        &mut self,
        ctx: &mut Ctx,
        id: u64,
        fx: Result<Effects<Pending>, crate::naming::raft::GroupError>,
        next_id: &mut dyn FnMut() -> u64,
    ) -> Heard {
        let mut heard = Heard::default();
        let fx = match fx {
            Ok(fx) => fx,
            Err(e) => {
                heard.fatal = Some(format!("naming member {id} stops: {e}"));
                return heard;
            }
        };
        let me = naming_node(id);
        let m = self.members.get_mut(&id).expect("member");
        let member = m.member.as_ref().expect("up");
        let sender_empty = member.log_is_empty();
        for msg in fx.messages {
            let to = naming_node(msg.to);
            ctx.send(me, to, Payload::Raft { msg: Box::new(msg), sender_empty });
        }
        for (pending, result) in fx.replies {
            match pending {
                Pending::Register { to, id: req } => {
                    let resp = match result {
                        Ok(Done::Registered { cluster }) => {
                            Response::Registered { lease_ms: self.settings.lease_ms as u32, cluster }
                        }
                        Ok(other) => Response::Error(Error::internal(format!("register ended as {other:?}"))),
                        Err(e) => Response::Error(e),
                    };
                    ctx.send(me, to, Payload::Response { id: req, resp: Box::new(resp) });
                }
                Pending::Setup(name) => heard.created.push((name, result.map(|_| ()))),
            }
        }
        for ask in fx.asks {
            let req_id = next_id();
            m.asks.insert(req_id, (ask.topic, ask.epoch, ask.server, ctx.now));
            let req = Request::Promise { topic: ask.name, topic_id: ask.topic, epoch: ask.epoch };
            ctx.send(me, server_node(ask.server), Payload::Request { id: req_id, req: Box::new(req) });
            debug_assert_eq!(ask.addr, addr(ask.server));
        }
        self.elected += fx.elected;
        heard.notes = fx.notes.into_iter().map(|n| format!("naming {id}: {n}")).collect();
        heard
    }

    /// Answers member `id`'s held heartbeats whose book changed or whose wait is over, and
    /// fails them if it no longer leads.
    fn answer_held(&mut self, ctx: &mut Ctx, id: u64, expire: bool) {
        let Some(m) = self.members.get_mut(&id) else { return };
        let Some(member) = m.member.as_ref() else { return };
        let me = naming_node(id);
        let version = member.book().version;
        let held = std::mem::take(&mut m.held);
        for h in held {
            let resp = match member.serving() {
                Err(e) => Some(Response::Error(e)),
                Ok(core) if h.known != version || (expire && ctx.now >= h.deadline) => {
                    Some(core.heartbeat_answer(h.server, h.known, &crate::naming::default_superusers()))
                }
                Ok(_) => None,
            };
            match resp {
                Some(resp) => ctx.send(me, h.to, Payload::Response { id: h.id, resp: Box::new(resp) }),
                None => m.held.push(h),
            }
        }
    }
}
