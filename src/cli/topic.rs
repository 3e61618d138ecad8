//! `herald topic ...` on one topic (create, describe, alter, delete, list) and
//! `herald schema ...`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::client::Client;
use crate::wire::{BacklogPolicy, TopicChanges, TopicConfig, TopicInfo, DEFAULT_MAX_RECORD_BYTES};

use super::subscriptions::subscription_json;
use super::{format_ms, parse_replicas, print_json, topic_name, topics, usage, valid_topic};

#[derive(Subcommand, Debug)]
pub(super) enum TopicCommand {
    /// Create topics (several at once: as arguments or one per line of --from-file; in
    /// requests of 1,000 topics, each all or none). Leaders spread evenly over live servers.
    Create {
        /// Topic names.
        #[arg(value_parser = valid_topic, required_unless_present = "from_file")]
        names: Vec<String>,
        /// A file with one topic name per line (`-`: standard input; blank lines and lines
        /// starting with # are skipped).
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// Replication factor: the topic lives on this many servers and a record is committed
        /// once a majority of them has it on disk.
        #[arg(long, default_value_t = 3, value_parser = parse_replicas)]
        replicas: u32,
        /// Largest record (key + headers + payload) the topic accepts, in bytes.
        #[arg(long, default_value_t = DEFAULT_MAX_RECORD_BYTES)]
        max_record_bytes: u32,
        /// A JSON Schema file: every record's payload must be JSON that follows it; a batch
        /// with a record that does not is refused whole.
        #[arg(long, value_name = "FILE")]
        schema: Option<PathBuf>,
        #[command(flatten)]
        backlog: BacklogArgs,
        #[arg(long)]
        json: bool,
    },
    /// Change a topic's backlog limit or policy (see also `herald schema set`).
    Alter {
        /// Topic name.
        #[arg(value_parser = valid_topic)]
        name: String,
        #[command(flatten)]
        backlog: BacklogArgs,
        /// Remove the backlog limit.
        #[arg(long, conflicts_with = "backlog_limit")]
        no_backlog_limit: bool,
        #[arg(long)]
        json: bool,
    },
    /// List topics with their leader and log range.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a topic's replicas, leader, epoch, log range and subscriptions.
    Describe {
        /// Topic name.
        #[arg(value_parser = valid_topic)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete topics and all their records (several at once: as arguments or one per line
    /// of --from-file; in requests of 1,000 topics, each all or none).
    Delete {
        /// Topic names.
        #[arg(value_parser = valid_topic, required_unless_present = "from_file")]
        names: Vec<String>,
        /// A file with one topic name per line (`-`: standard input).
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Move leadership back to each topic's preferred leader (its first replica) where that
    /// server is alive and caught up. Happens by itself a few seconds after a server
    /// returns; this does it now and says what moved.
    Rebalance {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub(super) struct BacklogArgs {
    /// Most bytes the topic stores; what happens at the limit is --backlog-policy.
    #[arg(long, value_name = "BYTES")]
    backlog_limit: Option<u64>,
    /// At the limit: `reject` producers (BacklogFull) until subscriptions read, or `evict`
    /// the oldest records from the slowest subscriptions (recorded, and told to their next
    /// consumer).
    #[arg(long, value_enum)]
    backlog_policy: Option<BacklogPolicy>,
}

#[derive(Subcommand, Debug)]
pub(super) enum SchemaCommand {
    /// Print a topic's schema (nothing, and a note on stderr, if it has none).
    Get {
        /// Topic name.
        #[arg(value_parser = valid_topic)]
        topic: String,
        #[arg(long)]
        json: bool,
    },
    /// Set a topic's schema from a file (it applies to records produced afterwards), or
    /// remove it with --none.
    Set {
        /// Topic name.
        #[arg(value_parser = valid_topic)]
        topic: String,
        #[arg(required_unless_present = "none", conflicts_with = "none")]
        file: Option<PathBuf>,
        /// Remove the schema: the topic takes any bytes again.
        #[arg(long)]
        none: bool,
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn topic_json(info: &TopicInfo, status: Option<&crate::wire::TopicStatus>) -> serde_json::Value {
    let replicas: Vec<_> = info
        .replicas
        .iter()
        .map(|r| {
            let mut v = json!({
                "server": r.server,
                "address": r.addr.to_string(),
                "role": if r.server == info.leader { "leader" } else { "follower" },
            });
            if let Some(p) = status.and_then(|s| s.replicas.iter().find(|p| p.server == r.server)) {
                v["log_end"] = json!(p.log_end);
                v["caught_up"] = json!(p.caught_up);
            }
            v
        })
        .collect();
    let mut v = json!({
        "name": info.name.as_str(),
        "id": info.id,
        "replicas": replicas,
        "leader": info.leader,
        "epoch": info.epoch,
        "max_record_bytes": info.config.max_record_bytes,
        "schema": info.config.schema.is_some(),
        "backlog_limit": info.config.backlog_limit,
        "backlog_policy": info.config.backlog_policy.as_str(),
    });
    if let Some(s) = status {
        v["log_start"] = json!(s.log_start);
        v["backlog_bytes"] = json!(s.backlog_bytes);
        v["max_lag"] = json!(s.subscriptions.iter().map(|x| x.lag).max().unwrap_or(0));
        v["log_end"] = json!(s.log_end);
        v["commit"] = json!(s.commit);
        v["subscriptions"] = json!(s.subscriptions.iter().map(subscription_json).collect::<Vec<_>>());
    }
    v
}

/// Reads a schema file; the naming server checks that it compiles.
fn read_schema(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading the schema {}", path.display()))
}

pub(super) async fn schema(client: Arc<Client>, cmd: SchemaCommand) -> Result<ExitCode> {
    match cmd {
        SchemaCommand::Get { topic, json } => {
            let info = client.lookup(&topic_name(&topic)?).await?;
            let schema = info.config.schema.as_deref();
            if json {
                let value = match schema {
                    Some(s) => serde_json::from_str(s).unwrap_or_else(|_| json!(s)),
                    None => serde_json::Value::Null,
                };
                print_json(&json!({ "topic": info.name.as_str(), "schema": value }))?;
            } else if let Some(s) = schema {
                println!("{}", s.trim_end());
            } else {
                eprintln!("topic {} has no schema: it takes any bytes", info.name);
            }
        }
        SchemaCommand::Set { topic, file, none, json } => {
            let name = topic_name(&topic)?;
            let schema = if none { None } else { file.as_deref().map(read_schema).transpose()? };
            let removed = schema.is_none();
            let changes = crate::wire::TopicChanges { schema: Some(schema), ..Default::default() };
            let info = client.alter_topic(&name, changes).await?;
            if json {
                print_json(&topic_json(&info, None))?;
            } else if removed {
                eprintln!("removed the schema of topic {}: it takes any bytes", info.name);
            } else {
                eprintln!(
                    "set the schema of topic {}: records produced from now on must follow it",
                    info.name
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn topic(client: Arc<Client>, cmd: TopicCommand) -> Result<ExitCode> {
    match cmd {
        TopicCommand::Create { names, from_file, replicas, max_record_bytes, schema, backlog, json } => {
            let many = from_file.is_some() || names.len() > 1;
            let mut names = topics::read_names(&names, from_file.as_deref())?;
            let schema = schema.as_deref().map(read_schema).transpose()?;
            let config = TopicConfig {
                max_record_bytes,
                schema,
                backlog_limit: backlog.backlog_limit,
                backlog_policy: backlog.backlog_policy.unwrap_or_default(),
            };
            if many {
                topics::create(&client, &names, replicas, &config, json).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let name = names.remove(0);
            let info = client.create_topic(&name, replicas, config).await?;
            if json {
                print_json(&topic_json(&info, None))?;
            } else {
                eprintln!(
                    "created topic {} (id {}) on server {}, epoch {}",
                    info.name, info.id, info.leader, info.epoch
                );
            }
        }
        TopicCommand::Alter { name, backlog, no_backlog_limit, json } => {
            let name = topic_name(&name)?;
            let backlog_limit = if no_backlog_limit { Some(None) } else { backlog.backlog_limit.map(Some) };
            if backlog_limit.is_none() && backlog.backlog_policy.is_none() {
                return Err(usage(
                    "nothing to change: give --backlog-limit BYTES, --no-backlog-limit or --backlog-policy",
                ));
            }
            let changes =
                TopicChanges { backlog_limit, backlog_policy: backlog.backlog_policy, schema: None };
            let info = client.alter_topic(&name, changes).await?;
            if json {
                print_json(&topic_json(&info, None))?;
            } else {
                let limit = info.config.backlog_limit.map_or("none".to_string(), |l| format!("{l} bytes"));
                eprintln!(
                    "topic {}: backlog limit {limit}, policy {}",
                    info.name,
                    info.config.backlog_policy.as_str()
                );
            }
        }
        TopicCommand::List { json } => {
            let topics = client.list_topics().await?;
            let statuses = topics::statuses(&client, &topics).await;
            let rows: Vec<_> = topics.iter().zip(statuses).collect();
            if json {
                print_json(&json!(rows.iter().map(|(i, s)| topic_json(i, s.as_ref())).collect::<Vec<_>>()))?;
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "{:<24} {:<9} {:>8} {:>6} {:>12} {:>12} {:>14} {:>5} {:>10}",
                    "TOPIC",
                    "REPLICAS",
                    "LEADER",
                    "EPOCH",
                    "LOG_START",
                    "LOG_END",
                    "BACKLOG_BYTES",
                    "SUBS",
                    "MAX_LAG"
                )?;
                for (info, status) in rows {
                    let (start, end, backlog, subs, lag) = match &status {
                        Some(s) => (
                            s.log_start.to_string(),
                            s.log_end.to_string(),
                            s.backlog_bytes.to_string(),
                            s.subscriptions.len().to_string(),
                            s.subscriptions.iter().map(|x| x.lag).max().unwrap_or(0).to_string(),
                        ),
                        None => ("?".into(), "?".into(), "?".into(), "?".into(), "?".into()),
                    };
                    let replicas: Vec<String> = info.replicas.iter().map(|r| r.server.to_string()).collect();
                    writeln!(
                        out,
                        "{:<24} {:<9} {:>8} {:>6} {:>12} {:>12} {:>14} {:>5} {:>10}",
                        info.name.as_str(),
                        replicas.join(","),
                        info.leader,
                        info.epoch,
                        start,
                        end,
                        backlog,
                        subs,
                        lag
                    )?;
                }
            }
        }
        TopicCommand::Describe { name, json } => {
            let name = topic_name(&name)?;
            let info = client.lookup(&name).await?;
            let status = client.topic_status(&name).await?;
            if json {
                print_json(&topic_json(&info, Some(&status)))?;
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "topic      {} (id {})", info.name, info.id)?;
                writeln!(out, "leader     server {} (epoch {})", info.leader, info.epoch)?;
                for r in &info.replicas {
                    let role = if r.server == info.leader { "leader" } else { "follower" };
                    let position = match status.replicas.iter().find(|p| p.server == r.server) {
                        Some(p) => format!(
                            ", log end {}{}",
                            p.log_end.map_or("?".to_string(), |e| e.to_string()),
                            if p.caught_up { ", caught up" } else { ", catching up" }
                        ),
                        None => String::new(),
                    };
                    writeln!(out, "replica    server {} at {} ({role}{position})", r.server, r.addr)?;
                }
                writeln!(
                    out,
                    "log        start {}  end {}  commit {}",
                    status.log_start, status.log_end, status.commit
                )?;
                let limit =
                    info.config.backlog_limit.map_or("no limit".to_string(), |l| format!("limit {l} bytes"));
                writeln!(
                    out,
                    "backlog    {} bytes ({limit}, policy {})",
                    status.backlog_bytes,
                    info.config.backlog_policy.as_str()
                )?;
                writeln!(out, "max record {} bytes", info.config.max_record_bytes)?;
                writeln!(
                    out,
                    "schema     {}",
                    if info.config.schema.is_some() { "yes (herald schema get)" } else { "none" }
                )?;
                for s in &status.subscriptions {
                    let evicted = match s.evicted_at_ms {
                        Some(at) => {
                            format!("  evicted {} records (last at {} UTC)", s.evicted, format_ms(at))
                        }
                        None => String::new(),
                    };
                    writeln!(
                        out,
                        "subscription {}  cursor {}  lag {} ({} bytes){evicted}",
                        s.name, s.cursor, s.lag, s.lag_bytes
                    )?;
                }
            }
        }
        TopicCommand::Delete { names, from_file, json } if from_file.is_some() || names.len() > 1 => {
            let names = topics::read_names(&names, from_file.as_deref())?;
            topics::delete(&client, &names, json).await?;
        }
        TopicCommand::Rebalance { json } => topics::rebalance(&client, json).await?,
        TopicCommand::Delete { names, json, .. } => {
            let name = topic_name(&names[0])?;
            client.delete_topic(&name).await?;
            if json {
                print_json(&json!({ "deleted": name.as_str() }))?;
            } else {
                eprintln!("deleted topic {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
