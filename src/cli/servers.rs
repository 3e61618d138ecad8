//! `herald servers` and `herald naming status`: the cluster's members as they see themselves.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

use crate::client::Client;

use super::{connect, print_json, Common};

/// `herald naming status`: asks every address of --naming how its member sees the group.
pub(super) async fn naming_status(common: &Common, json: bool) -> Result<ExitCode> {
    let client = connect(common)?;
    let answers = client.naming_members().await;
    // The member that says it leads, else the leader the others name (not every member
    // need be asked).
    let leader = answers
        .iter()
        .find_map(|(_, a)| {
            a.as_ref().ok().filter(|s| s.role == crate::wire::MemberRole::Leader).map(|s| s.id)
        })
        .or_else(|| answers.iter().find_map(|(_, a)| a.as_ref().ok().and_then(|s| s.leader)));
    if json {
        let members: Vec<serde_json::Value> = answers
            .iter()
            .map(|(addr, a)| match a {
                Ok(s) => json!({
                    "id": s.id, "address": addr.to_string(), "role": s.role.as_str(), "term": s.term,
                    "last_index": s.last_index, "applied": s.applied, "leader": s.leader,
                    "book_version": s.book_version, "rebuilding": s.rebuilding,
                }),
                Err(e) => json!({ "address": addr.to_string(), "role": "down", "error": e.to_string() }),
            })
            .collect();
        print_json(&json!({ "leader": leader, "members": members }))?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{:>6} {:<22} {:<10} {:>6} {:>10} {:>10} {:>7}",
            "MEMBER", "ADDRESS", "ROLE", "TERM", "LAST", "APPLIED", "LEADER"
        )?;
        for (addr, a) in &answers {
            match a {
                Ok(s) => writeln!(
                    out,
                    "{:>6} {:<22} {:<10} {:>6} {:>10} {:>10} {:>7}",
                    s.id,
                    addr.to_string(),
                    if s.rebuilding && s.role != crate::wire::MemberRole::Leader {
                        "rebuilding"
                    } else {
                        s.role.as_str()
                    },
                    s.term,
                    s.last_index,
                    s.applied,
                    s.leader.map_or("-".to_string(), |l| l.to_string())
                )?,
                Err(e) => writeln!(out, "{:>6} {:<22} {:<10} ({e})", "?", addr.to_string(), "down")?,
            }
        }
        match leader {
            Some(id) => writeln!(out, "leader: member {id}")?,
            None => {
                writeln!(out, "leader: none answering (an election may be under way, or a majority is down)")?
            }
        }
    }
    Ok(if leader.is_some() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub(super) async fn list_servers(client: Arc<Client>, json: bool) -> Result<ExitCode> {
    let servers = client.list_servers().await?;
    if json {
        print_json(&json!(servers
            .iter()
            .map(
                |s| json!({ "id": s.id, "address": s.addr.to_string(), "alive": s.alive, "replicas": s.topics, "leaders": s.leaders, "preferred_leaders": s.preferred })
            )
            .collect::<Vec<_>>()))?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{:>20} {:<22} {:<6} {:>8} {:>8} {:>9}",
            "SERVER", "ADDRESS", "ALIVE", "REPLICAS", "LEADERS", "PREFERRED"
        )?;
        for s in servers {
            writeln!(
                out,
                "{:>20} {:<22} {:<6} {:>8} {:>8} {:>9}",
                s.id,
                s.addr.to_string(),
                if s.alive { "yes" } else { "no" },
                s.topics,
                s.leaders,
                s.preferred
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
