//! `herald acl`: give, take back and show grants (superusers only).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;

use crate::acl::{AclView, Grant, Grantee, Operation};
use crate::client::Client;

#[derive(Subcommand, Debug)]
pub enum AclCommand {
    /// Let PRINCIPAL (a client name, or `*` for every client) do OPERATION... on the topics
    /// whose names start with --topic.
    Grant(GrantArgs),
    /// Take back grants given with the same PRINCIPAL, OPERATION... and --topic.
    Revoke(GrantArgs),
    /// Show the grants and the superusers.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct GrantArgs {
    /// A client name (from its certificate, `herald:client:NAME`), or `*` for every client.
    principal: String,
    /// produce, consume, describe or admin (create, alter and delete topics; reset and
    /// delete subscriptions). Any grant on a topic also lets the principal look it up.
    #[arg(required = true, num_args = 1..)]
    operations: Vec<String>,
    /// A topic name prefix: `orders.` covers `orders.eu` and `orders.us`; `''` covers every topic.
    #[arg(long, value_name = "PREFIX")]
    topic: String,
}

impl GrantArgs {
    fn grants(&self) -> Result<Vec<Grant>> {
        let grantee = Grantee::parse(&self.principal)?;
        crate::types::check_text("--topic prefix", &self.topic, crate::types::MAX_NAME_BYTES)?;
        let mut grants = Vec::new();
        for op in &self.operations {
            let operation = Operation::parse(op)?;
            grants.push(Grant { grantee: grantee.clone(), operation, prefix: self.topic.clone() });
        }
        Ok(grants)
    }
}

pub async fn acl(client: Arc<Client>, cmd: AclCommand) -> Result<ExitCode> {
    let view = match cmd {
        AclCommand::Grant(args) => client.change_acl(args.grants()?, vec![]).await?,
        AclCommand::Revoke(args) => client.change_acl(vec![], args.grants()?).await?,
        AclCommand::List { json } => {
            let view = client.list_grants().await?;
            if json {
                print_json(&view)?;
            } else {
                print_table(&view)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    eprintln!("{} grants now; `herald acl list` shows them", view.acl.grants().count());
    Ok(ExitCode::SUCCESS)
}

fn print_json(view: &AclView) -> Result<()> {
    let grants: Vec<_> = view
        .acl
        .grants()
        .map(|g| json!({ "principal": g.grantee.to_string(), "operation": g.operation.as_str(), "topic_prefix": g.prefix }))
        .collect();
    super::print_json(&json!({ "superusers": view.superusers, "grants": grants }))
}

fn print_table(view: &AclView) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let supers: Vec<&str> = view.superusers.iter().map(String::as_str).collect();
    writeln!(
        out,
        "superusers: {}",
        if supers.is_empty() { "(none)".to_string() } else { supers.join(", ") }
    )?;
    writeln!(out, "{:<24} {:<10} TOPIC PREFIX", "PRINCIPAL", "OPERATION")?;
    for g in view.acl.grants() {
        let prefix = if g.prefix.is_empty() { "(every topic)".to_string() } else { g.prefix.clone() };
        writeln!(out, "{:<24} {:<10} {prefix}", g.grantee.to_string(), g.operation.as_str())?;
    }
    Ok(())
}
