//! The deterministic whole-cluster simulator (`herald::sim`): many seeds, each its own
//! cluster and fault mix, checked at every step; and the five defects of the fault tests as
//! scripted scenarios. A failure prints its seed and the command that replays it.
//!
//! `make sim SEEDS=N` runs more seeds (in release); `HERALD_SIM_SEED=S` replays one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use herald::sim::{run, scenario, Config, SCENARIOS};

/// Seeds `make test` runs (override with `HERALD_SIM_SEEDS`).
const DEFAULT_SEEDS: u64 = 3000;

/// A seed slower than this is named as it finishes (most take milliseconds).
const SLOW_SEED: std::time::Duration = std::time::Duration::from_secs(5);

fn replay_command(seed: u64) -> String {
    format!("HERALD_SIM_SEED={seed} cargo test --release --test simulation replay -- --nocapture")
}

/// A run stops taking new seeds after this many failures (each report is long).
const MAX_FAILURES: usize = 3;

/// Seeds between two progress lines of a long run.
const PROGRESS_EVERY: u64 = 10_000;

/// What a run of many seeds found.
struct Seeds {
    /// Seeds that ran to the end (fewer than asked once `MAX_FAILURES` failed).
    ran: u64,
    failures: Vec<String>,
    /// What the runs covered, summed.
    totals: BTreeMap<&'static str, u64>,
}

/// Runs seeds `first..first + count` on every core.
fn run_seeds(first: u64, count: u64) -> Seeds {
    let next = AtomicU64::new(first);
    let ran = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    let totals = Mutex::new(BTreeMap::new());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // `HERALD_SIM_LIST=<what>` names each seed whose run counted <what> (a key of the
    // coverage line, e.g. "damaged chunks"): how regression seeds are found again after a
    // change to the simulator moves every run.
    let list = std::env::var("HERALD_SIM_LIST").ok();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= first + count || failures.lock().unwrap().len() >= MAX_FAILURES {
                    return;
                }
                let started = Instant::now();
                let outcome = run(Config::swarm(seed));
                if started.elapsed() > SLOW_SEED {
                    eprintln!("seed {seed} took {:.1?} ({} events)", started.elapsed(), outcome.events);
                }
                if let Some(what) = list.as_deref() {
                    if let Some(n) = outcome.stats.get(what) {
                        eprintln!("seed {seed}: {what} {n}");
                    }
                }
                let mut totals = totals.lock().unwrap();
                for (what, n) in &outcome.stats {
                    *totals.entry(*what).or_default() += n;
                }
                drop(totals);
                let done = ran.fetch_add(1, Ordering::Relaxed) + 1;
                if done % PROGRESS_EVERY == 0 {
                    eprintln!("simulation: {done} seeds run");
                }
                if !outcome.passed() {
                    failures.lock().unwrap().push(outcome.report(&replay_command(seed)));
                }
            });
        }
    });
    Seeds {
        ran: ran.into_inner(),
        failures: failures.into_inner().unwrap(),
        totals: totals.into_inner().unwrap(),
    }
}

#[test]
fn seeds_run_clean() {
    let count = std::env::var("HERALD_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEEDS);
    let first = std::env::var("HERALD_SIM_FIRST").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let started = Instant::now();
    let Seeds { ran, failures, totals } = run_seeds(first, count);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "simulation: {ran} of {count} seeds from {first} in {secs:.1} s ({:.1} seeds/s), {} failed",
        ran as f64 / secs,
        failures.len()
    );
    eprintln!("covered: {totals:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Seeds that once failed, with what they found; each runs in every `make test`.
const REGRESSIONS: &[(u64, &str)] = &[
    (1952, "a new leader served consumers before it applied the cursors its epoch's first entry committed: a resume went back to an older cursor"),
    (3411, "a replacement removed the lost voter after it had come back and been elected: the leader was no voter"),
    (2551, "a leader deposed while it held a follower's fetch answered it with entries it took as a follower since: the follower's log forked"),
    (2215, "a follower restarted from a leader's state took the dedup outcome of an uncommitted batch; as the next leader it acked a retry of that batch at an offset another batch took"),
    (37874, "a follower restarted from a leader's state stored the records below its log start that a newer leader, applied less far, shipped with the next entries"),
    (47501, "the same on a follower that later led: records left below the log start for good"),
];

/// Seeds drawn with a damaged chunk that found defects (the first two in its repair, F19),
/// replayed as drawn.
const DAMAGE_REGRESSIONS: &[(u64, &str)] = &[
    (967450, "a chunk whose header a bit flip changed was never deleted: the store kept a chunk wholly below its log start"),
    // 974312 found this; reporting lost naming sends to Raft (2026-12-04) moved its run so
    // that it damages nothing, and 974320 (the next seed that damages a chunk) stands in.
    // The defect's own test:
    // storage::tests::a_chunk_damaged_in_its_header_or_framing_still_loads_and_is_deleted_once_read.
    (974320, "the same for the log's last chunk, whose end deletion took from its damaged header"),
    (995402, "a park poll delivered twice: the leader answered the copy at once and the original later with a woken topic, an answer its follower no longer waited for; the topic never fetched again"),
];

#[test]
fn damage_regression_seeds_run_clean() {
    for (seed, what) in DAMAGE_REGRESSIONS {
        let outcome = run(Config::swarm(*seed));
        assert!(outcome.stats.contains_key("damaged chunks"), "seed {seed} damages a chunk");
        assert!(
            outcome.passed(),
            "seed {seed} ({what}) fails again:\n{}",
            outcome.report(&replay_command(*seed))
        );
    }
}

#[test]
fn regression_seeds_run_clean() {
    for (seed, what) in REGRESSIONS {
        // Exactly the run that found the defect: these seeds were found before runs could
        // damage a chunk (a later draw, which changes the run once it happens).
        let mut config = Config::swarm(*seed);
        config.script.retain(|(_, f)| !matches!(f, herald::sim::Fault::DamageChunk(..)));
        let outcome = run(config);
        assert!(
            outcome.passed(),
            "seed {seed} ({what}) fails again:\n{}",
            outcome.report(&replay_command(*seed))
        );
    }
}

#[test]
fn replay() {
    let Some(seed) = std::env::var("HERALD_SIM_SEED").ok().and_then(|s| s.parse().ok()) else { return };
    let config = Config::swarm(seed);
    eprintln!("{config:?}");
    let outcome = run(config);
    eprintln!("{}", outcome.report(&replay_command(seed)));
    eprintln!("{:#?}", herald::sim::PROFILE.lock().unwrap());
    assert!(outcome.passed());
}

fn scenario_passes(name: &str) -> herald::sim::Outcome {
    let outcome = run(scenario(name, 1).expect("a scenario"));
    if std::env::var("HERALD_SIM_SHOW").is_ok() {
        eprintln!("{}\n{:?}", outcome.report("-"), outcome.stats);
    }
    assert!(
        outcome.passed(),
        "{}",
        outcome.report(&format!("cargo test --test simulation {}", name.replace('-', "_")))
    );
    outcome
}

#[test]
fn every_scenario_is_named() {
    for name in SCENARIOS {
        assert!(scenario(name, 1).is_some(), "{name}");
    }
}

#[test]
fn cursor_after_failover() {
    scenario_passes("cursor-after-failover");
}

#[test]
fn replacement_keeps_a_majority() {
    scenario_passes("replacement-keeps-a-majority");
}

#[test]
fn failed_election_retried() {
    let outcome = scenario_passes("failed-election-retried");
    assert!(outcome.epochs["t0"] > 1, "the topic moved to a new epoch\n{}", outcome.report("-"));
}

#[test]
fn power_cut_quick_restart() {
    let outcome = scenario_passes("power-cut-quick-restart");
    assert!(outcome.epochs["t0"] >= 4, "each restart of the leader took a new epoch: {:?}", outcome.epochs);
}

#[test]
fn naming_restart_grace() {
    let outcome = scenario_passes("naming-restart-grace");
    assert_eq!(outcome.epochs["t0"], 1, "no failover of a healthy leader");
}

#[test]
fn naming_leader_dies_with_topic_leader() {
    let outcome = scenario_passes("naming-leader-dies-with-topic-leader");
    assert!(outcome.epochs["t0"] > 1, "the topic failed over under the next naming leader");
    assert!(outcome.stats["naming leaders"] >= 2, "{:?}", outcome.stats);
}

#[test]
fn naming_leader_dies_mid_election() {
    let outcome = scenario_passes("naming-leader-dies-mid-election");
    assert!(outcome.epochs["t0"] > 1, "the election was finished or redone");
    assert!(outcome.stats["naming leaders"] >= 3, "{:?}", outcome.stats);
}

#[test]
fn naming_minority_partition() {
    let outcome = scenario_passes("naming-minority-partition");
    assert!(outcome.epochs["t0"] > 1, "the majority failed the topic over");
    assert!(outcome.stats["naming leaders"] >= 2, "{:?}", outcome.stats);
}

#[test]
fn naming_member_wiped() {
    let outcome = scenario_passes("naming-member-wiped");
    assert_eq!(outcome.stats["naming member wipes"], 1);
    assert!(outcome.epochs["t0"] > 1, "the topic failed over with the rebuilt member in the majority");
}

#[test]
fn naming_wiped_member_elects_no_stale_one() {
    let outcome = scenario_passes("naming-wiped-member-elects-no-stale-one");
    assert!(outcome.epochs["t0"] > 1, "the topic failed over before and stays failed over");
}

#[test]
fn preferred_leader_returns() {
    let outcome = scenario_passes("preferred-leader-returns");
    assert_eq!(outcome.leaders["t0"], 1, "server 1 leads its topic again\n{}", outcome.report("-"));
    assert!(outcome.epochs["t0"] >= 5, "two failovers and two returns: {:?}", outcome.epochs);
    assert!(outcome.stats["preferred leader returns"] >= 2, "{:?}", outcome.stats);
}

#[test]
fn damaged_chunk_on_the_leader() {
    let outcome = scenario_passes("damaged-chunk-on-the-leader");
    assert_eq!(outcome.stats["damaged chunks"], 1, "{:?}", outcome.stats);
    assert_eq!(outcome.stats.get("chunks repaired"), Some(&1), "{:?}", outcome.stats);
    assert_eq!(outcome.leaders["t0"], 1, "the old leader caught up through the repaired chunk");
}

#[test]
fn damaged_chunk_found_at_restart() {
    let outcome = scenario_passes("damaged-chunk-found-at-restart");
    assert_eq!(outcome.stats["damaged chunks"], 1, "{:?}", outcome.stats);
    assert_eq!(outcome.stats.get("chunks repaired"), Some(&1), "{:?}", outcome.stats);
}
