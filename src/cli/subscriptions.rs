//! `herald subscription ...`: list, create, delete, reset a topic's subscriptions.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;

use crate::client::Client;
use crate::types::{Offset, StartFrom};
use crate::wire::{ResetTo, SubscriptionInfo};

use super::{format_ms, print_json, subscription_name, topic_name, usage, valid_subscription, valid_topic};

#[derive(Subcommand, Debug)]
pub(super) enum SubscriptionCommand {
    /// List a topic's subscriptions with cursor and lag.
    List {
        /// Topic name.
        #[arg(value_parser = valid_topic)]
        topic: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a subscription.
    Create {
        /// Topic name.
        #[arg(value_parser = valid_topic)]
        topic: String,
        /// Subscription name.
        #[arg(value_parser = valid_subscription)]
        name: String,
        #[arg(long, default_value = "earliest")]
        from: StartFrom,
        #[arg(long)]
        json: bool,
    },
    /// Delete a subscription (frees the records only it held, and says how much).
    Delete {
        /// Topic name.
        #[arg(value_parser = valid_topic)]
        topic: String,
        /// Subscription name.
        #[arg(value_parser = valid_subscription)]
        name: String,
        /// Even while a consumer holds it: that consumer is stopped with an error.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Move a subscription's cursor: back to read again, or forward to skip. Shows what it
    /// would do unless --execute is given; refused while a consumer holds the subscription
    /// unless --force.
    #[command(group(clap::ArgGroup::new("to").required(true).args(["to_earliest", "to_latest", "to_offset"])))]
    Reset {
        /// Topic name.
        #[arg(value_parser = valid_topic)]
        topic: String,
        /// Subscription name.
        #[arg(value_parser = valid_subscription)]
        name: String,
        /// To the oldest record still stored.
        #[arg(long)]
        to_earliest: bool,
        /// To the committed end (skip everything not read yet).
        #[arg(long)]
        to_latest: bool,
        /// To this offset (within the stored log).
        #[arg(long, value_name = "N")]
        to_offset: Option<Offset>,
        /// Do it (without this, only show what it would do).
        #[arg(long)]
        execute: bool,
        /// With --execute, even while a consumer holds the subscription: that consumer is
        /// stopped with an error, so its position cannot undo the move.
        #[arg(long, requires = "execute")]
        force: bool,
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn subscription(client: Arc<Client>, cmd: SubscriptionCommand) -> Result<ExitCode> {
    match cmd {
        SubscriptionCommand::List { topic, json } => {
            let topic = topic_name(&topic)?;
            let subs = client.subscriptions(&topic).await?;
            if json {
                print_json(&json!(subs.iter().map(subscription_json).collect::<Vec<_>>()))?;
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "{:<24} {:>12} {:>10} {:>12} {:<20} CONSUMER",
                    "SUBSCRIPTION", "CURSOR", "LAG", "LAG BYTES", "LAST ACK"
                )?;
                for s in subs {
                    writeln!(
                        out,
                        "{:<24} {:>12} {:>10} {:>12} {:<20} {}",
                        s.name.as_str(),
                        s.cursor,
                        s.lag,
                        s.lag_bytes,
                        s.last_ack_ms.map(format_ms).unwrap_or_else(|| "-".into()),
                        s.consumer.as_deref().unwrap_or("-")
                    )?;
                }
            }
        }
        SubscriptionCommand::Create { topic, name, from, json } => {
            let (topic, name) = (topic_name(&topic)?, subscription_name(&name)?);
            let cursor = client.create_subscription(&topic, &name, from, false).await?;
            if json {
                print_json(&json!({ "topic": topic.as_str(), "name": name.as_str(), "cursor": cursor }))?;
            } else {
                eprintln!("created subscription {name} on {topic} at offset {cursor}");
            }
        }
        SubscriptionCommand::Delete { topic, name, force, json } => {
            let (topic, name) = (topic_name(&topic)?, subscription_name(&name)?);
            let (records, bytes) = client.delete_subscription(&topic, &name, force).await?;
            if json {
                print_json(&json!({
                    "topic": topic.as_str(),
                    "deleted": name.as_str(),
                    "freed_records": records,
                    "freed_bytes": bytes,
                }))?;
            } else {
                eprintln!(
                    "deleted subscription {name} of {topic}; freed {records} records ({bytes} bytes) no other subscription needed"
                );
            }
        }
        SubscriptionCommand::Reset {
            topic,
            name,
            to_earliest,
            to_latest,
            to_offset,
            execute,
            force,
            json,
        } => {
            let (topic, name) = (topic_name(&topic)?, subscription_name(&name)?);
            let to = match (to_earliest, to_latest, to_offset) {
                (true, _, _) => ResetTo::Earliest,
                (_, true, _) => ResetTo::Latest,
                (_, _, Some(o)) => ResetTo::Offset(o),
                _ => return Err(usage("say where: --to-earliest, --to-latest or --to-offset N")),
            };
            let r = client.reset_subscription(&topic, &name, to, execute, force).await?;
            let moved = if r.after >= r.before {
                format!("skips {} records", r.after - r.before)
            } else {
                format!("reads {} records again", r.before - r.after)
            };
            if json {
                print_json(&json!({
                    "topic": topic.as_str(),
                    "subscription": name.as_str(),
                    "cursor_before": r.before,
                    "cursor_after": r.after,
                    "log_start": r.log_start,
                    "commit": r.commit,
                    "executed": r.executed,
                }))?;
            } else if r.executed {
                eprintln!(
                    "reset subscription {name} of {topic} from offset {} to {}: it {moved}",
                    r.before, r.after
                );
            } else {
                eprintln!(
                    "would reset subscription {name} of {topic} from offset {} to {} (stored: {}..{}): it {moved}. Nothing changed; add --execute to do it",
                    r.before, r.after, r.log_start, r.commit
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn subscription_json(s: &SubscriptionInfo) -> serde_json::Value {
    json!({
        "name": s.name.as_str(),
        "cursor": s.cursor,
        "lag": s.lag,
        "lag_bytes": s.lag_bytes,
        "last_ack_ms": s.last_ack_ms,
        "consumer": s.consumer,
        "evicted": s.evicted,
        "evicted_at_ms": s.evicted_at_ms,
    })
}
