//! The simulated naming server: the real [`NamingCore`], its book kept "durable" across
//! crashes (what the driver would have saved in redb), and its messages.

use std::collections::BTreeMap;

use super::net::{server_node, Message, NodeId, Payload, NAMING};
use super::server::{addr, Ctx};
use crate::error::Error;
use crate::naming::book::{Book, BookChange};
use crate::naming::core::{NamingCore, Settings};
use crate::types::{Epoch, ServerId, TopicId};
use crate::wire::{Request, Response};

/// A heartbeat held until the book changes (the long poll).
struct Held {
    to: NodeId,
    id: u64,
    server: ServerId,
    known: u64,
    deadline: u64,
}

/// The naming server: a process that may crash, and its durable book.
pub struct SimNaming {
    pub durable: Book,
    pub core: Option<NamingCore>,
    pub paused: bool,
    settings: Settings,
    held: Vec<Held>,
    /// Promise requests out: id -> (topic, epoch, server).
    asks: BTreeMap<u64, (TopicId, Epoch, ServerId, u64)>,
}

impl SimNaming {
    pub fn new(settings: Settings, now: u64) -> Self {
        let durable = Book { next_topic_id: 1, cluster_id: 7, ..Book::default() };
        Self {
            core: Some(NamingCore::new(durable.clone(), settings, now)),
            durable,
            paused: false,
            settings,
            held: Vec::new(),
            asks: BTreeMap::new(),
        }
    }

    pub fn crash(&mut self) {
        self.core = None;
        self.held.clear();
        self.asks.clear();
    }

    pub fn restart(&mut self, now: u64) {
        self.core = Some(NamingCore::new(self.durable.clone(), self.settings, now));
    }

    pub fn is_up(&self) -> bool {
        self.core.is_some()
    }

    /// Makes `change` durable, then applies it.
    fn commit(&mut self, change: &BookChange) {
        self.durable.apply(change);
        if let Some(core) = self.core.as_mut() {
            core.apply(change);
        }
    }

    fn respond(ctx: &mut Ctx, to: NodeId, id: u64, resp: Response) {
        ctx.send(NAMING, to, Payload::Response { id, resp: Box::new(resp) });
    }

    pub fn handle(&mut self, ctx: &mut Ctx, msg: Message, next_id: &mut dyn FnMut() -> u64) {
        let Some(core) = self.core.as_mut() else { return };
        let now = ctx.now;
        match msg.payload {
            Payload::Response { id, resp } => {
                if let Some((topic, epoch, server, _)) = self.asks.remove(&id) {
                    let answer = match *resp {
                        Response::Promised { last_epoch, log_end } => Some((last_epoch, log_end)),
                        _ => None,
                    };
                    core.on_promise(now, topic, epoch, server, answer);
                }
            }
            Payload::Request { id, req } => {
                let answer = match *req {
                    Request::Register { server, addr } => {
                        if let Some(change) = core.register(now, server, addr) {
                            self.commit(&change);
                        }
                        let core = self.core.as_ref().expect("up");
                        Some(Response::Registered {
                            lease_ms: self.settings.lease_ms as u32,
                            cluster: core.book().cluster_id,
                        })
                    }
                    Request::Heartbeat { server, known_version, applied_version, wait_ms, reports } => {
                        match core.heartbeat(now, server, applied_version, reports) {
                            Err(e) => Some(Response::Error(e)),
                            Ok(()) if core.book().version != known_version => Some(Response::Heartbeat {
                                version: core.book().version,
                                assignments: Some(core.assignments_for(server)),
                            }),
                            Ok(()) => {
                                let deadline = now + (wait_ms as u64).min(self.settings.lease_ms / 3);
                                self.held.push(Held {
                                    to: msg.from,
                                    id,
                                    server,
                                    known: known_version,
                                    deadline,
                                });
                                None
                            }
                        }
                    }
                    Request::CreateTopic { name, replicas, config } => {
                        match core.create_topic(now, now, name.clone(), replicas, config) {
                            Ok(change) => {
                                self.commit(&change);
                                Some(
                                    self.core
                                        .as_ref()
                                        .expect("up")
                                        .lookup(&name)
                                        .map(Response::Topic)
                                        .unwrap_or_else(Response::Error),
                                )
                            }
                            Err(e) => Some(Response::Error(e)),
                        }
                    }
                    Request::LookupTopic { name } => {
                        Some(core.lookup(&name).map(Response::Topic).unwrap_or_else(Response::Error))
                    }
                    Request::ListServers => Some(Response::Servers(core.list_servers(now))),
                    other => Some(Response::Error(Error::invalid(format!(
                        "the simulated naming server does not serve {}",
                        crate::transport::request_name(&other)
                    )))),
                };
                if let Some(answer) = answer {
                    Self::respond(ctx, msg.from, id, answer);
                }
            }
        }
        self.answer_held(ctx, false);
        let _ = next_id;
    }

    /// Answers held heartbeats whose book changed or whose wait is over.
    fn answer_held(&mut self, ctx: &mut Ctx, expire: bool) {
        let Some(core) = self.core.as_ref() else { return };
        let version = core.book().version;
        let held = std::mem::take(&mut self.held);
        for h in held {
            if h.known != version {
                let resp = Response::Heartbeat { version, assignments: Some(core.assignments_for(h.server)) };
                Self::respond(ctx, h.to, h.id, resp);
            } else if expire && ctx.now >= h.deadline {
                Self::respond(ctx, h.to, h.id, Response::Heartbeat { version, assignments: None });
            } else {
                self.held.push(h);
            }
        }
    }

    /// The naming server's periodic decisions: elections and replacements.
    pub fn tick(&mut self, ctx: &mut Ctx, next_id: &mut dyn FnMut() -> u64, log: &mut dyn FnMut(String)) {
        let Some(core) = self.core.as_mut() else { return };
        let now = ctx.now;
        for step in core.tick(now) {
            if let Some(change) = &step.change {
                self.commit(change);
            }
            if !step.note.is_empty() {
                log(step.note.clone());
            }
            for ask in step.asks {
                let id = next_id();
                self.asks.insert(id, (ask.topic, ask.epoch, ask.server, now));
                let req = Request::Promise { topic: ask.name, topic_id: ask.topic, epoch: ask.epoch };
                ctx.send(NAMING, server_node(ask.server), Payload::Request { id, req: Box::new(req) });
                debug_assert_eq!(ask.addr, addr(ask.server));
            }
        }
        // Promise requests nobody answered in time count as refusals.
        let wait = self.settings.promise_wait_ms;
        let late: Vec<u64> = self.asks.iter().filter(|(_, a)| now >= a.3 + wait).map(|(id, _)| *id).collect();
        for id in late {
            let (topic, epoch, server, _) = self.asks.remove(&id).expect("ask");
            if let Some(core) = self.core.as_mut() {
                core.on_promise(now, topic, epoch, server, None);
            }
        }
        self.answer_held(ctx, true);
    }
}
