//! `herald bench` works end to end against its own `--dev` cluster and reports what
//! docs/performance.md is built from. Only shape and sanity are checked here: speed targets
//! are measured with `make bench` on a release build, never asserted in tests.

mod common;

use std::process::Command;

use common::BIN;

fn bench(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .args(["--dev", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "herald bench {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap()
}

#[test]
fn produce_consume_and_latency_report_their_figures() {
    let produce = bench(&["produce", "--records", "20000", "--replicas", "3"]);
    assert_eq!(produce["workload"], "produce");
    assert_eq!(produce["records"], 20000);
    assert!(produce["records_per_sec"].as_f64().unwrap() > 0.0);
    // Figures carry the precision they have, no float noise.
    let rate = produce["records_per_sec"].as_f64().unwrap();
    assert_eq!(rate, rate.round(), "{rate}");
    let p50 = produce["latency_ms"]["p50"].as_f64().unwrap();
    assert!(p50.to_string().split('.').nth(1).is_none_or(|d| d.len() <= 3), "{p50}");
    assert!(produce["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(produce["cpu_us_per_record"].as_f64().is_some(), "CPU of the server processes is counted");
    assert_eq!(produce["server_rss_mb"].as_object().unwrap().len(), 3);

    let consume = bench(&["consume", "--records", "20000", "--replicas", "1", "--size", "1000"]);
    assert_eq!((consume["workload"].as_str(), consume["records"].as_u64()), (Some("consume"), Some(20000)));

    let latency = bench(&["latency", "--rate", "500", "--duration", "1"]);
    assert_eq!(latency["records"], 500);
    assert!(latency["latency_ms"]["p50"].as_f64().unwrap() > 0.0);
    // The commit path alone (send to ack), reported beside the end-to-end figures.
    let ack_p50 = latency["ack_latency_ms"]["p50"].as_f64().unwrap();
    let ack_p99 = latency["ack_latency_ms"]["p99"].as_f64().unwrap();
    assert!(ack_p50 > 0.0 && ack_p99 >= ack_p50, "{latency}");
}

#[test]
fn failover_measures_the_time_to_a_new_leaders_ack() {
    let failover = bench(&["failover", "--runs", "1"]);
    let median = failover["details"]["median_ms"].as_f64().unwrap();
    assert!(median > 0.0 && median < 60_000.0, "{failover}");
}

#[test]
fn topics_reports_creation_spread_idle_cost_and_fairness() {
    let t = bench(&[
        "topics",
        "--topics",
        "60",
        "--producers",
        "6",
        "--consumers",
        "2",
        "--records",
        "6000",
        "--idle-secs",
        "1",
    ]);
    let d = &t["details"];
    assert_eq!(d["topics"], 60);
    assert!(d["create_per_sec"].as_f64().unwrap() > 0.0);
    let leaders: Vec<u64> =
        d["leaders_per_server"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap()).collect();
    assert_eq!(leaders, [20, 20, 20], "leaders spread evenly");
    assert!(d["idle_cpu_percent"].as_f64().is_some());
    // The floor split by what each process runs: the three naming members, the three servers.
    let by_role = d["idle_cpu_percent_by_role"].as_object().unwrap();
    let roles: Vec<&str> = by_role.keys().map(String::as_str).collect();
    assert_eq!(roles, ["naming", "server"], "{by_role:?}");
    assert!(by_role.values().all(|p| p.as_f64().unwrap() >= 0.0), "{by_role:?}");
    assert_eq!(d["server_rss_mb"].as_object().unwrap().len(), 3);
    assert_eq!(d["produce"]["records"], 6000);
    assert!(d["produce"]["aggregate_over_single"].as_f64().unwrap() > 0.0);
    assert!(d["consume"]["aggregate_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn disk_reports_fsynced_append_rates_and_paced_commits_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).args(["bench", "disk", "--json", "--dir"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["workload"], "disk");
    let appends = report["appends"].as_array().unwrap();
    let blocks: Vec<u64> = appends.iter().map(|a| a["block_bytes"].as_u64().unwrap()).collect();
    assert_eq!(blocks, vec![4096, 16384, 131072, 1048576]);
    for a in appends {
        let (fsyncs, mb) = (a["fsyncs_per_sec"].as_f64().unwrap(), a["mb_per_sec"].as_f64().unwrap());
        assert!(fsyncs > 0.0 && mb > 0.0, "{a}");
        // MB/s is the block size times the fsyncs, within rounding.
        let expected = fsyncs * a["block_bytes"].as_f64().unwrap() / 1e6;
        assert!((mb - expected).abs() <= expected * 0.01 + 0.1, "{a}");
    }
    // The paced runs: single fsynced appends, then single redb commits, at bench latency's
    // cadence (never faster), each timed.
    let (paced, redb) = (&report["paced"], &report["redb"]);
    assert_eq!(paced["block_bytes"], 4096);
    assert_eq!(redb["value_bytes"], 600);
    for run in [paced, redb] {
        let rate = run["per_sec"].as_f64().unwrap();
        assert!(rate > 0.0 && rate <= 1_050.0, "{run}");
        let ms = |q: &str| run["ms"][q].as_f64().unwrap();
        assert!(0.0 < ms("p50") && ms("p50") <= ms("p99") && ms("p99") <= ms("p999"), "{run}");
        assert!(run["cpu_us"].as_f64().unwrap() >= 0.0, "{run}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the test file is deleted");
}
