//! `herald status`: the cluster at a glance, as `rpk cluster health` gives it: the naming
//! group, the topic servers, the topics (a live leader, replicas on dead servers,
//! replacements under way) and how far behind the subscriptions are. It exits 1 when
//! something needs attention, so scripts and probes can use it.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

use super::{print_json, topics};
use crate::client::Client;
use crate::wire::MemberRole;

/// What `herald status` found.
struct Health {
    members: usize,
    answering: usize,
    /// The leading member's id and term, if one answered as leader.
    leader: Option<(u64, u64)>,
    servers: usize,
    dead: Vec<u64>,
    topics: usize,
    /// Topics whose leader is not a live server.
    leaderless: Vec<String>,
    /// Topics with a voter on a dead server.
    on_dead: Vec<String>,
    /// Topics copying to a replacement (learners).
    catching_up: Vec<String>,
    /// Topics whose leader did not say how it is.
    unanswered: Vec<String>,
    subscriptions: usize,
    lag: u64,
    /// The subscription furthest behind: topic, name, records.
    most_behind: Option<(String, String, u64)>,
}

impl Health {
    /// A naming leader, every server alive, every topic led by a live server and answering,
    /// no replica on a dead server.
    fn healthy(&self) -> bool {
        self.leader.is_some()
            && self.dead.is_empty()
            && self.leaderless.is_empty()
            && self.on_dead.is_empty()
            && self.unanswered.is_empty()
    }
}

async fn gather(client: &Arc<Client>) -> Result<Health> {
    let members = client.naming_members().await;
    let answering = members.iter().filter(|(_, a)| a.is_ok()).count();
    let leader = members
        .iter()
        .find_map(|(_, a)| a.as_ref().ok().filter(|s| s.role == MemberRole::Leader).map(|s| (s.id, s.term)));
    let servers = client.list_servers().await?;
    let alive: BTreeSet<u64> = servers.iter().filter(|s| s.alive).map(|s| s.id).collect();
    let topics = client.list_topics().await?;
    let statuses = topics::statuses(client, &topics).await;
    let mut health = Health {
        members: members.len(),
        answering,
        leader,
        servers: servers.len(),
        dead: servers.iter().filter(|s| !s.alive).map(|s| s.id).collect(),
        topics: topics.len(),
        leaderless: Vec::new(),
        on_dead: Vec::new(),
        catching_up: Vec::new(),
        unanswered: Vec::new(),
        subscriptions: 0,
        lag: 0,
        most_behind: None,
    };
    for (info, status) in topics.iter().zip(statuses) {
        let name = info.name.to_string();
        if !alive.contains(&info.leader) {
            health.leaderless.push(name.clone());
        }
        if info.replicas.iter().any(|r| !alive.contains(&r.server)) {
            health.on_dead.push(name.clone());
        }
        if !info.learners.is_empty() {
            health.catching_up.push(name.clone());
        }
        let Some(status) = status else {
            health.unanswered.push(name);
            continue;
        };
        for sub in &status.subscriptions {
            health.subscriptions += 1;
            health.lag += sub.lag;
            if health.most_behind.as_ref().is_none_or(|(_, _, most)| sub.lag > *most) {
                health.most_behind = Some((name.clone(), sub.name.to_string(), sub.lag));
            }
        }
    }
    Ok(health)
}

/// At most this many names are listed per line of the text output (all of them in JSON).
const NAMES_SHOWN: usize = 5;

fn names(list: &[String]) -> String {
    let shown = list.iter().take(NAMES_SHOWN).cloned().collect::<Vec<_>>().join(", ");
    match list.len().saturating_sub(NAMES_SHOWN) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

pub async fn status(client: Arc<Client>, json: bool) -> Result<ExitCode> {
    let h = gather(&client).await?;
    if json {
        print_json(&json!({
            "healthy": h.healthy(),
            "naming": { "members": h.members, "answering": h.answering,
                        "leader": h.leader.map(|l| l.0), "term": h.leader.map(|l| l.1) },
            "servers": { "total": h.servers, "dead": h.dead },
            "topics": { "total": h.topics, "without_live_leader": h.leaderless,
                        "replica_on_dead_server": h.on_dead, "copying_to_replacement": h.catching_up,
                        "unanswered": h.unanswered },
            "lag": { "subscriptions": h.subscriptions, "records": h.lag,
                     "most_behind": h.most_behind.as_ref().map(|(t, s, lag)| json!({ "topic": t, "subscription": s, "records": lag })) },
        }))?;
    } else {
        let mut out = std::io::stdout().lock();
        let leader = match h.leader {
            Some((id, term)) => format!("leader {id} (term {term})"),
            None => "no leader answering".into(),
        };
        writeln!(out, "naming   {} of {} members answer, {leader}", h.answering, h.members)?;
        let dead = if h.dead.is_empty() {
            String::new()
        } else {
            format!("; dead: {}", h.dead.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
        };
        writeln!(out, "servers  {} of {} alive{dead}", h.servers - h.dead.len(), h.servers)?;
        writeln!(out, "topics   {}", h.topics)?;
        for (what, list) in [
            ("without a live leader", &h.leaderless),
            ("with a replica on a dead server", &h.on_dead),
            ("copying to a replacement", &h.catching_up),
            ("whose leader did not answer", &h.unanswered),
        ] {
            if !list.is_empty() {
                writeln!(out, "         {} {what}: {}", list.len(), names(list))?;
            }
        }
        let most = match &h.most_behind {
            Some((topic, sub, lag)) if *lag > 0 => format!("; furthest behind: {topic}/{sub}, {lag}"),
            _ => String::new(),
        };
        writeln!(out, "lag      {} records over {} subscriptions{most}", h.lag, h.subscriptions)?;
        writeln!(out, "healthy  {}", if h.healthy() { "yes" } else { "no" })?;
    }
    Ok(if h.healthy() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
