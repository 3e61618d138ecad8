//! The `herald` command line.
//!
//! stdout carries data only (records, listings, JSON); progress, summaries and errors go to
//! stderr. Exit status: 0 on success, 1 on failure (for `produce`: any record not
//! acknowledged), 2 on a usage error.

mod acl;
mod status;
mod topics;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::certs;
use crate::client::{self, BatchAck, Client};
use crate::error::Error;
use crate::naming::core::MAX_REPLICAS;
use crate::naming::{self, NamingConfig};
use crate::server::{self, ServerConfig};
use crate::storage::Medium;
use crate::types::{NamingAddrs, Offset, ServerId, StartFrom, SubscriptionName, TopicName};
use crate::wire::{
    BacklogPolicy, Header, Record, ResetTo, StoredRecord, SubscriptionInfo, TopicChanges, TopicConfig,
    TopicInfo, DEFAULT_MAX_RECORD_BYTES,
};

#[derive(Parser, Debug)]
#[command(
    name = "herald",
    version,
    about = "Herald: a replicated, durable publish/subscribe log over QUIC + TLS"
)]
pub struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

/// Where clients look for the naming group unless told (`herald dev` listens there).
const DEFAULT_NAMING: &str = "127.0.0.1:7400,127.0.0.1:7410,127.0.0.1:7420";

/// `herald dev` puts naming member `i` (from 0) at the first --naming port plus this times
/// `i`, and topic servers on the ports right after the first: up to 9 of them fit between.
const DEV_NAMING_PORT_STEP: u16 = 10;

/// Where every command looks for certificates unless told.
const DEFAULT_CERTS: &str = "certs";

#[derive(Args, Debug, Clone)]
struct Common {
    /// The naming group's members, as HOST:PORT[,HOST:PORT...] (tried one after another,
    /// 250 ms apart, until one answers: the leader answers, the others name it; the default
    /// is where `herald dev` starts them).
    #[arg(long, global = true, env = "HERALD_NAMING", default_value = DEFAULT_NAMING)]
    naming: NamingAddrs,
    /// Directory with the cluster certificates (made by `herald certs`).
    #[arg(long, global = true, env = "HERALD_CERTS", default_value = DEFAULT_CERTS)]
    certs: PathBuf,
    /// How long a client command keeps retrying a cluster that does not answer (servers
    /// down, a leader moving in a failover) before it gives up with the last error, in
    /// seconds.
    #[arg(long, global = true, env = "HERALD_TIMEOUT", value_name = "SECS",
          default_value_t = client::DEFAULT_RETRY_DEADLINE.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Log filter for stderr, e.g. `info`, `debug`, `herald=trace` (default: info for
    /// `naming` and `server`, warn for everything else).
    #[arg(long, global = true, env = "HERALD_LOG")]
    log_level: Option<String>,
    /// Log lines as plain text, or as one JSON object per line (for log collectors).
    #[arg(long, global = true, env = "HERALD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Args, Debug, Clone)]
struct NamingRunArgs {
    /// Address to serve clients, topic servers and the other members on (UDP, QUIC).
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Data directory (the Raft log and snapshots of the book, in DIR/book.redb).
    #[arg(long, required = true)]
    data: Option<PathBuf>,
    /// This member's id in the naming group (one of --peers).
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// Every member of the naming group, this one included, as ID=HOST:PORT,... (e.g.
    /// 1=10.0.0.1:7400,2=10.0.0.2:7400,3=10.0.0.3:7400). The same list on every member;
    /// three or five members survive one or two failures. Without it, this naming server
    /// is a group of one.
    #[arg(long, value_parser = parse_peers, value_name = "ID=ADDR,...")]
    peers: Option<BTreeMap<u64, SocketAddr>>,
    /// Liveness lease of topic servers, in milliseconds: a leader silent this long is
    /// replaced by an election.
    #[arg(long, default_value_t = naming::DEFAULT_LEASE.as_millis() as u64)]
    lease_ms: u64,
    /// A replica dead this long is replaced by another live server, which copies the
    /// topic from the leader (milliseconds).
    #[arg(long, default_value_t = naming::DEFAULT_REPLACE_AFTER.as_millis() as u64)]
    replace_after_ms: u64,
    /// A topic's leadership goes back to its preferred leader (its first replica) once that
    /// server has been up this long and is caught up (milliseconds; default: 5 leases). 0:
    /// only when asked with `herald topic rebalance`.
    #[arg(long, value_name = "MS")]
    leader_return_ms: Option<u64>,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Comma-separated clients that may do everything; every other client may do only what
    /// `herald acl grant` gave it.
    #[arg(long, value_delimiter = ',', default_value = crate::certs::ADMIN_CLIENT)]
    superusers: Vec<String>,
    #[command(flatten)]
    limits: crate::transport::limits::LimitArgs,
}

#[derive(Subcommand, Debug)]
enum ServersAction {
    /// Retire a server gone for good (superusers only): it must be dead and hold no replica
    /// any more (they move to live servers --replace-after-ms after it died).
    Remove { id: ServerId },
}

#[derive(Subcommand, Debug)]
enum CertsAction {
    /// Sign a certificate for one identity with the CA kept in --dir (its `ca/` directory),
    /// into a directory that works as `--certs` for that identity.
    Issue {
        #[command(subcommand)]
        who: IssueWho,
        /// The directory `herald certs` made, where the CA key is (default: the --certs directory).
        #[arg(long, global = true)]
        dir: Option<PathBuf>,
        /// Where to write (default: DIR/client-NAME, DIR/node-ID or DIR/naming).
        #[arg(long, global = true)]
        out: Option<PathBuf>,
        /// Comma-separated host names and IP addresses a server certificate is valid for.
        #[arg(long, global = true, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        hosts: Vec<String>,
        /// Replace that identity's certificate if it is there (never the CA).
        #[arg(long, global = true)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum IssueWho {
    /// An application or person: the principal NAME that ACLs grant to.
    Client { name: String },
    /// The topic server with this id: it may register only as that id.
    Node { id: ServerId },
    /// The naming group's members.
    Naming,
}

#[derive(Subcommand, Debug)]
enum NamingAction {
    /// Show each member of the naming group (those given with --naming): role, term, last
    /// log index, applied index, and which one leads.
    Status {
        /// One JSON object instead of text (every name listed).
        #[arg(long)]
        json: bool,
    },
}

/// Parses `--peers`: `ID=HOST:PORT` pairs separated by commas.
fn parse_peers(s: &str) -> std::result::Result<BTreeMap<u64, SocketAddr>, String> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| format!("{part:?} is not ID=HOST:PORT"))?;
        let id: u64 =
            id.trim().parse().map_err(|_| format!("{id:?} is not a member id (a number above 0)"))?;
        if id == 0 {
            return Err("member ids start at 1".into());
        }
        let addr: crate::types::NamingAddrs = addr.trim().parse()?;
        if peers.insert(id, addr.first()).is_some() {
            return Err(format!("member {id} is listed twice"));
        }
    }
    if peers.is_empty() {
        return Err("no members given".into());
    }
    Ok(peers)
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a new cluster CA with the quick-start identities (the `admin` client, the naming
    /// group, topic servers 1..=N), or issue another identity with the existing CA.
    #[command(args_conflicts_with_subcommands = true)]
    Certs {
        #[command(subcommand)]
        action: Option<CertsAction>,
        /// Where to write them (default: the --certs directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Comma-separated host names and IP addresses the server certificates are valid for.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        hosts: Vec<String>,
        /// Topic server identities to make (node-1 ... node-N).
        #[arg(long, default_value_t = certs::DEFAULT_DEV_SERVERS)]
        servers: u16,
        /// Replace an existing CA (every process must then get new files).
        #[arg(long)]
        force: bool,
    },
    /// Run a naming server (one member of the naming group), or ask the group how it is.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Naming {
        #[command(subcommand)]
        action: Option<NamingAction>,
        #[command(flatten)]
        run: NamingRunArgs,
    },
    /// Run a topic server.
    Server {
        #[arg(long, default_value = "127.0.0.1:7401")]
        listen: SocketAddr,
        /// Data directory (records, cursors and producer state in DIR/herald.redb).
        #[arg(long)]
        data: PathBuf,
        /// Server id; kept in the data directory (default: the stored one, or a new random one).
        #[arg(long)]
        id: Option<ServerId>,
        /// Address others reach this server at (default: --listen).
        #[arg(long)]
        advertise: Option<SocketAddr>,
        /// A consumer keeps its subscription this long after its last request (one consumer
        /// per subscription at a time), in milliseconds.
        #[arg(long, default_value_t = server::DEFAULT_SESSION_LEASE.as_millis() as u64)]
        session_lease_ms: u64,
        /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
        /// Testing only: hold writes in memory until fsynced, so that `kill -9` loses what a
        /// power cut would.
        #[arg(long, hide = true)]
        volatile_writes: bool,
        #[command(flatten)]
        limits: crate::transport::limits::LimitArgs,
    },
    /// Print a shell completion script, e.g. `herald completions bash >
    /// /etc/bash_completion.d/herald`, or `source <(herald completions zsh)`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Run a naming group and N topic servers on loopback, in the foreground (Ctrl-C stops).
    Dev {
        #[arg(long, default_value_t = 3)]
        servers: u16,
        /// Naming servers (members of the naming group): 3 survive the loss of one; 1 is
        /// the smallest cluster.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=5))]
        naming_servers: u16,
        /// Data directory of the dev cluster.
        #[arg(long, default_value = ".herald")]
        dir: PathBuf,
    },
    /// List the topic servers the naming server knows, with liveness and topic count; or
    /// retire one gone for good.
    #[command(args_conflicts_with_subcommands = true)]
    Servers {
        #[command(subcommand)]
        action: Option<ServersAction>,
        #[arg(long)]
        json: bool,
    },
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Create, list and delete subscriptions.
    #[command(subcommand)]
    Subscription(SubscriptionCommand),
    /// Show or change the JSON Schema a topic's records must follow.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Give, take back and show who may do what (superusers only).
    #[command(subcommand)]
    Acl(acl::AclCommand),
    /// The cluster at a glance: the naming group, the servers, the topics and the
    /// subscriptions' lag; exits 1 when something needs attention (no naming leader, a dead
    /// server, a topic without a live leader or with a replica on a dead server).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Publish one record per line of stdin.
    Produce(ProduceArgs),
    /// Read records through a durable subscription, one per line on stdout.
    Consume(ConsumeArgs),
    /// Measure throughput, latency, CPU and failover time (see docs/performance.md).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

#[derive(Subcommand, Debug)]
enum TopicCommand {
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
struct BacklogArgs {
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
enum SchemaCommand {
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

#[derive(Subcommand, Debug)]
enum SubscriptionCommand {
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

#[derive(Args, Debug)]
struct ProduceArgs {
    /// Topic name.
    #[arg(value_parser = valid_topic)]
    topic: String,
    /// Key of every record.
    #[arg(short, long)]
    key: Option<String>,
    /// Header of every record, as NAME=VALUE (repeatable).
    #[arg(short = 'H', long = "header", value_parser = parse_header)]
    headers: Vec<Header>,
    /// Stop after N records.
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Batches in flight.
    #[arg(long, default_value_t = client::DEFAULT_INFLIGHT)]
    inflight: usize,
}

#[derive(Args, Debug)]
struct ConsumeArgs {
    /// Topic name.
    #[arg(value_parser = valid_topic)]
    topic: String,
    /// The durable subscription to read through (created if missing, see --from).
    #[arg(short, long, value_parser = valid_subscription)]
    subscription: String,
    /// Where a new subscription starts (an existing one resumes at its cursor).
    #[arg(long, default_value = "earliest")]
    from: StartFrom,
    /// Stop after N records (waiting for them if needed).
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Keep waiting for new records (Ctrl-C stops), like `tail -f`.
    #[arg(short, long)]
    follow: bool,
    /// Output template: {offset}, {timestamp} (ms), {time} (RFC 3339), {key}, {value},
    /// {size}, {headers}; \t and \n are escapes; a newline follows unless it ends with one.
    #[arg(long, default_value = "{value}", value_parser = valid_format)]
    format: String,
    /// One JSON object per record instead of --format: offset, timestamp_ms, key (null when
    /// empty), headers, value; bytes that are not UTF-8 come as base64 under `key_base64`,
    /// `value_base64` or `NAME_base64`.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// Read from the topic's leader, or from one of its replicas picked by the
    /// subscription's name (up to the commit point it knows; acks still go to the leader).
    #[arg(long, value_enum, default_value = "leader")]
    read_from: crate::client::ReadFrom,
    /// Look without moving the cursor: read from the subscription's cursor and acknowledge
    /// nothing (an existing subscription only: none is created). Safe with `| head`.
    #[arg(long)]
    peek: bool,
}

fn parse_header(s: &str) -> Result<Header, String> {
    let (name, value) = s.split_once('=').ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))?;
    Ok(Header { name: name.to_string(), value: value.as_bytes().to_vec() })
}

/// Entry point of the `herald` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Servers log their life at info; `dev` and client commands only warn, so the dev
    // banner and command output stay readable.
    let is_server = matches!(cli.command, Command::Naming { .. } | Command::Server { .. });
    init_logging(
        cli.common.log_level.as_deref().unwrap_or(if is_server { "info" } else { "warn" }),
        cli.common.log_format,
    );
    // A naming member does little, often (Raft ticks, liveness pings, heartbeats): one
    // thread does it with fewer wake-ups than a pool, whose idle workers park and unpark
    // for each (about a third of an idle member's CPU).
    let mut builder = match cli.command {
        Command::Naming { .. } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(USAGE_EXIT)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status after Ctrl-C (128 + SIGINT, as shells report it).
const INTERRUPTED_EXIT: u8 = 130;

/// How long an interrupted `produce` still waits for the acknowledgements of what it sent.
const INTERRUPTED_ACK_WAIT: Duration = Duration::from_secs(5);

/// Exit status of a command called wrongly (as clap's own usage errors exit).
const USAGE_EXIT: u8 = 2;

/// A mistake in how a command was called, found after clap parsed it: exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    UsageError(e.to_string()).into()
}

/// `word` for one, `words` for any other count.
fn plural(n: impl Into<u64>, word: &str) -> String {
    if n.into() == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: bad --log-level {filter:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    // Colour only for a person at a terminal: log files and pipes get plain text (and
    // NO_COLOR, https://no-color.org, turns it off there too).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => {
            logs.json().flatten_event(true).with_current_span(false).with_span_list(true).init()
        }
    }
}

/// A token cancelled on Ctrl-C or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    token
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let common = cli.common;
    match cli.command {
        Command::Certs { action: None, dir, hosts, servers, force } => {
            let dir = dir.unwrap_or(common.certs.clone());
            certs::generate(&dir, &hosts, servers, force)?;
            eprintln!(
                "wrote to {}: the cluster CA (its key in ca/: keep it off servers and clients), the `{}` client, naming/ and node-1/..node-{servers}/",
                dir.display(),
                certs::ADMIN_CLIENT
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs { action: Some(CertsAction::Issue { who, dir, out, hosts, force }), .. } => {
            let dir = dir.unwrap_or(common.certs.clone());
            let who = match who {
                IssueWho::Client { name } => {
                    certs::check_client_name(&name)?;
                    certs::Principal::Client(name)
                }
                IssueWho::Node { id: 0 } => return Err(usage("server ids start at 1".to_string())),
                IssueWho::Node { id } => certs::Principal::Node(id),
                IssueWho::Naming => certs::Principal::Naming,
            };
            let written = certs::issue(&dir, &who, &hosts, out.as_deref(), force)?;
            eprintln!(
                "wrote {who}'s certificate to {} (use it as --certs {})",
                written.display(),
                written.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Naming { action: Some(NamingAction::Status { json }), .. } => {
            naming_status(&common, json).await
        }
        Command::Naming { action: None, run } => {
            let peers = run.peers.unwrap_or_else(|| BTreeMap::from([(run.id, run.listen)]));
            if !peers.contains_key(&run.id) {
                return Err(usage(format!(
                    "--id {} is not one of --peers ({})",
                    run.id,
                    peers.keys().map(u64::to_string).collect::<Vec<_>>().join(", ")
                )));
            }
            let config = NamingConfig {
                id: run.id,
                peers,
                listen: run.listen,
                data_dir: run.data.expect("clap requires --data"),
                certs_dir: common.certs,
                lease: Duration::from_millis(run.lease_ms),
                replace_after: Duration::from_millis(run.replace_after_ms),
                leader_return: match run.leader_return_ms {
                    Some(0) => None,
                    Some(ms) => Some(Duration::from_millis(ms)),
                    None => Some(Duration::from_millis(run.lease_ms * naming::core::PREFERRED_RETURN_LEASES)),
                },
                metrics_listen: run.metrics_listen,
                limits: (&run.limits).into(),
                superusers: superusers(&run.superusers)?,
            };
            naming::run(config, shutdown_on_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Server {
            listen,
            data,
            id,
            advertise,
            session_lease_ms,
            metrics_listen,
            volatile_writes,
            limits,
        } => {
            let config = ServerConfig {
                id,
                listen,
                advertise,
                naming: common.naming,
                data_dir: data,
                certs_dir: common.certs,
                session_lease: Duration::from_millis(session_lease_ms),
                metrics_listen,
                medium: if volatile_writes { Medium::VolatileFile } else { Medium::File },
                limits: (&limits).into(),
            };
            server::run(config, shutdown_on_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            // Written whole from memory: clap_complete panics on a write error, and
            // `herald completions bash | head` closes the pipe early, which is no error.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "herald", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Dev { servers, naming_servers, dir } => dev(&common, servers, naming_servers, &dir).await,
        Command::Servers { action: None, json } => with_client(&common, |c| list_servers(c, json)).await,
        Command::Servers { action: Some(ServersAction::Remove { id }), .. } => {
            with_client(&common, |c| async move {
                c.remove_server(id).await?;
                eprintln!("retired server {id}");
                Ok(ExitCode::SUCCESS)
            })
            .await
        }
        Command::Topic(cmd) => with_client(&common, |c| topic(c, cmd)).await,
        Command::Subscription(cmd) => with_client(&common, |c| subscription(c, cmd)).await,
        Command::Schema(cmd) => with_client(&common, |c| schema(c, cmd)).await,
        Command::Acl(cmd) => with_client(&common, |c| acl::acl(c, cmd)).await,
        Command::Status { json } => with_client(&common, |c| status::status(c, json)).await,
        Command::Produce(args) => with_client(&common, |c| produce(c, args)).await,
        Command::Consume(args) => with_client(&common, |c| consume(c, args)).await,
        Command::Bench(cmd) => {
            crate::bench::run(cmd, common.naming, &common.certs).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn with_client<F, Fut>(common: &Common, f: F) -> Result<ExitCode>
where
    F: FnOnce(Arc<Client>) -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode>>,
{
    let client = connect(common)?;
    let result = f(client.clone()).await;
    client.close().await;
    result
}

/// clap's check of `--format`.
fn valid_format(s: &str) -> Result<String, String> {
    Formatter::new(s).map(|_| s.to_string()).map_err(|e| format!("{e:#}"))
}

/// clap's check of `--replicas`.
fn parse_replicas(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number between 1 and {MAX_REPLICAS}")),
    }
}

/// clap's check of a topic name: a bad one is a usage error before anything connects.
fn valid_topic(s: &str) -> Result<String, String> {
    TopicName::new(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// clap's check of a subscription name.
fn valid_subscription(s: &str) -> Result<String, String> {
    SubscriptionName::new(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

fn topic_name(s: &str) -> Result<TopicName> {
    TopicName::new(s).map_err(usage)
}

fn subscription_name(s: &str) -> Result<SubscriptionName> {
    SubscriptionName::new(s).map_err(usage)
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn topic_json(info: &TopicInfo, status: Option<&crate::wire::TopicStatus>) -> serde_json::Value {
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

async fn schema(client: Arc<Client>, cmd: SchemaCommand) -> Result<ExitCode> {
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

/// A client of the cluster --naming names, retrying for --timeout.
fn connect(common: &Common) -> Result<Arc<Client>> {
    let mut client = Client::new(common.naming.clone(), &common.certs)?;
    client.set_retry_deadline(Duration::from_secs(common.timeout));
    Ok(client)
}

/// `herald naming status`: asks every address of --naming how its member sees the group.
async fn naming_status(common: &Common, json: bool) -> Result<ExitCode> {
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

async fn list_servers(client: Arc<Client>, json: bool) -> Result<ExitCode> {
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

async fn topic(client: Arc<Client>, cmd: TopicCommand) -> Result<ExitCode> {
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

async fn subscription(client: Arc<Client>, cmd: SubscriptionCommand) -> Result<ExitCode> {
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

fn subscription_json(s: &SubscriptionInfo) -> serde_json::Value {
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

/// A time in ms since the Unix epoch as UTC `YYYY-MM-DD HH:MM:SS`.
fn format_ms(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Reads stdin in the background and hands over batches of lines. A batch holds whatever
/// one read returned (so an interactive line goes out at once, and a pipe fills batches).
fn read_stdin_batches(
    template: Record,
    limit: Option<u64>,
    max_record_bytes: usize,
    tx: mpsc::Sender<Result<Vec<Record>, Error>>,
) {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut carry: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut taken = 0u64;
    let mut batch: Vec<Record> = Vec::new();
    let mut batch_bytes = 0usize;
    let make = |line: &[u8]| {
        let mut r = template.clone();
        r.payload = line.to_vec();
        r
    };
    'read: loop {
        if limit.is_some_and(|l| taken >= l) {
            break;
        }
        let n = match input.read(&mut chunk) {
            Ok(0) => {
                if !carry.is_empty() {
                    let line = std::mem::take(&mut carry);
                    batch.push(make(&line));
                }
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.blocking_send(Err(Error::invalid(format!("reading stdin: {e}"))));
                break;
            }
        };
        let mut data = &chunk[..n];
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            let line: &[u8] = if carry.is_empty() {
                &data[..pos]
            } else {
                carry.extend_from_slice(&data[..pos]);
                &carry
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let record = make(line);
            carry.clear();
            data = &data[pos + 1..];
            if record.encoded_size() > max_record_bytes {
                let err = Error::RecordTooLarge {
                    index: taken as u32,
                    size: record.encoded_size() as u64,
                    limit: max_record_bytes as u64,
                    enforced_by: "the client (the topic's max_record_bytes)".into(),
                };
                if tx.blocking_send(Err(err)).is_err() {
                    return;
                }
            } else {
                batch_bytes += record.encoded_size();
                batch.push(record);
            }
            taken += 1;
            if batch.len() >= client::MAX_BATCH_RECORDS || batch_bytes >= client::MAX_BATCH_BYTES {
                if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                    return;
                }
                batch_bytes = 0;
            }
            if limit.is_some_and(|l| taken >= l) {
                break 'read;
            }
        }
        carry.extend_from_slice(data);
        if !batch.is_empty() {
            if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                return;
            }
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
}

async fn produce(client: Arc<Client>, args: ProduceArgs) -> Result<ExitCode> {
    let topic = topic_name(&args.topic)?;
    let info = client.lookup(&topic).await?;
    let template = Record {
        key: args.key.map(|k| k.into_bytes()).unwrap_or_default(),
        headers: args.headers,
        payload: Vec::new(),
    };
    let (tx, mut batches) = mpsc::channel(4);
    let limit = args.count;
    let max = info.config.max_record_bytes as usize;
    std::thread::spawn(move || read_stdin_batches(template, limit, max, tx));

    let producer = client.producer(topic.clone(), args.inflight);
    let (acks_tx, mut acks_rx) =
        mpsc::unbounded_channel::<(usize, oneshot::Receiver<Result<BatchAck, Error>>)>();
    let collector = tokio::spawn(async move {
        let (mut acked, mut failed, mut first, mut last) = (0u64, 0u64, None::<Offset>, None::<Offset>);
        let mut errors: Vec<String> = Vec::new();
        while let Some((n, rx)) = acks_rx.recv().await {
            match rx.await {
                Ok(Ok(ack)) => {
                    acked += ack.count as u64;
                    if ack.count > 0 {
                        first.get_or_insert(ack.base);
                        last = Some(ack.base + ack.count as u64 - 1);
                    }
                }
                Ok(Err(e)) => {
                    failed += n as u64;
                    errors.push(e.to_string());
                }
                Err(_) => {
                    failed += n as u64;
                    errors.push("the producer stopped before the batch was acknowledged".into());
                }
            }
        }
        (acked, failed, first, last, errors)
    });
    let mut rejected = 0u64;
    let mut rejections = Vec::new();
    // Ctrl-C stops reading input; what was sent is still waited for (a while) and counted.
    let stop = shutdown_on_signal();
    loop {
        let batch = tokio::select! {
            b = batches.recv() => b,
            _ = stop.cancelled() => None,
        };
        let Some(batch) = batch else { break };
        match batch {
            Ok(records) => {
                let n = records.len();
                let rx = producer.send(records).await?;
                let _ = acks_tx.send((n, rx));
            }
            Err(e) => {
                rejected += 1;
                if rejections.len() < 5 {
                    rejections.push(e.to_string());
                }
            }
        }
    }
    drop(acks_tx);
    let interrupted = stop.is_cancelled();
    let drained = async {
        producer.close().await;
        collector.await
    };
    let (acked, failed, first, last, mut errors) = if interrupted {
        match tokio::time::timeout(INTERRUPTED_ACK_WAIT, drained).await {
            Ok(outcome) => outcome?,
            Err(_) => {
                eprintln!(
                    "interrupted: gave up waiting for acknowledgements after {INTERRUPTED_ACK_WAIT:?}; records sent but not acknowledged may or may not be stored"
                );
                return Ok(ExitCode::from(INTERRUPTED_EXIT));
            }
        }
    } else {
        drained.await?
    };
    errors.extend(rejections);
    errors.dedup();
    for e in errors.iter().take(5) {
        eprintln!("error: {e}");
    }
    let range = match (first, last) {
        (Some(a), Some(b)) => format!(" (offsets {a}..{b})"),
        _ => String::new(),
    };
    eprintln!("produced {acked} {} to {topic}{range}", plural(acked, "record"));
    if interrupted {
        eprintln!("interrupted: input after these was not read");
        return Ok(ExitCode::from(INTERRUPTED_EXIT));
    }
    let not_acked = failed + rejected;
    if not_acked > 0 {
        eprintln!("error: {not_acked} records were not acknowledged");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Formats records per the `--format` template.
struct Formatter {
    parts: Vec<Part>,
    /// Whether a newline follows each record: yes, unless the template ends with one (as a
    /// kcat `-f '%s\n'` does), so neither way prints blank lines.
    newline: bool,
}

enum Part {
    Text(Vec<u8>),
    Offset,
    Timestamp,
    Time,
    Key,
    Value,
    Size,
    Headers,
}

/// The fields `--format` knows, as its error lists them.
const FORMAT_FIELDS: &str = "{offset}, {timestamp} (ms), {time} (RFC 3339, UTC), {key}, {value}, {size} (value bytes), {headers} (name=value,...)";

impl Formatter {
    fn new(template: &str) -> Result<Self> {
        let unescaped = template.replace("\\t", "\t").replace("\\n", "\n");
        let mut parts = Vec::new();
        let mut rest = unescaped.as_str();
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest.as_bytes()[..open].to_vec()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| usage(format!("--format: unclosed '{{' in {template:?}")))?
                + open;
            parts.push(match &rest[open + 1..close] {
                "offset" => Part::Offset,
                "timestamp" => Part::Timestamp,
                "time" => Part::Time,
                "key" => Part::Key,
                "value" => Part::Value,
                "size" => Part::Size,
                "headers" => Part::Headers,
                other => {
                    return Err(usage(format!("--format: unknown field {{{other}}}; use {FORMAT_FIELDS}")))
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.as_bytes().to_vec()));
        }
        Ok(Self { parts, newline: !unescaped.ends_with('\n') })
    }

    fn write(&self, out: &mut impl Write, r: &StoredRecord) -> std::io::Result<()> {
        for p in &self.parts {
            match p {
                Part::Text(t) => out.write_all(t)?,
                Part::Offset => write!(out, "{}", r.offset)?,
                Part::Timestamp => write!(out, "{}", r.timestamp_ms)?,
                Part::Time => out.write_all(rfc3339_ms(r.timestamp_ms).as_bytes())?,
                Part::Key => out.write_all(&r.record.key)?,
                Part::Value => out.write_all(&r.record.payload)?,
                Part::Size => write!(out, "{}", r.record.payload.len())?,
                Part::Headers => {
                    for (i, h) in r.record.headers.iter().enumerate() {
                        if i > 0 {
                            out.write_all(b",")?;
                        }
                        write!(out, "{}=", h.name)?;
                        out.write_all(&h.value)?;
                    }
                }
            }
        }
        if self.newline {
            out.write_all(b"\n")?;
        }
        Ok(())
    }
}

/// A record timestamp in RFC 3339, UTC, to the millisecond: `2026-12-02T05:52:07.123Z`.
fn rfc3339_ms(ms: u64) -> String {
    format!("{}.{:03}Z", format_ms(ms).replace(' ', "T"), ms % 1000)
}

/// A record as `consume --json` prints it. Bytes that are UTF-8 are strings; others go as
/// base64 under the field's name with `_base64` (nothing is lost); an empty key is `null`.
fn record_json(r: &StoredRecord) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    o.insert("offset".into(), json!(r.offset));
    o.insert("timestamp_ms".into(), json!(r.timestamp_ms));
    if r.record.key.is_empty() {
        o.insert("key".into(), serde_json::Value::Null);
    } else {
        put_bytes(&mut o, "key", &r.record.key);
    }
    let mut headers = serde_json::Map::new();
    for h in &r.record.headers {
        put_bytes(&mut headers, &h.name, &h.value);
    }
    o.insert("headers".into(), headers.into());
    put_bytes(&mut o, "value", &r.record.payload);
    o.into()
}

/// `name: "text"` for UTF-8 bytes, else `name_base64: "..."`.
fn put_bytes(o: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: &[u8]) {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(text) => o.insert(name.to_string(), json!(text)),
        Err(_) => {
            o.insert(format!("{name}_base64"), json!(base64::engine::general_purpose::STANDARD.encode(bytes)))
        }
    };
}

async fn consume(client: Arc<Client>, args: ConsumeArgs) -> Result<ExitCode> {
    let topic = topic_name(&args.topic)?;
    let subscription = subscription_name(&args.subscription)?;
    let formatter = Formatter::new(&args.format)?;
    // Created here from the earliest record, past records already deleted: say why it starts
    // where it does, or a second subscriber sees nothing and no word of it.
    // A peek changes nothing: it neither creates a subscription nor moves one.
    if !args.peek {
        match client.create_subscription(&topic, &subscription, args.from, false).await {
            Ok(start) if start > 0 && args.from == StartFrom::Earliest => eprintln!(
                "subscription {subscription} starts at offset {start}: offsets 0..{} of {topic} were deleted once every subscription had read them (records are kept for the subscriptions that exist when they are produced)",
                start - 1
            ),
            Ok(_) | Err(Error::SubscriptionExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let consumer = if args.peek {
        client.existing_consumer(topic.clone(), subscription.clone())
    } else {
        client.consumer(topic.clone(), subscription.clone(), args.from).await?
    };
    let mut consumer = consumer.read_from(args.read_from);
    let stop = shutdown_on_signal();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    let (mut written, mut first, mut pending_ack) = (0u64, None::<Offset>, None::<Offset>);
    // One past the last record written to stdout.
    let mut delivered = None::<Offset>;
    let waits = args.follow || args.count.is_some();
    let started = Instant::now();
    let mut broken_pipe = false;
    loop {
        let remaining = args.count.map(|c| c - written);
        if remaining == Some(0) {
            break;
        }
        let want = remaining.unwrap_or(u64::MAX).min(client::MAX_BATCH_RECORDS as u64) as u32;
        let wait = if waits { Duration::from_secs(1) } else { Duration::ZERO };
        let polled = tokio::select! {
            r = consumer.poll(want, wait, pending_ack) => r,
            _ = stop.cancelled() => break,
        };
        let records = polled?;
        pending_ack = None;
        if let Some(e) = consumer.take_evicted() {
            eprintln!(
                "warning: {} records of {topic} were evicted from subscription {subscription} before it read them (backlog limit reached, policy evict; last at {} UTC); going on from offset {}",
                e.records,
                format_ms(e.at_ms),
                e.resume_at
            );
        }
        if records.is_empty() {
            if waits {
                continue;
            }
            break;
        }
        let take = records.len().min(remaining.unwrap_or(u64::MAX) as usize);
        let mut result = Ok(());
        for r in &records[..take] {
            result = if args.json {
                serde_json::to_writer(&mut out, &record_json(r))
                    .map_err(std::io::Error::from)
                    .and_then(|_| out.write_all(b"\n"))
            } else {
                formatter.write(&mut out, r)
            };
            if result.is_err() {
                break;
            }
        }
        // Commit the cursor only after the records reached stdout.
        if let Err(e) = result.and_then(|_| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                broken_pipe = true;
                break;
            }
            return Err(anyhow!(e).context("writing to stdout"));
        }
        first.get_or_insert(records[0].offset);
        written += take as u64;
        delivered = Some(records[take - 1].offset + 1);
        pending_ack = delivered.filter(|_| !args.peek);
    }
    // Acks sent ahead with polls are not awaited there; finish with one that is, covering
    // everything written (acks are cumulative), so the cursor is committed before we exit.
    if let Some(next) = delivered.filter(|_| !args.peek) {
        consumer.close(); // a poll may have been cut short; ack on a fresh stream
        consumer.ack(next).await.context("acknowledging consumed records")?;
    }
    let position = consumer.position();
    consumer.release().await;
    if !broken_pipe {
        let range = match (first, delivered.or(position)) {
            (Some(a), Some(b)) if b > a => format!(" (offsets {a}..{})", b - 1),
            _ => String::new(),
        };
        let secs = started.elapsed().as_secs_f64();
        let (verb, unmoved) =
            if args.peek { ("peeked at", "; its cursor did not move") } else { ("consumed", "") };
        eprintln!(
            "{verb} {written} {} from {topic} via {subscription}{range} in {secs:.2}s{unmoved}",
            plural(written, "record")
        );
    }
    // Stopped by Ctrl-C before --count was reached: not the success a script may wait for.
    if stop.is_cancelled() && args.count.is_some_and(|c| written < c) {
        eprintln!("interrupted before {} records", args.count.unwrap_or_default());
        return Ok(ExitCode::from(INTERRUPTED_EXIT));
    }
    Ok(ExitCode::SUCCESS)
}

/// The addresses of `herald dev`'s naming members, from the first --naming address.
fn dev_naming_addrs(first: SocketAddr, members: u16) -> Vec<SocketAddr> {
    (0..members).map(|i| SocketAddr::new(first.ip(), first.port() + i * DEV_NAMING_PORT_STEP)).collect()
}

/// Checks that `herald dev` can have its ports and data directory before it starts anything:
/// a second dev cluster must fail at once and say why, not print a banner for the first one.
fn dev_preflight(dir: &Path, naming: &[SocketAddr], servers: u16) -> Result<()> {
    let first = naming[0];
    let topic_servers = (1..=servers).map(|i| SocketAddr::new(first.ip(), first.port() + i));
    for addr in naming.iter().copied().chain(topic_servers) {
        if let Err(e) = std::net::UdpSocket::bind(addr) {
            bail!("cannot listen on {addr} ({e}): is another `herald dev` running? Stop it, or give this one other ports with --naming HOST:PORT");
        }
    }
    let files = (1..=naming.len())
        .map(|i| dir.join(format!("naming-{i}")).join(naming::BOOK_FILE))
        .chain((1..=servers).map(|i| dir.join(format!("server-{i}")).join("herald.redb")));
    for file in files.filter(|f| f.exists()) {
        if let Err(redb::DatabaseError::DatabaseAlreadyOpen) = redb::Database::open(&file) {
            bail!(
                "{} is in use by another herald process (another `herald dev`?): stop it, or give this one another --dir",
                file.display()
            );
        }
    }
    Ok(())
}

/// `--superusers`: client names (empty entries skipped).
fn superusers(names: &[String]) -> Result<std::collections::BTreeSet<String>> {
    let mut set = std::collections::BTreeSet::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        certs::check_client_name(name).map_err(|e| usage(format!("--superusers: {e}")))?;
        set.insert(name.to_string());
    }
    Ok(set)
}

/// `herald dev`: a naming group of `naming_servers` members and `servers` topic servers on
/// loopback, in this process.
async fn dev(common: &Common, servers: u16, naming_servers: u16, dir: &Path) -> Result<ExitCode> {
    if servers == 0 || servers >= DEV_NAMING_PORT_STEP {
        return Err(usage(format!("--servers must be 1..={}", DEV_NAMING_PORT_STEP - 1)));
    }
    let made = !certs::exist(&common.certs);
    certs::ensure_dev(&common.certs, servers)
        .with_context(|| format!("making certificates in {}", common.certs.display()))?;
    if made {
        eprintln!("made certificates in {}", common.certs.display());
    }
    let first = common.naming.first();
    let naming_addrs = dev_naming_addrs(first, naming_servers);
    dev_preflight(dir, &naming_addrs, servers)?;
    let naming_list = NamingAddrs::new(naming_addrs.clone()).context("--naming-servers is at least 1")?;
    let shutdown = shutdown_on_signal();
    let mut tasks = tokio::task::JoinSet::new();
    let peers: BTreeMap<u64, SocketAddr> = (1..).zip(naming_addrs.iter().copied()).collect();
    for (&id, &listen) in &peers {
        let naming_config = NamingConfig {
            id,
            peers: peers.clone(),
            ..NamingConfig::alone(listen, dir.join(format!("naming-{id}")), common.certs.clone())
        };
        tasks.spawn(naming::run(naming_config, shutdown.clone()));
    }
    for i in 1..=servers {
        let listen = SocketAddr::new(first.ip(), first.port() + i);
        let config = ServerConfig {
            id: Some(i as ServerId),
            listen,
            advertise: None,
            naming: naming_list.clone(),
            data_dir: dir.join(format!("server-{i}")),
            certs_dir: common.certs.clone(),
            session_lease: server::DEFAULT_SESSION_LEASE,
            metrics_listen: None,
            medium: Medium::File,
            limits: Default::default(),
        };
        tasks.spawn(server::run(config, shutdown.clone()));
    }
    // Wait until every server has registered, so the printed commands work right away.
    let client = Client::new(naming_list.clone(), &common.certs)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alive = client.list_servers().await.map(|s| s.iter().filter(|s| s.alive).count()).unwrap_or(0);
        if alive >= servers as usize {
            break;
        }
        if Instant::now() > deadline || shutdown.is_cancelled() {
            bail!("the dev cluster did not come up: {alive} of {servers} servers registered");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            Some(r) = tasks.join_next() => { r??; bail!("a dev cluster process stopped early"); }
        }
    }
    client.close().await;
    let last = first.port() + servers;
    eprintln!(
        "Herald dev cluster: naming {} {naming_list}, topic servers {}:{}-{last}; data in {}, certificates in {}",
        if naming_servers == 1 { "server" } else { "group" },
        first.ip(),
        first.port() + 1,
        dir.display(),
        common.certs.display()
    );
    eprintln!("Try, in another terminal (with ./target/release on your PATH):");
    if naming_list.to_string() != DEFAULT_NAMING.parse::<NamingAddrs>().map_err(|e| anyhow!(e))?.to_string() {
        eprintln!("  export HERALD_NAMING={naming_list}");
    }
    if common.certs != Path::new(DEFAULT_CERTS) {
        let certs = std::fs::canonicalize(&common.certs).unwrap_or_else(|_| common.certs.clone());
        eprintln!("  export HERALD_CERTS={}", certs.display());
    }
    eprintln!("  herald topic create demo");
    eprintln!("  seq 1 100000 | herald produce demo");
    eprintln!("  herald consume demo --subscription s1 --count 100000");
    eprintln!("Ctrl-C stops the cluster.");
    let mut failure = None;
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) | Err(e) = r.map_err(anyhow::Error::from) {
            failure.get_or_insert(e);
            shutdown.cancel();
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    eprintln!("dev cluster stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: Offset, key: &str, value: &str) -> StoredRecord {
        StoredRecord {
            offset,
            timestamp_ms: 7,
            record: Record { key: key.into(), headers: vec![], payload: value.into() },
        }
    }

    #[test]
    fn format_template_fills_fields_and_escapes() {
        let f = Formatter::new("{offset}\\t{key}\\t{value}").unwrap();
        let mut out = Vec::new();
        f.write(&mut out, &record(3, "k", "v")).unwrap();
        assert_eq!(out, b"3\tk\tv\n");
        assert!(Formatter::new("{nope}").is_err());
        // A template ending in a newline (as kcat users write them) gets no second one.
        let mut out = Vec::new();
        Formatter::new("{value}\\n").unwrap().write(&mut out, &record(3, "k", "v")).unwrap();
        assert_eq!(out, b"v\n");
        let mut r = record(4, "k", "value");
        r.timestamp_ms = 1_796_190_727_123;
        r.record.headers = vec![
            crate::types::Header { name: "a".into(), value: b"1".to_vec() },
            crate::types::Header { name: "b".into(), value: b"2".to_vec() },
        ];
        let mut out = Vec::new();
        Formatter::new("{time} {size} {headers}").unwrap().write(&mut out, &r).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "2026-12-02T05:52:07.123Z 5 a=1,b=2\n");
        assert!(Formatter::new("{offset").is_err());
    }

    #[test]
    fn json_keeps_binary_bytes_as_base64_and_an_empty_key_as_null() {
        let mut r = record(1, "", "text");
        assert_eq!(record_json(&r)["key"], serde_json::Value::Null);
        assert_eq!(record_json(&r)["value"], "text");
        r.record.payload = vec![0xff, 0x00, 0xfe];
        r.record.key = b"k".to_vec();
        let j = record_json(&r);
        assert_eq!((j["key"].as_str(), j.get("value")), (Some("k"), None));
        assert_eq!(j["value_base64"], "/wD+");
    }

    #[test]
    fn cli_parses_the_documented_commands() {
        Cli::try_parse_from(["herald", "produce", "demo", "--header", "a=b", "--count", "5"]).unwrap();
        Cli::try_parse_from([
            "herald",
            "consume",
            "demo",
            "--subscription",
            "s1",
            "--from",
            "latest",
            "--follow",
        ])
        .unwrap();
        Cli::try_parse_from(["herald", "topic", "describe", "demo", "--json"]).unwrap();
        assert!(Cli::try_parse_from([
            "herald",
            "consume",
            "demo",
            "--from",
            "middle",
            "--subscription",
            "s"
        ])
        .is_err());
    }
}
