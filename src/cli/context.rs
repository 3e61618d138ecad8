//! Named contexts: where a cluster is (its naming group, its certificates, how long to
//! retry), kept in a config file so that client commands work from any directory, like
//! `nats context` and `rpk profile`. A command's own flags and `HERALD_*` variables still
//! win over the context, which wins over the defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{print_json, usage, Common};

/// Where the config file is unless `HERALD_CONFIG` says: under `$XDG_CONFIG_HOME` (or
/// `~/.config`), as most command-line tools keep theirs.
const CONFIG_FILE: &str = "herald/config.toml";

/// A context's name: short, and safe to show and type.
const MAX_CONTEXT_NAME: usize = 64;

#[derive(Subcommand, Debug)]
pub(super) enum ContextCommand {
    /// Save a context: the --naming addresses, --certs directory (kept as an absolute path)
    /// and --timeout given with it (or else in use now), so that client commands find the
    /// cluster from any directory: `herald context add prod --naming h1:7400,h2:7400
    /// --certs /etc/herald/certs --use`.
    Add {
        /// Context name.
        name: String,
        /// Use it from now on (as `context use NAME`).
        #[arg(long = "use")]
        use_it: bool,
        /// Replace a context of that name.
        #[arg(long)]
        force: bool,
    },
    /// Use context NAME for every client command from now on.
    Use {
        /// Context name.
        name: String,
    },
    /// List the contexts; `*` marks the one in use.
    List {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show what a client command here would connect with, and where each setting comes
    /// from (flag or environment, context, default).
    Show {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Forget a context.
    Remove {
        /// Context name.
        name: String,
    },
}

/// The config file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The context client commands use unless told (`--context`, `HERALD_CONTEXT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    current: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, Saved>,
}

/// One context as saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    naming: String,
    certs: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout: Option<u64>,
}

/// The config file's path: `HERALD_CONFIG`, else under `XDG_CONFIG_HOME` or `~/.config`.
fn config_path() -> Result<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(path) = var("HERALD_CONFIG") {
        return Ok(path);
    }
    let base = var("XDG_CONFIG_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".config")))
        .context("no HOME to keep contexts under: set HERALD_CONFIG to a file path")?;
    Ok(base.join(CONFIG_FILE))
}

fn load(path: &Path) -> Result<Config> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).with_context(|| format!("reading the contexts in {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the file whole (a new file renamed over the old), so a crash leaves one or the other.
fn save(path: &Path, config: &Config) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    }
    let text = toml::to_string(config).context("writing the contexts")?;
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CONTEXT_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        return Err(usage(format!(
            "context name {name:?}: use 1 to {MAX_CONTEXT_NAME} letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

/// Whether setting `id` came from a flag or a variable (which win over a context).
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
}

/// Where an effective setting came from.
fn source(matches: &ArgMatches, id: &str, from_context: bool, context: &str) -> String {
    match matches.value_source(id) {
        Some(ValueSource::CommandLine) => "flag".into(),
        Some(ValueSource::EnvVariable) => "environment".into(),
        _ if from_context => format!("context {context}"),
        _ => "default".into(),
    }
}

/// Fills the settings of `common` that neither a flag nor a variable gave from the context
/// in use (`--context`, else the config file's current one), if any. Returns its name and
/// which settings it gave.
pub(super) fn apply(common: &mut Common, matches: &ArgMatches) -> Result<Option<(String, [bool; 3])>> {
    let explicit = common.context.clone();
    let path = config_path();
    let config = match path.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|p| load(p)) {
        Ok(config) => config,
        Err(e) if explicit.is_some() => bail!("--context needs the config file: {e:#}"),
        // Without a context asked for, a config file that cannot be read does not stop
        // commands; they go on without contexts, and say so.
        Err(e) => {
            eprintln!("warning: no context used: {e:#}");
            return Ok(None);
        }
    };
    let Some(name) = explicit.or(config.current.clone()) else { return Ok(None) };
    let Some(saved) = config.contexts.get(&name) else {
        let known: Vec<&str> = config.contexts.keys().map(String::as_str).collect();
        return Err(usage(format!(
            "no context {name:?} in {} (known: {}); add it with `herald context add {name} --naming ADDRS --certs DIR`",
            path.map(|p| p.display().to_string()).unwrap_or_default(),
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        )));
    };
    let unset = |id: &str| !given(matches, id);
    let mut gave = [false; 3];
    if unset("naming") {
        common.naming = saved
            .naming
            .parse()
            .map_err(|e| anyhow::anyhow!("context {name}'s naming addresses {:?}: {e}", saved.naming))?;
        gave[0] = true;
    }
    if unset("certs") {
        common.certs = saved.certs.clone();
        gave[1] = true;
    }
    if let Some(timeout) = saved.timeout.filter(|_| unset("timeout")) {
        common.timeout = timeout;
        gave[2] = true;
    }
    Ok(Some((name, gave)))
}

/// `herald context ...`.
pub(super) fn run(
    cmd: ContextCommand,
    common: &Common,
    matches: &ArgMatches,
    applied: Option<(String, [bool; 3])>,
) -> Result<ExitCode> {
    let path = config_path()?;
    let mut config = load(&path)?;
    match cmd {
        ContextCommand::Add { name, use_it, force } => {
            check_name(&name)?;
            // Host names are kept as written, and looked up each time the context is used.
            let naming = match matches.get_raw("naming").filter(|_| given(matches, "naming")) {
                Some(raw) => raw.map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>().join(","),
                None => common.naming.to_string(),
            };
            let (certs, timeout) =
                (common.certs.clone(), given(matches, "timeout").then_some(common.timeout));
            if config.contexts.contains_key(&name) && !force {
                return Err(usage(format!("context {name} exists (--force replaces it)")));
            }
            let certs = std::fs::canonicalize(&certs).with_context(|| {
                format!(
                    "--certs {}: no such directory (make certificates with `herald certs`)",
                    certs.display()
                )
            })?;
            if !certs.join("ca.pem").exists() {
                eprintln!("warning: {} holds no ca.pem: is it a cluster's certs directory?", certs.display());
            }
            config.contexts.insert(name.clone(), Saved { naming, certs, timeout });
            if use_it {
                config.current = Some(name.clone());
            }
            save(&path, &config)?;
            let now = if use_it { "; client commands use it from now on" } else { "" };
            eprintln!("saved context {name} in {}{now}", path.display());
        }
        ContextCommand::Use { name } => {
            if !config.contexts.contains_key(&name) {
                return Err(usage(format!("no context {name:?} in {}", path.display())));
            }
            config.current = Some(name.clone());
            save(&path, &config)?;
            eprintln!("client commands use context {name}");
        }
        ContextCommand::Remove { name } => {
            if config.contexts.remove(&name).is_none() {
                return Err(usage(format!("no context {name:?} in {}", path.display())));
            }
            if config.current.as_deref() == Some(name.as_str()) {
                config.current = None;
            }
            save(&path, &config)?;
            eprintln!("removed context {name}");
        }
        ContextCommand::List { json } => {
            if json {
                let list: Vec<_> = config
                    .contexts
                    .iter()
                    .map(|(name, c)| {
                        json!({
                            "name": name,
                            "naming": c.naming,
                            "certs": c.certs,
                            "timeout": c.timeout,
                            "current": config.current.as_deref() == Some(name.as_str()),
                        })
                    })
                    .collect();
                print_json(&json!({ "file": path, "contexts": list }))?;
            } else {
                for (name, c) in &config.contexts {
                    let mark = if config.current.as_deref() == Some(name.as_str()) { "*" } else { " " };
                    println!("{mark} {name:<16} naming {}  certs {}", c.naming, c.certs.display());
                }
                if config.contexts.is_empty() {
                    eprintln!(
                        "no contexts in {} (add one with `herald context add NAME --naming ADDRS --certs DIR`)",
                        path.display()
                    );
                }
            }
        }
        ContextCommand::Show { json } => {
            let (name, gave) = applied.unwrap_or_default();
            let naming = (common.naming.to_string(), source(matches, "naming", gave[0], &name));
            let certs = (common.certs.display().to_string(), source(matches, "certs", gave[1], &name));
            let timeout = (common.timeout.to_string(), source(matches, "timeout", gave[2], &name));
            if json {
                print_json(&json!({
                    "context": (!name.is_empty()).then_some(&name),
                    "file": path,
                    "naming": { "value": naming.0, "from": naming.1 },
                    "certs": { "value": certs.0, "from": certs.1 },
                    "timeout": { "value": timeout.0, "from": timeout.1 },
                }))?;
            } else {
                let context = if name.is_empty() { "none".to_string() } else { name.clone() };
                println!("context  {context} (contexts in {})", path.display());
                println!("naming   {} ({})", naming.0, naming.1);
                println!("certs    {} ({})", certs.0, certs.1);
                println!("timeout  {} s ({})", timeout.0, timeout.1);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
