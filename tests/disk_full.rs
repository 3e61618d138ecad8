//! F20/F21: a full disk on a topic server. Every server's data directory is a small tmpfs the
//! test mounts (root only; skipped with a printed reason otherwise). A leader that cannot
//! write gives its epoch up and a healthy replica takes over; a lone replica refuses writes
//! with a typed error naming the directory while reads and acks go on; once space is freed,
//! writes resume without a restart; no acknowledged record is lost.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{read_all, wait_for, Cluster};
use herald::client::Client;
use herald::types::{Record, TopicName};
use herald::Error;

/// Size of each server's filesystem: the 16 MiB space reserve, redb, and room to fill.
const FS_MIB: u64 = 64;
/// Free space left before the test starts producing on a filled filesystem.
const LEFT_MIB: u64 = 1;

/// A tmpfs mounted for a test, unmounted (lazily: a server may still hold files) on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(path: &Path) -> Option<Mount> {
        std::fs::create_dir_all(path).unwrap();
        let size = format!("size={FS_MIB}m");
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(path).status();
        match ok {
            Ok(s) if s.success() => Some(Mount(path.to_path_buf())),
            _ => None,
        }
    }

    fn available(&self) -> u64 {
        let out = Command::new("df").args(["--output=avail", "-B1"]).arg(&self.0).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).and_then(|l| l.trim().parse().ok()).expect("df output")
    }

    /// Fills the filesystem but for `LEFT_MIB`, with a file [`free`](Self::free) removes.
    fn fill(&self) {
        let filler = self.0.join("filler");
        let size = self.available().saturating_sub(LEFT_MIB << 20);
        let f = std::fs::File::create(&filler).unwrap();
        // Written, so tmpfs really holds the pages.
        let chunk = vec![1u8; 1 << 20];
        let mut w = std::io::BufWriter::new(f);
        for _ in 0..size >> 20 {
            std::io::Write::write_all(&mut w, &chunk).unwrap();
        }
        std::io::Write::flush(&mut w).unwrap();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A cluster of `n` servers, each on its own tmpfs; `None` when tmpfs cannot be mounted here.
async fn cluster_on_tmpfs(n: usize) -> Option<(Cluster, Vec<Mount>)> {
    let mut cluster = Cluster::start(0).await;
    let mut mounts = Vec::new();
    for id in 1..=n as u64 {
        let Some(m) = Mount::new(&cluster.dir.path().join(format!("server-{id}"))) else {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); the disk-full tests did not run");
            return None;
        };
        mounts.push(m);
        cluster.add_server(id).await;
    }
    cluster.wait_alive(n).await;
    Some((cluster, mounts))
}

fn record(i: usize) -> Record {
    let mut payload = format!("r-{i}-").into_bytes();
    payload.resize(32 * 1024, b'.');
    Record { payload, ..Record::default() }
}

/// Produces records `from..to`, one per batch, pipelined; returns the first error or the
/// number acknowledged (every one of them, in order).
async fn produce(client: &Arc<Client>, topic: &TopicName, from: usize, to: usize) -> Result<usize, Error> {
    let producer = client.producer(topic.clone(), 16);
    let mut acks = Vec::new();
    for i in from..to {
        acks.push(producer.send(vec![record(i)]).await.unwrap());
    }
    producer.close().await;
    let mut acked = 0;
    for ack in acks {
        ack.await.unwrap()?;
        acked += 1;
    }
    Ok(acked)
}

/// Waits until each of the 3 replicas of topic `t` holds `n` records.
async fn every_replica_holds(cluster: &Cluster, n: u64) {
    wait_for(&format!("every replica to hold {n} records"), || async {
        let d = cluster.describe("t");
        let replicas = d["replicas"].as_array().cloned().unwrap_or_default();
        (replicas.len() == 3 && replicas.iter().all(|r| r["log_end"].as_u64() == Some(n))).then_some(())
    })
    .await;
}

fn assert_read(read: &[(u64, String)], n: usize) {
    assert_eq!(read.len(), n, "every acknowledged record is read");
    for (i, (offset, payload)) in read.iter().enumerate() {
        assert_eq!(*offset, i as u64, "in order, once");
        assert!(payload.starts_with(&format!("r-{i}-")), "record {i} is {}", &payload[..20]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_fills_gives_way_and_catches_up_once_space_is_freed() {
    let Some((mut cluster, mounts)) = cluster_on_tmpfs(3).await else { return };
    let topic = cluster.create_topic("t");
    cluster.cli_ok(&["subscription", "create", "t", "s"], None);
    let client = cluster.client();
    assert_eq!(produce(&client, &topic, 0, 20).await.unwrap(), 20);
    let full = cluster.leader_of(&topic).await;
    mounts[full as usize - 1].fill();

    // 12 MiB more than the leader has room for: it fails, gives its epoch up, and a healthy
    // replica leads; the producer retries through it and every record is acknowledged.
    assert_eq!(produce(&client, &topic, 20, 400).await.unwrap(), 380);
    let leader = cluster.leader_of(&topic).await;
    assert_ne!(leader, full, "a replica with space leads");
    let log = cluster.server(full).log_text();
    assert!(log.contains("the disk is full"), "{log}");
    assert!(cluster.server(full).is_running(), "no restart");

    // Space returns: the full replica catches up as a follower, without a restart.
    mounts[full as usize - 1].free();
    every_replica_holds(&cluster, 400).await;
    assert_read(&read_all(&client, &topic, "s").await, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_disk_fills_stops_copying_and_catches_up_once_space_is_freed() {
    let Some((mut cluster, mounts)) = cluster_on_tmpfs(3).await else { return };
    let topic = cluster.create_topic("t");
    cluster.cli_ok(&["subscription", "create", "t", "s"], None);
    let client = cluster.client();
    assert_eq!(produce(&client, &topic, 0, 20).await.unwrap(), 20);
    let leader = cluster.leader_of(&topic).await;
    let full = (1..=3).find(|s| *s != leader).unwrap();
    mounts[full as usize - 1].fill();

    // The leader and the other follower are a majority: producing goes on.
    assert_eq!(produce(&client, &topic, 20, 400).await.unwrap(), 380);
    assert_eq!(cluster.leader_of(&topic).await, leader, "the leader stays");
    let log = cluster.server(full).log_text();
    assert!(log.contains("the disk is full"), "{log}");

    mounts[full as usize - 1].free();
    every_replica_holds(&cluster, 400).await;
    assert!(cluster.server(full).is_running(), "no restart");
    assert_read(&read_all(&client, &topic, "s").await, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_replica_on_a_full_disk_refuses_writes_by_name_and_resumes_when_space_returns() {
    let Some((mut cluster, mounts)) = cluster_on_tmpfs(1).await else { return };
    let topic = cluster.create_topic("t");
    cluster.cli_ok(&["subscription", "create", "t", "s"], None);
    let mut client = cluster.client();
    client.set_retry_deadline(Duration::from_secs(3));
    assert_eq!(produce(&client, &topic, 0, 20).await.unwrap(), 20);
    mounts[0].fill();

    // Produce until the disk is full: the error names the directory and the cause.
    let mut acked = 20;
    let err = loop {
        match produce(&client, &topic, acked, acked + 1).await {
            Ok(n) => acked += n,
            Err(e) => break e,
        }
        assert!(acked < 2000, "the disk never filled");
    };
    let dir = cluster.dir.path().join("server-1");
    assert!(
        matches!(err, Error::Storage { .. })
            && err.to_string().contains(&format!("no space left on {}", dir.display())),
        "{err}"
    );
    // Reads and acks go on.
    assert_read(&read_all(&client, &topic, "s").await, acked);
    assert!(cluster.server(1).is_running(), "no restart");

    // Space returns: writes resume on the same process.
    mounts[0].free();
    wait_for("writes to resume", || async { produce(&client, &topic, acked, acked + 1).await.ok() }).await;
    acked += 1;
    assert_eq!(produce(&client, &topic, acked, acked + 50).await.unwrap(), 50);
    acked += 50;
    cluster.cli_ok(&["subscription", "create", "t", "after"], None);
    assert_read(&read_all(&client, &topic, "s").await, acked);
    let log = cluster.server(1).log_text();
    for line in log
        .lines()
        .filter(|l| l.contains("disk is full") || l.contains("reopen") || l.contains("space is available"))
    {
        eprintln!("{line}");
    }
    assert!(log.contains("space is available again"), "{log}");
}
