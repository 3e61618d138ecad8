//! What a topic server tells the naming server about its topics in heartbeats.
//!
//! A report says, of a topic this server leads, its epoch, whether that epoch is committed
//! and who holds everything (or that the server will not lead an epoch it was given). With
//! 10,000 topics, re-reading and sending every report three times a second was most of an
//! idle cluster's work, so a heartbeat carries only the reports that changed since the
//! last one: the naming server keeps each topic's latest. All of them go after a new
//! session, when the naming server asks (a new naming leader knows none), and when the
//! disk's low-space state flips (it changes every led topic's report).

use std::collections::{HashMap, HashSet};

use crate::replica::Replica;
use crate::types::{Epoch, TopicId};
use crate::wire::{Reports, TopicReport};

/// What a replica tells the naming server about its topic in a heartbeat, if anything: a
/// topic it leads (epoch committed or not, who holds everything), or one it was told to lead
/// and would not (`refused`).
///
/// A leader on a full disk (`low_space`) hands its epoch on once a majority holds all it has:
/// it reports the epoch refused, and the naming server elects one of them instead.
pub fn topic_report(replica: &Replica, refused: Option<Epoch>, low_space: bool) -> Option<TopicReport> {
    let (mut leading, mut ready, mut holders, mut refused) = (None, false, Vec::new(), refused);
    if let Some(l) = replica.leader_report() {
        let hand_on = low_space && l.ready && l.voters_holding >= crate::replication::majority(l.voters);
        if l.given_up || hand_on {
            // Refused, with who holds everything, so the naming server elects one of them
            // rather than this replica again.
            refused = Some(l.epoch);
        } else {
            (leading, ready) = (Some(l.epoch), l.ready);
        }
        holders = l.holders;
    }
    if leading.is_none() && refused.is_none() {
        return None;
    }
    let promised = replica.log.state().promised;
    Some(TopicReport { topic: replica.log.id, promised, leading, refused, ready, holders })
}

/// The reports one naming session has been sent, to send only what changed.
#[derive(Debug, Default)]
pub struct ReportLedger {
    /// Each topic's last report sent; `None`: the next heartbeat sends all.
    sent: Option<HashMap<TopicId, TopicReport>>,
    low_space: bool,
}

impl ReportLedger {
    /// The next heartbeat sends every report (the naming server asked for them).
    pub fn send_all(&mut self) {
        self.sent = None;
    }

    /// The reports for the next heartbeat. `changed` are
    /// the topics whose state changed since the last call (taken before `all` or `report`
    /// read anything, so a change while they read is seen next time); `all` reads every
    /// report, `report` one topic's.
    pub fn next(
        &mut self,
        low_space: bool,
        changed: HashSet<TopicId>,
        all: impl FnOnce() -> Vec<TopicReport>,
        report: impl Fn(TopicId) -> Option<TopicReport>,
    ) -> Reports {
        if low_space != self.low_space {
            self.low_space = low_space;
            self.sent = None;
        }
        let Some(sent) = &mut self.sent else {
            let all = all();
            self.sent = Some(all.iter().map(|r| (r.topic, r.clone())).collect());
            return Reports { topics: all, all: true };
        };
        let mut out = Vec::new();
        for id in changed {
            match report(id) {
                Some(r) if sent.get(&id) != Some(&r) => {
                    sent.insert(id, r.clone());
                    out.push(r);
                }
                Some(_) => {}
                // The naming server keeps the last one; it weighs an old epoch's report as
                // old. Forgotten here, so a later report is sent even if it is the same.
                None => {
                    sent.remove(&id);
                }
            }
        }
        out.sort_unstable_by_key(|r| r.topic);
        Reports { topics: out, all: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leading(topic: TopicId, epoch: Epoch) -> TopicReport {
        TopicReport {
            topic,
            promised: epoch,
            leading: Some(epoch),
            refused: None,
            ready: true,
            holders: vec![1],
        }
    }

    #[test]
    fn sends_all_first_then_only_what_changed() {
        let mut ledger = ReportLedger::default();
        let now =
            |epochs: &[(TopicId, Epoch)]| epochs.iter().map(|(t, e)| leading(*t, *e)).collect::<Vec<_>>();
        let first = ledger.next(false, HashSet::new(), || now(&[(1, 1), (2, 1)]), |_| None);
        assert!(first.all);
        assert_eq!(first.topics.len(), 2);
        // Topic 1 changed state but not report; topic 2 moved to epoch 2.
        let next = ledger.next(false, [1, 2].into(), || unreachable!("not all"), |t| Some(leading(t, t)));
        assert_eq!(next, Reports { topics: vec![leading(2, 2)], all: false });
        let idle = ledger.next(false, HashSet::new(), || unreachable!(), |_| unreachable!());
        assert!(idle.topics.is_empty(), "nothing changed, nothing sent");
    }

    #[test]
    fn a_report_that_went_and_came_back_is_sent_again() {
        let mut ledger = ReportLedger::default();
        ledger.next(false, HashSet::new(), || vec![leading(1, 1)], |_| None);
        let gone = ledger.next(false, [1].into(), || unreachable!(), |_| None);
        assert!(gone.topics.is_empty());
        let back = ledger.next(false, [1].into(), || unreachable!(), |_| Some(leading(1, 1)));
        assert_eq!(back.topics, vec![leading(1, 1)]);
    }

    #[test]
    fn sends_all_when_asked_or_when_low_space_flips() {
        let mut ledger = ReportLedger::default();
        ledger.next(false, HashSet::new(), Vec::new, |_| None);
        ledger.send_all();
        assert!(ledger.next(false, HashSet::new(), Vec::new, |_| None).all, "asked");
        assert!(!ledger.next(false, HashSet::new(), Vec::new, |_| None).all);
        assert!(ledger.next(true, HashSet::new(), Vec::new, |_| None).all, "low space flipped");
        assert!(ledger.next(false, HashSet::new(), Vec::new, |_| None).all, "and back");
    }
}
