//! `herald bench disk`: the machine's own limit, so Herald's figures can be stated as a
//! fraction of it. Appends blocks of Herald's batch sizes to a file with an fsync after each
//! (what a group commit of one batch costs the disk at least), in the directory the `--dev`
//! benchmarks keep their data in unless told otherwise. Then, at `bench latency`'s cadence,
//! times single fsynced appends (the disk's share of its percentiles) and single redb commits
//! of one small batch (the storage engine's: an ack there waits for a commit on the leader
//! and one on a follower).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use super::{new_histogram, quantiles_ms, rounded};

/// Block sizes measured: one small batch, a 1,000-record batch of 100-byte records
/// (~128 KiB as stored), and a large one.
const BLOCK_SIZES: [usize; 4] = [4 << 10, 16 << 10, 128 << 10, 1 << 20];

/// Bytes written per block size at most: enough for the rate to settle, few enough that the
/// command takes seconds.
const BYTES_PER_SIZE: u64 = 256 << 20;

/// Time spent per block size at most (a slow disk stops on this before the bytes).
const TIME_PER_SIZE: Duration = Duration::from_secs(5);

/// The paced runs' cadence: `bench latency` sends a batch every millisecond, so a lightly
/// loaded server group-commits about this often.
const PACED_INTERVAL: Duration = Duration::from_millis(1);

/// The paced appends: one small batch as stored, rounded up to a page.
const PACED_BLOCK: usize = 4 << 10;

/// The paced commits' value: about one `bench latency` batch as stored (5 records of 100 B
/// with their framing and the chunk header).
const PACED_VALUE: usize = 600;

/// Operations per paced run (5 s at the cadence): enough for a p999 of 5 samples.
const PACED_OPS: u32 = 5_000;

/// A paced run's time at most (a slow disk stops on this before the count).
const PACED_TIME: Duration = Duration::from_secs(10);

/// The paced commits' table.
const COMMITS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("bench");

#[derive(Args, Debug, Clone)]
pub struct DiskArgs {
    /// Directory to write the test files in (default: the system's temporary directory, where
    /// `--dev` benchmarks keep their data); they are deleted afterwards.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// One block size's result.
struct Rate {
    block: usize,
    fsyncs_per_sec: f64,
    mb_per_sec: f64,
}

/// A paced run's result: how long one operation took, p50 / p99 / p999 in ms.
struct Paced {
    per_sec: f64,
    ms: (f64, f64, f64),
    /// This process's CPU (user + sys, the kernel's part of an fsync included) per operation.
    cpu_us: f64,
}

impl Paced {
    fn to_json(&self) -> serde_json::Value {
        let (p50, p99, p999) = self.ms;
        json!({
            "per_sec": rounded(self.per_sec, 0),
            "ms": { "p50": p50, "p99": p99, "p999": p999 },
            "cpu_us": rounded(self.cpu_us, 0),
        })
    }

    fn summary(&self) -> String {
        let (p50, p99, p999) = self.ms;
        format!("p50 {p50:.2} ms p99 {p99:.2} ms p999 {p999:.2} ms, {:.0} µs CPU each", self.cpu_us)
    }
}

pub fn bench_disk(a: &DiskArgs) -> Result<()> {
    let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("herald-bench-disk-{}", std::process::id()));
    let db_path = path.with_extension("redb");
    let result =
        (|| Ok::<_, anyhow::Error>((measure(&path)?, paced_fsyncs(&path)?, paced_commits(&db_path)?)))();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&db_path);
    let (rates, fsyncs, commits) = result?;
    for r in &rates {
        eprintln!(
            "disk      {:>5} KiB appends, fsync after each: {:>7.0} fsyncs/s {:>7.1} MB/s",
            r.block >> 10,
            r.fsyncs_per_sec,
            r.mb_per_sec
        );
    }
    let every = PACED_INTERVAL.as_millis();
    eprintln!("disk      {:>5} KiB appends, one per {every} ms: {}", PACED_BLOCK >> 10, fsyncs.summary());
    eprintln!("redb      {PACED_VALUE:>5} B commits, one per {every} ms: {}", commits.summary());
    if a.json {
        let sizes: Vec<_> = rates
            .iter()
            .map(|r| {
                json!({ "block_bytes": r.block, "fsyncs_per_sec": rounded(r.fsyncs_per_sec, 0), "mb_per_sec": rounded(r.mb_per_sec, 1) })
            })
            .collect();
        let mut paced = fsyncs.to_json();
        paced["block_bytes"] = json!(PACED_BLOCK);
        let mut redb = commits.to_json();
        redb["value_bytes"] = json!(PACED_VALUE);
        let report = json!({
            "workload": "disk",
            "dir": dir.display().to_string(),
            "appends": sizes,
            "paced": paced,
            "redb": redb,
        });
        println!("{report}");
    }
    Ok(())
}

fn measure(path: &Path) -> Result<Vec<Rate>> {
    let mut rates = Vec::new();
    for block in BLOCK_SIZES {
        let mut file = create(path)?;
        let data = vec![0xa5u8; block];
        let started = Instant::now();
        let (mut written, mut fsyncs) = (0u64, 0u64);
        while written < BYTES_PER_SIZE && started.elapsed() < TIME_PER_SIZE {
            file.write_all(&data)?;
            file.sync_data()?;
            written += block as u64;
            fsyncs += 1;
        }
        let secs = started.elapsed().as_secs_f64();
        rates.push(Rate {
            block,
            fsyncs_per_sec: fsyncs as f64 / secs,
            mb_per_sec: written as f64 / secs / 1e6,
        });
    }
    Ok(rates)
}

/// Appends [`PACED_BLOCK`] bytes and fsyncs, once per [`PACED_INTERVAL`].
fn paced_fsyncs(path: &Path) -> Result<Paced> {
    let mut file = create(path)?;
    let data = vec![0x5au8; PACED_BLOCK];
    paced(|| {
        file.write_all(&data)?;
        file.sync_data()?;
        Ok(())
    })
}

/// Commits one [`PACED_VALUE`]-byte value to a new redb database, durably (redb's default,
/// as Herald's writer does), once per [`PACED_INTERVAL`].
fn paced_commits(path: &Path) -> Result<Paced> {
    let db = redb::Database::create(path).with_context(|| format!("creating {}", path.display()))?;
    let value = vec![0x5au8; PACED_VALUE];
    let mut key = 0u64;
    paced(|| {
        let txn = db.begin_write()?;
        txn.open_table(COMMITS)?.insert(key, value.as_slice())?;
        txn.commit()?;
        key += 1;
        Ok(())
    })
}

/// Runs `op` once per [`PACED_INTERVAL`] (one that is due late goes at once, never several
/// in a burst), [`PACED_OPS`] times or for [`PACED_TIME`], timing each.
fn paced(mut op: impl FnMut() -> Result<()>) -> Result<Paced> {
    let me = std::process::id();
    let cpu = super::cpu_seconds(me).unwrap_or(0.0);
    let mut hist = new_histogram();
    let started = Instant::now();
    let mut next = started;
    let mut ops = 0;
    while ops < PACED_OPS && started.elapsed() < PACED_TIME {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        let t = Instant::now();
        op()?;
        hist.saturating_record((t.elapsed().as_micros() as u64).max(1));
        next = (next + PACED_INTERVAL).max(t);
        ops += 1;
    }
    let cpu = super::cpu_seconds(me).unwrap_or(0.0) - cpu;
    Ok(Paced {
        per_sec: ops as f64 / started.elapsed().as_secs_f64(),
        ms: quantiles_ms(&hist),
        cpu_us: cpu * 1e6 / ops.max(1) as f64,
    })
}

/// The test file, created empty (or emptied).
fn create(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}
