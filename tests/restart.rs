//! G1 and G7 on one replica: `kill -9` of a topic server (mid-produce), of the naming server,
//! and of everything at once loses nothing acknowledged; subscriptions resume at their cursor.

mod common;

use common::{assert_history, numbered_lines, read_all, wait_for, Cluster};
use herald::wire::Record;

fn record(s: &str) -> Record {
    Record { payload: s.as_bytes().to_vec(), ..Record::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_topic_server_mid_produce_loses_no_acked_record() {
    let mut cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("durable");
    // A subscription exists from the start, so nothing is deleted while we check.
    cluster.cli_ok(&["subscription", "create", "durable", "keep"], None);
    let client = cluster.client();
    let producer = client.producer(topic.clone(), 8);
    let mut pending = Vec::new();
    let mut sent = Vec::new();
    for b in 0..300 {
        let batch: Vec<String> = (0..20).map(|i| format!("b{b}-{i}")).collect();
        sent.push(batch.clone());
        pending.push(producer.send(batch.iter().map(|s| record(s)).collect()).await.unwrap());
        if b == 100 {
            // Once records are committed, kill -9 the server with batches in flight.
            wait_for("records to commit", || async {
                (client.topic_status(&topic).await.ok()?.commit > 0).then_some(())
            })
            .await;
            cluster.restart_server(1);
        }
    }
    producer.close().await;
    let mut acked = Vec::new();
    let mut next_offset = 0;
    for (batch, ack) in sent.iter().zip(pending) {
        let ack = ack.await.unwrap().expect("the producer retries through the restart");
        assert_eq!(ack.base, next_offset, "acks stay dense across the restart");
        next_offset += ack.count as u64;
        acked.extend(batch.iter().cloned());
    }
    let client2 = cluster.client();
    let read = read_all(&client2, &topic, "check").await;
    client2.close().await;
    assert_eq!(read.len(), acked.len(), "every acked record once, nothing more");
    assert_history(&read, &acked, 0);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_killed_and_restarted_keeps_records_and_cursors() {
    let mut cluster = Cluster::start(2).await;
    cluster.create_topic("one");
    cluster.create_topic("two");
    for t in ["one", "two"] {
        cluster.cli_ok(&["subscription", "create", t, "a"], None);
        cluster.cli_ok(&["subscription", "create", t, "b"], None);
        cluster.cli_ok(&["produce", t], Some(&numbered_lines(t, 3000)));
        cluster.cli_ok(&["consume", t, "--subscription", "a", "--count", "1000"], None);
    }
    let before: Vec<serde_json::Value> = ["one", "two"].iter().map(|t| cluster.describe(t)).collect();

    // kill -9 everything, then start it all again from the same data directories.
    cluster.naming.kill();
    for id in [1, 2] {
        cluster.server(id).kill();
    }
    cluster.restart_naming();
    for id in [1, 2] {
        cluster.restart_server(id);
    }
    cluster.wait_alive(2).await;

    for (t, before) in ["one", "two"].iter().zip(before) {
        // Records and cursors come back whole; the commit offset climbs back as the replicas
        // report in, and a slow re-registration may even cause an election (a newer epoch).
        // (The last ack times are the old leader's memory: they are not compared.)
        let fields = ["id", "log_start", "log_end", "commit"];
        let cursors =
            |d: &serde_json::Value| -> Vec<(serde_json::Value, serde_json::Value, serde_json::Value)> {
                let subs = d["subscriptions"].as_array().cloned().unwrap_or_default();
                subs.iter()
                    .map(|s| (s["name"].clone(), s["cursor"].clone(), s["lag_bytes"].clone()))
                    .collect()
            };
        let after = wait_for(&format!("{t} to come back as it was"), || async {
            let after = cluster.describe(t);
            (fields.iter().all(|f| after[f] == before[f]) && cursors(&after) == cursors(&before))
                .then_some(after)
        })
        .await;
        assert!(after["epoch"].as_u64() >= before["epoch"].as_u64(), "epochs never go back");
        // a resumes at 1000, b at 0: both see the rest in order.
        let a = cluster.cli_ok(&["consume", t, "--subscription", "a"], None);
        let expect_a: String = (1000..3000).map(|i| format!("{t}-{i}\n")).collect();
        assert_eq!(a, expect_a);
        let b = cluster.cli_ok(&["consume", t, "--subscription", "b"], None);
        assert_eq!(b.lines().count(), 3000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_naming_server_restart_does_not_interrupt_clients_for_long() {
    let mut cluster = Cluster::start(1).await;
    cluster.create_topic("steady");
    cluster.cli_ok(&["subscription", "create", "steady", "s"], None);
    cluster.cli_ok(&["produce", "steady"], Some(&numbered_lines("x", 100)));
    cluster.naming.kill();
    // While the naming server is down, a new producer cannot resolve the topic: it keeps
    // trying, and goes through once the naming server is back.
    let child = cluster.cli_spawn(&["produce", "steady"], Some(&numbered_lines("y", 100)));
    cluster.restart_naming();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all = cluster.cli_ok(&["consume", "steady", "--subscription", "s"], None);
    assert_eq!(all.lines().count(), 200);
}
