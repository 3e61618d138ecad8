//! `herald bench disk`: the machine's own limit, so Herald's figures can be stated as a
//! fraction of it. Appends blocks of Herald's batch sizes to a file with an fsync after each
//! (what a group commit of one batch costs the disk at least), in the directory the `--dev`
//! benchmarks keep their data in unless told otherwise.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use super::rounded;

/// Block sizes measured: one small batch, a 1,000-record batch of 100-byte records
/// (~128 KiB as stored), and a large one.
const BLOCK_SIZES: [usize; 4] = [4 << 10, 16 << 10, 128 << 10, 1 << 20];

/// Bytes written per block size at most: enough for the rate to settle, few enough that the
/// command takes seconds.
const BYTES_PER_SIZE: u64 = 256 << 20;

/// Time spent per block size at most (a slow disk stops on this before the bytes).
const TIME_PER_SIZE: Duration = Duration::from_secs(5);

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

pub fn bench_disk(a: &DiskArgs) -> Result<()> {
    let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("herald-bench-disk-{}", std::process::id()));
    let result = measure(&path);
    let _ = std::fs::remove_file(&path);
    let rates = result?;
    for r in &rates {
        eprintln!(
            "disk      {:>5} KiB appends, fsync after each: {:>7.0} fsyncs/s {:>7.1} MB/s",
            r.block >> 10,
            r.fsyncs_per_sec,
            r.mb_per_sec
        );
    }
    if a.json {
        let sizes: Vec<_> = rates
            .iter()
            .map(|r| {
                json!({ "block_bytes": r.block, "fsyncs_per_sec": rounded(r.fsyncs_per_sec, 0), "mb_per_sec": rounded(r.mb_per_sec, 1) })
            })
            .collect();
        println!("{}", json!({ "workload": "disk", "dir": dir.display().to_string(), "appends": sizes }));
    }
    Ok(())
}

fn measure(path: &std::path::Path) -> Result<Vec<Rate>> {
    let mut rates = Vec::new();
    for block in BLOCK_SIZES {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
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
