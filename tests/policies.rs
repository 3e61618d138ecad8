//! Topic policies on real processes: schemas (G10), before and after a leader failover and a
//! restart of every server.

mod common;

use std::sync::Arc;

use common::{read_all, wait_for, Cluster};
use herald::client::Client;
use herald::types::TopicName;
use herald::wire::Record;
use herald::Error;

const PERSON: &str = r#"{
  "type": "object",
  "required": ["name"],
  "properties": { "name": { "type": "string" }, "age": { "type": "integer", "minimum": 0 } }
}"#;

const WITH_EMAIL: &str = r#"{ "type": "object", "required": ["name", "email"] }"#;

fn records(payloads: &[&str]) -> Vec<Record> {
    payloads.iter().map(|p| Record { payload: p.as_bytes().to_vec(), ..Record::default() }).collect()
}

/// Sends one batch and waits for its ack.
async fn send(client: &Arc<Client>, topic: &TopicName, payloads: &[&str]) -> Result<u64, Error> {
    let producer = client.producer(topic.clone(), 1);
    let ack = producer.send(records(payloads)).await?.await.expect("an answer");
    producer.close().await;
    ack.map(|a| a.base)
}

/// Asserts that a batch is refused for a schema violation at `index`, with nothing appended.
async fn assert_refused(
    cluster: &Cluster,
    client: &Arc<Client>,
    topic: &TopicName,
    payloads: &[&str],
    index: u32,
) {
    let before = cluster.describe(topic.as_str())["log_end"].as_u64().unwrap();
    match send(client, topic, payloads).await {
        Err(Error::SchemaViolation { index: i, topic: t, detail }) => {
            assert_eq!((i, t.as_str()), (index, topic.as_str()), "{detail}");
            assert!(!detail.is_empty());
        }
        other => panic!("expected a schema violation at record {index}, got {other:?}"),
    }
    let after = cluster.describe(topic.as_str())["log_end"].as_u64().unwrap();
    assert_eq!(before, after, "a refused batch appends nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_refuse_bad_batches_whole_and_follow_changes_across_failover_and_restart() {
    let mut cluster = Cluster::start(3).await;
    let schema = cluster.dir.path().join("person.json");
    std::fs::write(&schema, PERSON).unwrap();
    let stricter = cluster.dir.path().join("email.json");
    std::fs::write(&stricter, WITH_EMAIL).unwrap();
    let path = schema.to_str().unwrap();

    // A schema that is not one is refused at creation with the reason.
    let bad = cluster.dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"type": 12}"#).unwrap();
    let out = cluster.cli(&["topic", "create", "nope", "--schema", bad.to_str().unwrap()], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid JSON Schema"));

    cluster.cli_ok(&["topic", "create", "people", "--schema", path], None);
    let topic = TopicName::new("people").unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&cluster.cli_ok(&["schema", "get", "people", "--json"], None)).unwrap();
    assert_eq!(got["schema"], serde_json::from_str::<serde_json::Value>(PERSON).unwrap());

    // Good records pass; a batch with one bad record is refused whole, naming its index.
    let client = cluster.client();
    let mut acked = vec![r#"{"name":"ada"}"#.to_string(), r#"{"name":"bob","age":3}"#.to_string()];
    assert_eq!(send(&client, &topic, &[&acked[0], &acked[1]]).await.unwrap(), 0);
    assert_refused(&cluster, &client, &topic, &[r#"{"name":"cy"}"#, r#"{"name":"di","age":-1}"#], 1).await;
    assert_refused(&cluster, &client, &topic, &["not json"], 0).await;
    // The CLI says which line and why before sending it, and exits non-zero; with
    // --skip-invalid the good lines around a bad one go through.
    let out = cluster.cli(&["produce", "people"], Some(b"{\"age\":1}\n"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 1: it does not match people's schema"), "{stderr}");
    let input = b"{\"name\":\"eve\"}\n{\"age\":1}\nnot json\n{\"name\":\"flo\"}\n";
    let out = cluster.cli(&["produce", "people", "--skip-invalid"], Some(input));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("line 2: it does not match") && stderr.contains("line 3: it does not match"),
        "{stderr}"
    );
    assert!(stderr.contains("produced 2 records") && stderr.contains("skipped 2 invalid lines"), "{stderr}");
    acked.extend([r#"{"name":"eve"}"#.to_string(), r#"{"name":"flo"}"#.to_string()]);

    // A new leader enforces the same schema.
    let leader = cluster.leader_of(&topic).await;
    cluster.server(leader).kill();
    wait_for("a new leader", || async {
        let l = cluster.leader_of(&topic).await;
        (l != leader).then_some(())
    })
    .await;
    let client = cluster.client();
    assert_refused(&cluster, &client, &topic, &[r#"{"name":"ed"}"#, r#"{"name":5}"#], 1).await;
    acked.push(r#"{"name":"fay"}"#.into());
    send(&client, &topic, &[acked.last().unwrap()]).await.unwrap();

    // A change applies to what is produced after it, on every replica.
    cluster.cli_ok(&["schema", "set", "people", stricter.to_str().unwrap()], None);
    assert_refused(&cluster, &client, &topic, &[r#"{"name":"gus"}"#], 0).await;
    acked.push(r#"{"name":"hal","email":"h@x"}"#.into());
    send(&client, &topic, &[acked.last().unwrap()]).await.unwrap();

    // It survives a restart of every server (the dead one included) and of the naming server.
    client.close().await;
    cluster.restart_naming();
    for id in 1..=3 {
        cluster.restart_server(id);
    }
    cluster.wait_alive(3).await;
    let client = cluster.client();
    wait_for("the topic to lead again", || async {
        cluster.client().lookup(&topic).await.ok().filter(|i| i.epoch > 0).map(|_| ())
    })
    .await;
    assert_refused(&cluster, &client, &topic, &[r#"{"name":"ida"}"#], 0).await;

    // Without a schema the topic takes any bytes again.
    cluster.cli_ok(&["schema", "set", "people", "--none"], None);
    acked.push("any bytes".into());
    send(&client, &topic, &[acked.last().unwrap()]).await.unwrap();
    let out = cluster.cli(&["schema", "get", "people"], None);
    assert!(out.status.success() && out.stdout.is_empty());

    // Exactly what was acked is in the log, in order.
    let read: Vec<String> = read_all(&client, &topic, "check").await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(read, acked);
}

/// Sends batches of `size` records of `bytes` bytes until one is refused; returns the acked
/// payloads and the refusal.
async fn fill(client: &Arc<Client>, topic: &TopicName, prefix: &str, size: usize) -> (Vec<String>, Error) {
    let mut acked = Vec::new();
    for b in 0..1000 {
        let payloads: Vec<String> =
            (0..size).map(|i| format!("{prefix}-{b}-{i}-{}", "x".repeat(80))).collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        match send(client, topic, &refs).await {
            Ok(_) => acked.extend(payloads),
            Err(e) => return (acked, e),
        }
    }
    panic!("the backlog limit never refused a batch");
}

/// Reads everything committed through `sub` with a consumer that acks as it goes.
async fn drain(client: &Arc<Client>, topic: &TopicName, sub: &str) -> Vec<(u64, String)> {
    let name = herald::types::SubscriptionName::new(sub).unwrap();
    let mut consumer =
        client.consumer(topic.clone(), name, herald::types::StartFrom::Earliest).await.unwrap();
    let mut out: Vec<(u64, String)> = Vec::new();
    loop {
        let ack = out.last().map(|(o, _)| o + 1);
        let records = consumer.poll(1000, std::time::Duration::ZERO, ack).await.unwrap();
        if records.is_empty() {
            if let Some(next) = ack {
                consumer.ack(next).await.unwrap();
            }
            break;
        }
        out.extend(records.into_iter().map(|r| (r.offset, String::from_utf8(r.record.payload).unwrap())));
    }
    consumer.release().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reject_policy_stops_producers_at_the_limit_until_subscriptions_read() {
    let mut cluster = Cluster::start(3).await;
    cluster.cli_ok(&["topic", "create", "capped", "--backlog-limit", "20000"], None);
    cluster.cli_ok(&["subscription", "create", "capped", "slow"], None);
    let topic = TopicName::new("capped").unwrap();
    let client = cluster.client();
    let mut acked = Vec::new();
    for round in 0..2 {
        let (more, refusal) = fill(&client, &topic, &format!("r{round}"), 10).await;
        assert!(!more.is_empty());
        acked.extend(more);
        match refusal {
            Error::BacklogFull { topic: t, limit, backlog, oldest_held_by, .. } => {
                assert_eq!((t.as_str(), limit, oldest_held_by.as_deref()), ("capped", 20000, Some("slow")));
                assert!(backlog <= limit && backlog > limit / 2, "{backlog}");
            }
            other => panic!("expected BacklogFull, got {other:?}"),
        }
        // The CLI says so too, and nothing it sent was acked.
        let before = cluster.describe("capped")["log_end"].clone();
        let line = format!("{}\n", "y".repeat(1500));
        let out = cluster.cli(&["produce", "capped"], Some(line.as_bytes()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("backlog limit is 20000 bytes"), "{stderr}");
        assert!(stderr.contains("subscription \"slow\" holds the oldest records"), "{stderr}");
        assert_eq!(cluster.describe("capped")["log_end"], before);

        // Once the subscription reads, its records are freed and producers go on.
        let read = drain(&client, &topic, "slow").await;
        assert_eq!(
            read.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
            acked[acked.len() - read.len()..]
        );
        wait_for("the read records to be freed", || async {
            let d = cluster.describe("capped");
            (d["backlog_bytes"].as_u64().unwrap() < 1000).then_some(())
        })
        .await;
        let extra = format!("after-{round}");
        send(&client, &topic, &[&extra]).await.unwrap();
        acked.push(extra);
        // Round two runs against a new leader.
        if round == 0 {
            let leader = cluster.leader_of(&topic).await;
            cluster.server(leader).kill();
            wait_for("a new leader", || async { (cluster.leader_of(&topic).await != leader).then_some(()) })
                .await;
        }
    }
    // Every acked record was read once, in order, by the one subscription.
    let rest = drain(&client, &topic, "slow").await;
    assert_eq!(rest.last().map(|(_, p)| p.as_str()), Some("after-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evict_policy_moves_the_slowest_cursor_and_tells_its_next_consumer() {
    let mut cluster = Cluster::start(3).await;
    cluster.cli_ok(
        &["topic", "create", "evicting", "--backlog-limit", "20000", "--backlog-policy", "evict"],
        None,
    );
    cluster.cli_ok(&["subscription", "create", "evicting", "slow"], None);
    cluster.cli_ok(&["subscription", "create", "evicting", "fast"], None);
    let topic = TopicName::new("evicting").unwrap();
    let client = cluster.client();

    // `fast` keeps up; `slow` reads nothing while 4x the limit goes through.
    let mut fast = Vec::new();
    for b in 0..80 {
        let payloads: Vec<String> = (0..10).map(|i| format!("e-{b}-{i}-{}", "x".repeat(80))).collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        send(&client, &topic, &refs).await.expect("evict never refuses a topic with subscriptions");
        fast.extend(drain(&client, &topic, "fast").await);
    }
    assert_eq!(fast.len(), 800, "the fast subscription lost nothing");
    let subs = |cluster: &Cluster| -> serde_json::Value {
        let list: serde_json::Value =
            serde_json::from_str(&cluster.cli_ok(&["subscription", "list", "evicting", "--json"], None))
                .unwrap();
        let by_name = |n: &str| list.as_array().unwrap().iter().find(|s| s["name"] == n).unwrap().clone();
        serde_json::json!({ "slow": by_name("slow"), "fast": by_name("fast") })
    };
    let list = subs(&cluster);
    let evicted = list["slow"]["evicted"].as_u64().unwrap();
    assert!(evicted > 0 && list["slow"]["evicted_at_ms"].as_u64().is_some(), "{list}");
    assert_eq!(list["fast"]["evicted"], 0);
    assert_eq!(list["slow"]["cursor"].as_u64().unwrap(), evicted, "moved forward by what it lost");
    let described = cluster.describe("evicting");
    assert!(described["backlog_bytes"].as_u64().unwrap() <= 20000 + 2000, "{described}");
    assert!(described["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["evicted"].as_u64() == Some(evicted)));

    // The eviction record is replicated: a consumer at a new leader is told of it.
    let leader = cluster.leader_of(&topic).await;
    cluster.server(leader).kill();
    wait_for("a new leader", || async { (cluster.leader_of(&topic).await != leader).then_some(()) }).await;
    let out = cluster.cli(&["consume", "evicting", "--subscription", "slow", "--format", "{offset}"], None);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains(&format!("warning: {evicted} records of evicting were evicted from subscription slow")),
        "{stderr}"
    );
    let offsets: Vec<u64> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(offsets, (evicted..800).collect::<Vec<_>>(), "it goes on from the moved cursor, in order");
    // Told once.
    cluster.cli_ok(&["produce", "evicting"], Some(b"later\n"));
    let out = cluster.cli(&["consume", "evicting", "--subscription", "slow"], None);
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("evicted"));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "later\n");

    // The new leader evicts too, and adds to the record.
    for b in 0..40 {
        let payloads: Vec<String> = (0..10).map(|i| format!("n-{b}-{i}-{}", "x".repeat(80))).collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        send(&client, &topic, &refs).await.unwrap();
        drain(&client, &topic, "fast").await;
    }
    let list = subs(&cluster);
    let more = list["slow"]["evicted"].as_u64().unwrap();
    assert!(more > evicted, "{list}");
    let out = cluster.cli(&["consume", "evicting", "--subscription", "slow", "--format", "{offset}"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("warning: {} records of evicting", more - evicted)), "{stderr}");
    let offsets: Vec<u64> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(offsets.last(), Some(&1200), "read on to the end");
    assert_eq!(offsets.first().copied(), list["slow"]["cursor"].as_u64());
}
