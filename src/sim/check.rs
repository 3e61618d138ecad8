//! What the simulator checks, at every step and at the end of a run: the guarantees, from
//! what clients were told and what replicas store.

use std::collections::{BTreeMap, BTreeSet};

use crate::types::{Epoch, Offset, ServerId, TopicId};

/// A guarantee broken: what, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything clients were told, and what replicas were seen to hold.
#[derive(Debug, Default)]
pub struct Checker {
    /// Payloads acknowledged to producers, by (topic, offset).
    pub acked: BTreeMap<(TopicId, Offset), String>,
    /// Each producer batch's acknowledged offsets: (topic, producer, sequence) -> (base, count).
    pub batches: BTreeMap<(TopicId, u64, u64), (Offset, u32)>,
    /// The value first seen committed at each offset (by a replica or a reader).
    pub committed: BTreeMap<(TopicId, Offset), String>,
    /// The highest cursor each subscription was acknowledged at.
    pub cursors: BTreeMap<(TopicId, String), Offset>,
    /// Subscriptions whose creation was acknowledged and not deleted since.
    pub subscriptions: BTreeSet<(TopicId, String)>,
    /// Who led each epoch of each topic.
    pub leaders: BTreeMap<(TopicId, Epoch), ServerId>,
    /// Offsets consumers read.
    pub read: BTreeSet<(TopicId, Offset)>,
    /// Below these offsets, records a consumer did not read were evicted, and it was told.
    pub evicted_below: BTreeMap<TopicId, Offset>,
    pub violations: Vec<Violation>,
}

impl Checker {
    fn fail(&mut self, what: String) {
        self.violations.push(Violation(what));
    }

    /// A producer was told `payloads` are at `base..`.
    pub fn produced(
        &mut self,
        topic: TopicId,
        producer: u64,
        sequence: u64,
        base: Offset,
        payloads: &[String],
    ) {
        let count = payloads.len() as u32;
        match self.batches.insert((topic, producer, sequence), (base, count)) {
            Some(before) if before != (base, count) => self.fail(format!(
                "G4: batch {sequence} of producer {producer:#x} acked at {before:?} and again at {:?}",
                (base, count)
            )),
            _ => {}
        }
        for (i, p) in payloads.iter().enumerate() {
            let offset = base + i as Offset;
            if let Some(old) = self.acked.insert((topic, offset), p.clone()) {
                if old != *p {
                    self.fail(format!("G2: offset {offset} of topic {topic} acked as {old:?} and as {p:?}"));
                }
            }
            self.saw_committed(topic, offset, p, "an ack");
        }
    }

    /// A record was seen committed (read by a consumer, or below a replica's commit point).
    pub fn saw_committed(&mut self, topic: TopicId, offset: Offset, payload: &str, by: &str) {
        match self.committed.get(&(topic, offset)) {
            Some(p) if p != payload => {
                let p = p.clone();
                self.fail(format!(
                    "G1/G2: offset {offset} of topic {topic} was committed as {p:?}, {by} has {payload:?}"
                ));
            }
            Some(_) => {}
            None => {
                self.committed.insert((topic, offset), payload.to_string());
            }
        }
        if let Some(acked) = self.acked.get(&(topic, offset)) {
            if acked != payload {
                let acked = acked.clone();
                self.fail(format!(
                    "G1: offset {offset} of topic {topic} was acked as {acked:?}, {by} has {payload:?}"
                ));
            }
        }
    }

    /// A subscription's cursor move was acknowledged at `cursor`.
    pub fn cursor_acked(&mut self, topic: TopicId, subscription: &str, cursor: Offset, reset: bool) {
        let key = (topic, subscription.to_string());
        let before = self.cursors.get(&key).copied().unwrap_or(0);
        if cursor < before && !reset {
            self.fail(format!(
                "G3: the committed cursor of {subscription} went back from {before} to {cursor}"
            ));
        }
        if reset {
            self.cursors.insert(key, cursor);
        } else {
            self.cursors.insert(key, cursor.max(before));
        }
    }

    /// A consumer resumed `subscription` at `from` (the first offset of a new session).
    pub fn resumed(&mut self, topic: TopicId, subscription: &str, from: Offset) {
        let committed = self.cursors.get(&(topic, subscription.to_string())).copied().unwrap_or(0);
        if from < committed {
            self.fail(format!(
                "G3: {subscription} resumed at {from}, below its committed cursor {committed}"
            ));
        }
    }

    /// A consumer was told the backlog policy moved its subscription to `resume_at`.
    pub fn evicted(&mut self, topic: TopicId, resume_at: Offset) {
        let below = self.evicted_below.entry(topic).or_default();
        *below = (*below).max(resume_at);
    }

    /// An acked record its consumer may not have read: it was evicted, and it was told.
    pub fn excused(&self, topic: TopicId, offset: Offset) -> bool {
        self.evicted_below.get(&topic).is_some_and(|b| offset < *b)
    }

    /// `server` leads `epoch` of `topic`.
    pub fn leads(&mut self, topic: TopicId, epoch: Epoch, server: ServerId) {
        match self.leaders.insert((topic, epoch), server) {
            Some(other) if other != server => {
                self.fail(format!("G5: epoch {epoch} of topic {topic} led by {other} and by {server}"))
            }
            _ => {}
        }
    }
}
