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
    // The CLI says which line and why, and exits non-zero.
    let out = cluster.cli(&["produce", "people"], Some(b"{\"age\":1}\n"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("record 0") && stderr.contains("schema"), "{stderr}");

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
    send(&client, &topic, &[&acked[2]]).await.unwrap();

    // A change applies to what is produced after it, on every replica.
    cluster.cli_ok(&["schema", "set", "people", stricter.to_str().unwrap()], None);
    assert_refused(&cluster, &client, &topic, &[r#"{"name":"gus"}"#], 0).await;
    acked.push(r#"{"name":"hal","email":"h@x"}"#.into());
    send(&client, &topic, &[&acked[3]]).await.unwrap();

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
    send(&client, &topic, &[&acked[4]]).await.unwrap();
    let out = cluster.cli(&["schema", "get", "people"], None);
    assert!(out.status.success() && out.stdout.is_empty());

    // Exactly what was acked is in the log, in order.
    let read: Vec<String> = read_all(&client, &topic, "check").await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(read, acked);
}
