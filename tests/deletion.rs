//! G6: a record is deleted only after every subscription acknowledged past it; deleting a
//! subscription frees what only it held; a topic without subscriptions keeps its records.

mod common;

use common::{numbered_lines, Cluster};

fn log_start(cluster: &Cluster, topic: &str) -> u64 {
    cluster.describe(topic)["log_start"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_go_only_when_every_subscription_has_passed_them() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("g6");
    // Records produced before any subscription are kept for subscriptions made later.
    cluster.cli_ok(&["produce", "g6"], Some(&numbered_lines("r", 1000)));
    assert_eq!(log_start(&cluster, "g6"), 0);
    cluster.cli_ok(&["subscription", "create", "g6", "fast"], None);
    cluster.cli_ok(&["subscription", "create", "g6", "slow"], None);

    // fast reads everything; slow nothing: nothing may be deleted.
    let read = cluster.cli_ok(&["consume", "g6", "--subscription", "fast"], None);
    assert_eq!(read.lines().count(), 1000);
    assert_eq!(log_start(&cluster, "g6"), 0, "slow has read nothing yet");

    // slow reads 300: the log start follows the slowest cursor.
    cluster.cli_ok(&["consume", "g6", "--subscription", "slow", "--count", "300"], None);
    assert_eq!(log_start(&cluster, "g6"), 300);
    let d = cluster.describe("g6");
    let subs = d["subscriptions"].as_array().unwrap();
    let cursor = |name: &str| subs.iter().find(|s| s["name"] == name).unwrap()["cursor"].as_u64().unwrap();
    assert_eq!((cursor("fast"), cursor("slow")), (1000, 300));
    let lag = |name: &str| subs.iter().find(|s| s["name"] == name).unwrap()["lag"].as_u64().unwrap();
    assert_eq!((lag("fast"), lag("slow")), (0, 700));

    // slow still gets exactly what it has not acknowledged.
    let rest = cluster.cli_ok(&["consume", "g6", "--subscription", "slow", "--count", "1"], None);
    assert_eq!(rest, "r-300\n");

    // Deleting slow frees what only it held, and says how much.
    let out = cluster.cli_ok(&["subscription", "delete", "g6", "slow", "--json"], None);
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["freed_records"], 1000 - 301);
    assert_eq!(log_start(&cluster, "g6"), 1000);

    // With every record read by every subscription, the log is empty but offsets go on.
    let out = cluster.cli(&["produce", "g6"], Some(b"next\n"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("offsets 1000..1000"));
    assert_eq!(cluster.cli_ok(&["consume", "g6", "--subscription", "fast"], None), "next\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_removes_it_everywhere() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("gone");
    cluster.cli_ok(&["produce", "gone"], Some(&numbered_lines("g", 100)));
    cluster.cli_ok(&["topic", "delete", "gone"], None);
    let out = cluster.cli(&["topic", "describe", "gone"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown topic"));
    // A new topic of the same name starts empty, at offset 0.
    cluster.create_topic("gone");
    let d = cluster.describe("gone");
    assert_eq!((d["log_start"].as_u64(), d["log_end"].as_u64()), (Some(0), Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_created_after_everything_was_read_says_why_it_starts_late() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("late");
    cluster.cli_ok(&["produce", "late"], Some(b"a\nb\nc\n"));
    cluster.cli_ok(&["consume", "late", "--subscription", "first", "--count", "3"], None);
    common::wait_for("the read records to be deleted", || async {
        (cluster.describe("late")["log_start"] == 3).then_some(())
    })
    .await;
    let out = cluster.cli(&["consume", "late", "--subscription", "second"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("subscription second starts at offset 3: offsets 0..2 of late were deleted once every subscription had read them"),
        "{stderr}"
    );
    // Said once, when it is created: the next read resumes quietly.
    let again = cluster.cli(&["consume", "late", "--subscription", "second"], None);
    assert!(!String::from_utf8_lossy(&again.stderr).contains("starts at offset"));
}
