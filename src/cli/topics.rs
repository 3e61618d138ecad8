//! Commands on many topics at once: `topic create A B C`, `topic create --from-file`,
//! `topic delete A B C`, `topic rebalance`, and the per-topic status of `topic list`.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

use super::{print_json, topic_json, usage};
use crate::client::Client;
use crate::types::{ServerId, TopicName};
use crate::wire::{TopicConfig, TopicInfo, TopicStatus};

/// Status questions `topic list` keeps open at once: one at a time, 10,000 topics took
/// minutes; this many share the client's connections (below their stream limit,
/// `transport::MAX_STREAMS_PER_CONNECTION`) without queueing on them.
const LIST_STATUS_CONCURRENCY: usize = 64;
/// How long `topic list` waits for one topic's status before showing `?` for it.
const LIST_STATUS_WAIT: Duration = Duration::from_secs(2);

/// Each topic's status from its leader, in the order given (`None`: it did not answer in
/// [`LIST_STATUS_WAIT`]), asking [`LIST_STATUS_CONCURRENCY`] leaders at a time.
pub async fn statuses(client: &Arc<Client>, topics: &[TopicInfo]) -> Vec<Option<TopicStatus>> {
    let mut out = vec![None; topics.len()];
    let mut asking = tokio::task::JoinSet::new();
    let mut next = topics.iter().cloned().enumerate();
    loop {
        while asking.len() < LIST_STATUS_CONCURRENCY {
            let Some((i, info)) = next.next() else { break };
            let client = client.clone();
            asking.spawn(async move {
                let status = tokio::time::timeout(LIST_STATUS_WAIT, client.topic_status_once(&info)).await;
                (i, status.ok().and_then(|r| r.ok()))
            });
        }
        match asking.join_next().await {
            Some(Ok((i, status))) => out[i] = status,
            Some(Err(_)) => {} // a task that panicked shows `?`
            None => return out,
        }
    }
}

/// The topic names given as arguments and, with `from_file`, one per line of that file
/// (`-`: standard input; blank lines and lines starting with `#` are skipped). A bad name is
/// a usage error naming its line; a name given twice is kept once.
pub fn read_names(names: &[String], from_file: Option<&Path>) -> Result<Vec<TopicName>> {
    let mut out: Vec<TopicName> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut add = |name: TopicName| {
        if seen.insert(name.to_string()) {
            out.push(name);
        }
    };
    for name in names {
        add(TopicName::new(name).map_err(usage)?);
    }
    if let Some(path) = from_file {
        let reader: Box<dyn BufRead> = if path == Path::new("-") {
            Box::new(std::io::stdin().lock())
        } else {
            let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
            Box::new(std::io::BufReader::new(file))
        };
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let name =
                TopicName::new(line).map_err(|e| usage(format!("{} line {}: {e}", path.display(), i + 1)))?;
            add(name);
        }
    }
    if out.is_empty() {
        return Err(usage("name at least one topic (as arguments or with --from-file)"));
    }
    Ok(out)
}

/// `topic create` of several topics: in requests of 1,000, each all or none.
pub async fn create(
    client: &Client,
    names: &[TopicName],
    replicas: u32,
    config: &TopicConfig,
    json: bool,
) -> Result<()> {
    let started = std::time::Instant::now();
    let created = client.create_topics(names, replicas, config).await?;
    let elapsed = started.elapsed();
    if json {
        print_json(&json!(created.iter().map(|t| topic_json(t, None)).collect::<Vec<_>>()))?;
    } else {
        let mut leaders: BTreeMap<ServerId, usize> = BTreeMap::new();
        for t in &created {
            *leaders.entry(t.leader).or_default() += 1;
        }
        let spread: Vec<String> = leaders.iter().map(|(s, n)| format!("server {s}: {n}")).collect();
        eprintln!(
            "created {} topics in {:.2} s; leaders: {}",
            created.len(),
            elapsed.as_secs_f64(),
            spread.join(", ")
        );
    }
    Ok(())
}

/// `topic delete` of several topics: in requests of 1,000, each all or none.
pub async fn delete(client: &Client, names: &[TopicName], json: bool) -> Result<()> {
    client.delete_topics(names).await?;
    if json {
        print_json(&json!({ "deleted": names.iter().map(TopicName::as_str).collect::<Vec<_>>() }))?;
    } else {
        eprintln!("deleted {} topics", names.len());
    }
    Ok(())
}

/// `topic rebalance`: hands topics back to their preferred leaders and says what moved.
pub async fn rebalance(client: &Client, json: bool) -> Result<()> {
    let moves = client.rebalance().await?;
    let moved = moves.iter().filter(|m| m.moved).count();
    if json {
        let items: Vec<_> = moves
            .iter()
            .map(|m| {
                json!({ "topic": m.topic.as_str(), "from": m.from, "to": m.to, "moved": m.moved, "reason": m.skipped })
            })
            .collect();
        print_json(&json!({ "moved": moved, "not_moved": moves.len() - moved, "topics": items }))?;
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    for m in moves.iter().filter(|m| !m.moved) {
        writeln!(out, "{}: stays on {} ({})", m.topic, m.from, m.skipped.as_deref().unwrap_or("not moved"))?;
    }
    eprintln!(
        "moved {moved} of {} topics not led by their preferred leader{}",
        moves.len(),
        if moves.is_empty() { " (every topic is)" } else { "" }
    );
    Ok(())
}
