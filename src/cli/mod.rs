//! The `herald` command line.
//!
//! stdout carries data only (records, listings, JSON); progress, summaries and errors go to
//! stderr. Exit status: 0 on success, 1 on failure (for `produce`: any record not
//! acknowledged), 2 on a usage error.

mod acl;
mod consume;
mod context;
mod dev;
mod input;
mod produce;
mod servers;
mod status;
mod subscriptions;
mod topic;
mod topics;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::certs;
use crate::client::{self, Client};
use crate::naming::core::MAX_REPLICAS;
use crate::naming::{self, NamingConfig};
use crate::server::{self, ServerConfig};
use crate::storage::Medium;
use crate::types::{NamingAddrs, ServerId, SubscriptionName, TopicName};

use consume::ConsumeArgs;
use produce::ProduceArgs;
use subscriptions::SubscriptionCommand;
use topic::{topic_json, SchemaCommand, TopicCommand};

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
    /// The saved context to connect with (see `herald context`; default: the one in use).
    #[arg(long, global = true, env = "HERALD_CONTEXT", value_name = "NAME")]
    context: Option<String>,
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
    /// Named clusters to connect to from anywhere (naming addresses, certificates,
    /// timeout), kept in ~/.config/herald/config.toml or $HERALD_CONFIG; flags and HERALD_*
    /// variables still win over the context in use.
    #[command(subcommand)]
    Context(context::ContextCommand),
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
    /// Publish records: one per line of stdin (the value, KEY<D>VALUE with -K, or a JSON
    /// object with --input json), or one per --file.
    Produce(ProduceArgs),
    /// Read records, one per line on stdout: through a durable subscription (-s), or from
    /// an offset, the last N or a time without one (--offset, --tail, --from-time).
    Consume(ConsumeArgs),
    /// Measure throughput, latency, CPU and failover time (see docs/performance.md).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

/// Entry point of the `herald` binary.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Client commands take what flags and variables leave unset from the context in use;
    // servers, `dev` and `certs` are told everything on their command line.
    let is_client = !matches!(
        cli.command,
        Command::Naming { action: None, .. }
            | Command::Server { .. }
            | Command::Dev { .. }
            | Command::Certs { .. }
            | Command::Completions { .. }
    );
    let applied = match is_client.then(|| context::apply(&mut cli.common, &matches)) {
        None => None,
        Some(Ok(applied)) => applied,
        // Managing contexts must work while the one in use is broken.
        Some(Err(_)) if matches!(cli.command, Command::Context(_)) => None,
        Some(Err(e)) => return report(e),
    };
    if let Command::Context(cmd) = cli.command {
        return context::run(cmd, &cli.common, &matches, applied).unwrap_or_else(report);
    }
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
    runtime.block_on(run(cli)).unwrap_or_else(report)
}

/// Prints a command's error; exit status 2 for a usage error, else 1.
fn report(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    if e.downcast_ref::<UsageError>().is_some() {
        ExitCode::from(USAGE_EXIT)
    } else {
        ExitCode::FAILURE
    }
}

/// Exit status after Ctrl-C (128 + SIGINT, as shells report it).
const INTERRUPTED_EXIT: u8 = 130;

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
            servers::naming_status(&common, json).await
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
        Command::Context(_) => unreachable!("`main` runs context commands, which need no runtime"),
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
        Command::Dev { servers, naming_servers, dir } => {
            dev::dev(&common, servers, naming_servers, &dir).await
        }
        Command::Servers { action: None, json } => {
            with_client(&common, |c| servers::list_servers(c, json)).await
        }
        Command::Servers { action: Some(ServersAction::Remove { id }), .. } => {
            with_client(&common, |c| async move {
                c.remove_server(id).await?;
                eprintln!("retired server {id}");
                Ok(ExitCode::SUCCESS)
            })
            .await
        }
        Command::Topic(cmd) => with_client(&common, |c| topic::topic(c, cmd)).await,
        Command::Subscription(cmd) => with_client(&common, |c| subscriptions::subscription(c, cmd)).await,
        Command::Schema(cmd) => with_client(&common, |c| topic::schema(c, cmd)).await,
        Command::Acl(cmd) => with_client(&common, |c| acl::acl(c, cmd)).await,
        Command::Status { json } => with_client(&common, |c| status::status(c, json)).await,
        Command::Produce(args) => with_client(&common, |c| produce::produce(c, args)).await,
        Command::Consume(args) => with_client(&common, |c| consume::consume(c, args)).await,
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

/// A client of the cluster --naming names, retrying for --timeout.
fn connect(common: &Common) -> Result<Arc<Client>> {
    let mut client = Client::new(common.naming.clone(), &common.certs)?;
    client.set_retry_deadline(Duration::from_secs(common.timeout));
    Ok(client)
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

/// `--superusers`: client names (empty entries skipped).
fn superusers(names: &[String]) -> Result<std::collections::BTreeSet<String>> {
    let mut set = std::collections::BTreeSet::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        certs::check_client_name(name).map_err(|e| usage(format!("--superusers: {e}")))?;
        set.insert(name.to_string());
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

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
