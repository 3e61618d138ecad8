//! Subscription admin on real processes: list (cursor, lag, bytes, last ack, consumer),
//! reset (preview, then --execute), delete (and what it frees), one consumer per
//! subscription; each also after a leader failover.

mod common;

use std::time::Duration;

use common::{numbered_lines, wait_for, Cluster, SESSION_LEASE_MS};
use herald::types::{StartFrom, SubscriptionName, TopicName};
use herald::Error;
use serde_json::Value;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `subscription list TOPIC --json`, by name.
fn subs(cluster: &Cluster, topic: &str) -> std::collections::HashMap<String, Value> {
    let list = json(&cluster.cli_ok(&["subscription", "list", topic, "--json"], None));
    list.as_array().unwrap().iter().map(|s| (s["name"].as_str().unwrap().to_string(), s.clone())).collect()
}

/// Consumes `n` records through the CLI; returns their offsets.
fn consume(cluster: &Cluster, topic: &str, sub: &str, n: usize) -> Vec<u64> {
    let out = cluster.cli_ok(
        &["consume", topic, "--subscription", sub, "--count", &n.to_string(), "--format", "{offset}"],
        None,
    );
    out.lines().map(|l| l.parse().unwrap()).collect()
}

async fn fail_over(cluster: &mut Cluster, topic: &TopicName) {
    let leader = cluster.leader_of(topic).await;
    cluster.server(leader).kill();
    wait_for("a new leader", || async { (cluster.leader_of(topic).await != leader).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_listed_reset_and_deleted_before_and_after_failover() {
    let mut cluster = Cluster::start(3).await;
    let topic = cluster.create_topic("orders");
    // `archive` never reads: it holds every record until it is deleted.
    cluster.cli_ok(&["subscription", "create", "orders", "archive"], None);
    cluster.cli_ok(&["subscription", "create", "orders", "audit"], None);
    cluster.cli_ok(&["produce", "orders"], Some(&numbered_lines("o", 100)));
    let created = json(
        &cluster.cli_ok(&["subscription", "create", "orders", "billing", "--from", "latest", "--json"], None),
    );
    assert_eq!(created["cursor"], 100);
    cluster.cli_ok(&["produce", "orders"], Some(&numbered_lines("p", 20)));

    let list = subs(&cluster, "orders");
    assert_eq!((list["audit"]["cursor"].as_u64(), list["audit"]["lag"].as_u64()), (Some(0), Some(120)));
    assert_eq!((list["billing"]["cursor"].as_u64(), list["billing"]["lag"].as_u64()), (Some(100), Some(20)));
    let (audit_bytes, billing_bytes) =
        (list["audit"]["lag_bytes"].as_u64().unwrap(), list["billing"]["lag_bytes"].as_u64().unwrap());
    assert!(billing_bytes > 20 * 3 && audit_bytes > billing_bytes * 5, "{audit_bytes} {billing_bytes}");
    assert!(list["audit"]["last_ack_ms"].is_null() && list["audit"]["consumer"].is_null());

    assert_eq!(consume(&cluster, "orders", "audit", 30), (0..30).collect::<Vec<_>>());
    let list = subs(&cluster, "orders");
    assert_eq!(list["audit"]["cursor"], 30);
    assert!(list["audit"]["last_ack_ms"].as_u64().unwrap() > 0);
    assert!(list["audit"]["consumer"].is_null(), "the CLI let go of the subscription when it ended");

    // A reset only previews without --execute.
    let preview =
        json(&cluster.cli_ok(&["subscription", "reset", "orders", "audit", "--to-earliest", "--json"], None));
    assert_eq!((preview["executed"].as_bool(), preview["cursor_after"].as_u64()), (Some(false), Some(0)));
    assert_eq!(subs(&cluster, "orders")["audit"]["cursor"], 30);
    let out = cluster.cli(&["subscription", "reset", "orders", "audit", "--to-offset", "10"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("add --execute"));
    cluster.cli_ok(&["subscription", "reset", "orders", "audit", "--to-offset", "10", "--execute"], None);
    assert_eq!(consume(&cluster, "orders", "audit", 5), (10..15).collect::<Vec<_>>());
    // Out of the stored range: a typed error, nothing moved.
    let out =
        cluster.cli(&["subscription", "reset", "orders", "audit", "--to-offset", "500", "--execute"], None);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("past the committed end"));
    assert_eq!(subs(&cluster, "orders")["audit"]["cursor"], 15);

    // After a failover the new leader lists the same cursors and lag, and resets too.
    fail_over(&mut cluster, &topic).await;
    let list = subs(&cluster, "orders");
    assert_eq!((list["audit"]["cursor"].as_u64(), list["audit"]["lag"].as_u64()), (Some(15), Some(105)));
    assert_eq!(list["billing"]["lag_bytes"].as_u64(), Some(billing_bytes));
    cluster.cli_ok(&["subscription", "reset", "orders", "billing", "--to-latest", "--execute"], None);
    assert_eq!(subs(&cluster, "orders")["billing"]["cursor"], 120);

    // Deleting the subscription that alone held the oldest records frees them, and says so.
    assert_eq!(cluster.describe("orders")["log_start"], 0);
    let deleted = json(&cluster.cli_ok(&["subscription", "delete", "orders", "archive", "--json"], None));
    assert_eq!(deleted["freed_records"], 15);
    assert!(deleted["freed_bytes"].as_u64().unwrap() > 15 * 3);
    assert_eq!(cluster.describe("orders")["log_start"], 15);
    // A cursor before the log start is refused, naming both offsets.
    let out =
        cluster.cli(&["subscription", "reset", "orders", "billing", "--to-offset", "3", "--execute"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("offset 3") && stderr.contains("log start 15"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_has_one_consumer_at_a_time_before_and_after_failover() {
    let mut cluster = Cluster::start(3).await;
    let topic = cluster.create_topic("jobs");
    cluster.cli_ok(&["produce", "jobs"], Some(&numbered_lines("j", 50)));
    let client = cluster.client();
    let sub = SubscriptionName::new("workers").unwrap();
    let busy = |r: Result<Vec<herald::wire::StoredRecord>, Error>| match r {
        Err(Error::SubscriptionBusy { holder, .. }) => holder,
        other => panic!("expected SubscriptionBusy, got {other:?}"),
    };

    let mut first = client.consumer(topic.clone(), sub.clone(), StartFrom::Earliest).await.unwrap();
    let got = first.poll(10, Duration::from_secs(1), None).await.unwrap();
    assert_eq!(got.len(), 10);
    let mut second = client.consumer(topic.clone(), sub.clone(), StartFrom::Earliest).await.unwrap();
    let holder = busy(second.poll(10, Duration::ZERO, None).await);
    assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}");
    // The CLI gets the same typed error, naming the holder.
    let out = cluster.cli(&["consume", "jobs", "--subscription", "workers", "--count", "1"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("in use by consumer pid"), "{stderr}");
    // Listing shows who holds it; a reset is refused while it is held.
    assert!(subs(&cluster, "jobs")["workers"]["consumer"].as_str().unwrap().contains("pid"));
    let out = cluster.cli(&["subscription", "reset", "jobs", "workers", "--to-earliest", "--execute"], None);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in use by"));
    // So is a delete: the holder would read on from a subscription that is gone.
    let out = cluster.cli(&["subscription", "delete", "jobs", "workers"], None);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in use by"));
    assert!(subs(&cluster, "jobs").contains_key("workers"), "still there");
    // Nor may anyone else move its cursor: an ack with no session, or another session.
    let cursor_before = subs(&cluster, "jobs")["workers"]["cursor"].clone();
    for session in [None, Some(herald::wire::ConsumerSession { id: 7, name: "intruder".into() })] {
        let ack =
            herald::wire::Request::Ack { topic: topic.clone(), subscription: sub.clone(), next: 50, session };
        match client.leader_call(&topic, &ack).await {
            Err(Error::SubscriptionBusy { holder, .. }) => assert!(holder.contains("pid"), "{holder}"),
            other => panic!("expected SubscriptionBusy, got {other:?}"),
        }
    }
    assert_eq!(subs(&cluster, "jobs")["workers"]["cursor"], cursor_before, "the cursor did not move");

    // After a failover the holder keeps reading at the new leader, and still holds it.
    fail_over(&mut cluster, &topic).await;
    let got = first.poll(10, Duration::from_secs(1), Some(got.last().unwrap().offset + 1)).await.unwrap();
    assert_eq!(got.first().unwrap().offset, 10);
    busy(second.poll(10, Duration::ZERO, None).await);

    // Released: the next consumer takes over at once, from the committed cursor.
    first.ack(got.last().unwrap().offset + 1).await.unwrap();
    first.release().await;
    let taken = second.poll(10, Duration::from_secs(1), None).await.unwrap();
    assert_eq!(taken.first().unwrap().offset, 20);

    // A holder that goes silent loses the subscription when its session lease ends.
    let mut third = client.consumer(topic.clone(), sub.clone(), StartFrom::Earliest).await.unwrap();
    busy(third.poll(10, Duration::ZERO, None).await);
    let silent_since = std::time::Instant::now();
    let taken = loop {
        match third.poll(10, Duration::ZERO, None).await {
            Ok(records) => break records,
            Err(Error::SubscriptionBusy { .. }) => {
                assert!(silent_since.elapsed() < common::DEADLINE, "the lease never ended");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(silent_since.elapsed() >= Duration::from_millis(SESSION_LEASE_MS / 2));
    assert_eq!(taken.first().unwrap().offset, 20, "the silent holder acked nothing");
    busy(second.poll(10, Duration::ZERO, None).await);
    client.close().await;
}

/// An admin may reset or delete a held subscription with `--force`: the holder is stopped
/// (`SubscriptionTakenOver`) and its stale acks cannot undo the reset; another consumer
/// takes over from the new position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_takes_a_held_subscription_and_fences_its_consumer() {
    let mut cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("forced");
    // A second subscription keeps the records read through the first (reset goes back to them).
    cluster.cli_ok(&["subscription", "create", "forced", "keeper"], None);
    cluster.cli_ok(&["produce", "forced"], Some(&numbered_lines("f", 30)));
    let client = cluster.client();
    let sub = SubscriptionName::new("workers").unwrap();
    let taken = |r: Result<Vec<herald::wire::StoredRecord>, Error>| match r {
        Err(Error::SubscriptionTakenOver { by, .. }) => assert_eq!(by, "admin"),
        other => panic!("expected SubscriptionTakenOver, got {other:?}"),
    };

    let mut holder = client.consumer(topic.clone(), sub.clone(), StartFrom::Earliest).await.unwrap();
    let got = holder.poll(10, Duration::from_secs(1), None).await.unwrap();
    holder.ack(got.last().unwrap().offset + 1).await.unwrap();
    let reset = ["subscription", "reset", "forced", "workers", "--to-earliest", "--execute"];
    let out = cluster.cli(&reset, None);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in use by"));
    let mut forced = reset.to_vec();
    forced.push("--force");
    cluster.cli_ok(&forced, None);
    assert_eq!(subs(&cluster, "forced")["workers"]["cursor"], 0);

    // The old holder is stopped, and its ack does not move the cursor past the reset.
    match holder.ack(20).await {
        Err(Error::SubscriptionTakenOver { .. }) => {}
        other => panic!("expected SubscriptionTakenOver, got {other:?}"),
    }
    taken(holder.poll(10, Duration::ZERO, None).await);
    assert_eq!(subs(&cluster, "forced")["workers"]["cursor"], 0);

    // Another consumer takes over at once, from the reset position.
    let mut next = client.consumer(topic.clone(), sub.clone(), StartFrom::Earliest).await.unwrap();
    let got = next.poll(10, Duration::from_secs(1), None).await.unwrap();
    assert_eq!(got.first().unwrap().offset, 0);
    // Delete with --force while it holds: gone, and its holder is told.
    cluster.cli_ok(&["subscription", "delete", "forced", "workers", "--force"], None);
    assert!(!subs(&cluster, "forced").contains_key("workers"));
    taken(next.poll(10, Duration::ZERO, None).await);
    // Both changes are in the audit log with who made them.
    let log = cluster.server(1).log_text();
    for what in ["subscription reset", "subscription deleted", "taken from its consumer"] {
        assert!(
            log.lines().any(|l| l.contains(what) && l.contains("admin")),
            "no {what:?} by admin in:\n{log}"
        );
    }
    client.close().await;
}

/// A released subscription is free at once, also when its consumer had a fetch ahead in
/// flight (`client::consumer`, `Ahead`): that fetch must not take the subscription again
/// after the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_subscription_is_free_at_once_after_fast_polls() {
    let cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("handover");
    cluster.cli_ok(&["produce", "handover"], Some(&numbered_lines("h", 2_000)));
    let client = cluster.client();
    let sub = SubscriptionName::new("relay").unwrap();
    for round in 0..10 {
        let mut consumer = client.consumer(topic.clone(), sub.clone(), StartFrom::Earliest).await.unwrap();
        // Polls in quick succession, acking nothing: each sends the next fetch ahead, and
        // the release is the last request.
        let mut next = 0;
        for _ in 0..3 {
            let got = consumer.poll(20, Duration::ZERO, None).await.unwrap();
            assert_eq!(got.first().map(|r| r.offset), Some(next), "round {round}");
            next = got.last().unwrap().offset + 1;
        }
        consumer.release().await;
    }
    client.close().await;
}

/// `--peek` looks from the cursor and moves nothing, so `consume --peek | head` is safe; it
/// never creates a subscription either.
#[tokio::test]
async fn a_peek_reads_from_the_cursor_and_moves_nothing() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("peeked");
    cluster.cli_ok(&["subscription", "create", "peeked", "s"], None);
    cluster.cli_ok(&["produce", "peeked"], Some(&numbered_lines("r", 10)));
    let peek = |count: &str| -> Vec<u64> {
        let args =
            ["consume", "peeked", "--subscription", "s", "--peek", "--count", count, "--format", "{offset}"];
        cluster.cli_ok(&args, None).lines().map(|l| l.parse().unwrap()).collect()
    };
    assert_eq!(peek("3"), vec![0, 1, 2]);
    assert_eq!(subs(&cluster, "peeked")["s"]["cursor"], 0, "a peek acknowledges nothing");
    assert_eq!(peek("3"), vec![0, 1, 2], "so the next look sees the same records");
    assert_eq!(consume(&cluster, "peeked", "s", 4), vec![0, 1, 2, 3]);
    assert_eq!(peek("2"), vec![4, 5], "a peek starts at the cursor");
    assert_eq!(subs(&cluster, "peeked")["s"]["cursor"], 4);
    let out = cluster.cli(&["consume", "peeked", "--subscription", "other", "--peek"], None);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("unknown subscription"), "{said}");
    assert!(!subs(&cluster, "peeked").contains_key("other"), "and none was created");
}

/// `consume --offset`, `--tail` and `--from-time` read without a subscription: they create
/// none, move no cursor, keep nothing, and say plainly when the offset asked for is gone or
/// not there yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_without_a_subscription_move_nothing_and_say_what_is_gone() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("looked");
    cluster.cli_ok(&["subscription", "create", "looked", "s"], None);
    cluster.cli_ok(&["produce", "looked"], Some(&numbered_lines("a", 10)));
    // Records 10..19 are stamped at least a millisecond after `between`.
    let between = herald::types::now_ms() + 1;
    wait_for("the clock to pass the first batch's stamp", || async {
        (herald::types::now_ms() > between).then_some(())
    })
    .await;
    cluster.cli_ok(&["produce", "looked"], Some(&numbered_lines("b", 10)));
    let read = |args: &[&str]| -> Vec<u64> {
        let mut all = vec!["consume", "looked", "--format", "{offset}"];
        all.extend_from_slice(args);
        cluster.cli_ok(&all, None).lines().map(|l| l.parse().unwrap()).collect()
    };
    assert_eq!(read(&["--offset", "15"]), (15..20).collect::<Vec<_>>());
    assert_eq!(read(&["--offset", "2", "--count", "3"]), vec![2, 3, 4]);
    assert_eq!(read(&["--tail", "4"]), (16..20).collect::<Vec<_>>());
    assert_eq!(read(&["--tail", "100"]), (0..20).collect::<Vec<_>>(), "no further back than the log");
    assert_eq!(read(&["--from-time", &between.to_string()]), (10..20).collect::<Vec<_>>());
    assert_eq!(read(&["--from-time", "1h"]), (0..20).collect::<Vec<_>>());
    assert_eq!(read(&["--offset", "20"]), Vec::<u64>::new(), "the end: nothing yet, no error");
    assert_eq!(subs(&cluster, "looked")["s"]["cursor"], 0, "no cursor moved");
    assert_eq!(subs(&cluster, "looked").len(), 1, "and no subscription was made");

    let fails = |args: &[&str], code: i32, says: &str| {
        let mut all = vec!["consume", "looked"];
        all.extend_from_slice(args);
        let out = cluster.cli(&all, None);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {said}");
        assert!(said.contains(says), "{args:?}: {said}");
    };
    fails(&["--offset", "21"], 1, "past its end: the next record will be 20");
    fails(&["--offset", "1", "--subscription", "s"], 2, "cannot be used with");
    fails(&["--tail", "1", "--from-time", "1h"], 2, "cannot be used with");
    fails(&["--from-time", "noon"], 2, "is not a time");
    // Once the only subscription read them, records are gone for readers too.
    assert_eq!(consume(&cluster, "looked", "s", 20).len(), 20);
    wait_for("the log start to pass what s read", || async {
        (cluster.describe("looked")["log_start"] == 20).then_some(())
    })
    .await;
    fails(&["--offset", "3"], 1, "was deleted: its log starts at 20");
}

/// A consumer holds back acks given to polls in quick succession (`client::ACK_EVERY`),
/// but never leaves one behind: a poll that finds nothing sends it, and so does `release`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_held_between_quick_polls_still_reach_the_cursor() {
    let cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("held");
    cluster.cli_ok(&["produce", "held"], Some(&numbered_lines("h", 40)));
    let client = cluster.client();
    let name = SubscriptionName::new("quick").unwrap();
    let mut consumer = client.consumer(topic.clone(), name.clone(), StartFrom::Earliest).await.unwrap();
    let mut next = None;
    let mut read = Vec::new();
    while read.len() < 20 {
        let records = consumer.poll(5, Duration::from_secs(5), next).await.unwrap();
        read.extend(records.iter().map(|r| r.offset));
        next = records.last().map(|r| r.offset + 1).or(next);
    }
    assert_eq!(read, (0..20).collect::<Vec<u64>>());
    // Records are left, so this poll reads them and may hold the ack of the first 20.
    let more = consumer.poll(20, Duration::from_secs(5), next).await.unwrap();
    assert_eq!(more.first().map(|r| r.offset), Some(20));
    let end = more.last().unwrap().offset + 1;
    // Nothing left: the poll sends what it holds, and the cursor gets there without another.
    assert!(consumer.poll(20, Duration::from_millis(200), Some(end)).await.unwrap().is_empty());
    wait_for("the last ack at the cursor", || async {
        (subs(&cluster, "held")["quick"]["cursor"] == end).then_some(())
    })
    .await;
    // An ack given to a poll that reads more right after an ack was sent (so it is held,
    // unless the machine took ACK_EVERY between the two), then a release.
    cluster.cli_ok(&["produce", "held"], Some(&numbered_lines("i", 6)));
    let first = consumer.poll(3, Duration::from_secs(5), None).await.unwrap();
    consumer.ack(first[0].offset + 1).await.unwrap();
    let acked = first.last().unwrap().offset + 1;
    let second = consumer.poll(3, Duration::from_secs(5), Some(acked)).await.unwrap();
    assert_eq!(second.first().map(|r| r.offset), Some(acked));
    consumer.release().await;
    assert_eq!(subs(&cluster, "held")["quick"]["cursor"], acked, "release sends a held ack");
    client.close().await;
}
