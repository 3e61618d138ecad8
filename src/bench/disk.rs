//! `herald bench disk`: the machine's own limit, so Herald's figures can be stated as a
//! fraction of it. Appends blocks of Herald's batch sizes to a file with an fsync after each
//! (what a group commit of one batch costs the disk at least), in the directory the `--dev`
//! benchmarks keep their data in unless told otherwise; then times single fsynced appends at
//! `bench latency`'s cadence, the disk's share of its percentiles (an ack there waits for an
//! fsync on the leader and one on a follower, both on this disk).

use std::io::Write;
use std::path::PathBuf;
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

/// The paced run's cadence: `bench latency` sends a batch every millisecond, so a lightly
/// loaded server group-commits about this often.
const PACED_INTERVAL: Duration = Duration::from_millis(1);

/// The paced run's appends: one small batch as stored.
const PACED_BLOCK: usize = 4 << 10;

/// The paced run's fsyncs (5 s at the cadence): enough for a p999 of 5 samples.
const PACED_FSYNCS: u32 = 5_000;

/// The paced run's time at most (a slow disk stops on this before the count).
const PACED_TIME: Duration = Duration::from_secs(10);

#[derive(Args, Debug, Clone)]
pub struct DiskArgs {
    /// Directory to write the test file in (default: the system's temporary directory, where
    /// `--dev` benchmarks keep their data); the file is deleted afterwards.
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

/// The paced run's result: how long one fsynced append took, p50 / p99 / p999 in ms.
struct Paced {
    fsyncs: u32,
    seconds: f64,
    fsync_ms: (f64, f64, f64),
}

pub fn bench_disk(a: &DiskArgs) -> Result<()> {
    let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("herald-bench-disk-{}", std::process::id()));
    let result = measure(&path).and_then(|rates| Ok((rates, paced(&path)?)));
    let _ = std::fs::remove_file(&path);
    let (rates, paced) = result?;
    for r in &rates {
        eprintln!(
            "disk      {:>5} KiB appends, fsync after each: {:>7.0} fsyncs/s {:>7.1} MB/s",
            r.block >> 10,
            r.fsyncs_per_sec,
            r.mb_per_sec
        );
    }
    let (p50, p99, p999) = paced.fsync_ms;
    eprintln!(
        "disk      {:>5} KiB appends, one per {} ms: fsync p50 {p50:.2} ms p99 {p99:.2} ms p999 {p999:.2} ms",
        PACED_BLOCK >> 10,
        PACED_INTERVAL.as_millis()
    );
    if a.json {
        let sizes: Vec<_> = rates
            .iter()
            .map(|r| {
                json!({ "block_bytes": r.block, "fsyncs_per_sec": rounded(r.fsyncs_per_sec, 0), "mb_per_sec": rounded(r.mb_per_sec, 1) })
            })
            .collect();
        let paced = json!({
            "block_bytes": PACED_BLOCK,
            "fsyncs_per_sec": rounded(paced.fsyncs as f64 / paced.seconds, 0),
            "fsync_ms": { "p50": p50, "p99": p99, "p999": p999 },
        });
        println!(
            "{}",
            json!({ "workload": "disk", "dir": dir.display().to_string(), "appends": sizes, "paced": paced })
        );
    }
    Ok(())
}

fn measure(path: &std::path::Path) -> Result<Vec<Rate>> {
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

/// Appends [`PACED_BLOCK`] bytes and fsyncs once per [`PACED_INTERVAL`] (one that is due late
/// goes at once, never several in a burst), timing each append and its fsync.
fn paced(path: &std::path::Path) -> Result<Paced> {
    let mut file = create(path)?;
    let data = vec![0x5au8; PACED_BLOCK];
    let mut hist = new_histogram();
    let started = Instant::now();
    let mut next = started;
    let mut fsyncs = 0;
    while fsyncs < PACED_FSYNCS && started.elapsed() < PACED_TIME {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        let t = Instant::now();
        file.write_all(&data)?;
        file.sync_data()?;
        hist.saturating_record((t.elapsed().as_micros() as u64).max(1));
        next = (next + PACED_INTERVAL).max(t);
        fsyncs += 1;
    }
    Ok(Paced { fsyncs, seconds: started.elapsed().as_secs_f64(), fsync_ms: quantiles_ms(&hist) })
}

/// The test file, created empty (or emptied).
fn create(path: &std::path::Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}
