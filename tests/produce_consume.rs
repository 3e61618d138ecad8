//! Producing and consuming through the CLI and the library: dense ordered offsets, retries
//! without duplicates, independent subscriptions, resuming from the durable cursor.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{assert_history, numbered_lines, produce_in_order, wait_for, Cluster, BIN};
use herald::client::Client;
use herald::transport::Connection;
use herald::types::{StartFrom, SubscriptionName, TopicName};
use herald::wire::{Record, Request, Response};

fn lines(s: &str) -> Vec<String> {
    s.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_records_come_back_in_order_to_every_subscription() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("orders");
    // Both subscriptions exist before anything is read, so neither lets records go early.
    cluster.cli_ok(&["subscription", "create", "orders", "s1"], None);
    cluster.cli_ok(&["subscription", "create", "orders", "s2"], None);
    let n = 20_000;
    let out = cluster.cli(&["produce", "orders"], Some(&numbered_lines("o", n)));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("produced {n} records to orders (offsets 0..{})", n - 1)), "{stderr}");

    let expected: Vec<String> = (0..n).map(|i| format!("o-{i}")).collect();
    for sub in ["s1", "s2"] {
        let got = cluster
            .cli_ok(&["consume", "orders", "--subscription", sub, "--format", "{offset} {value}"], None);
        let read: Vec<(u64, String)> = got
            .lines()
            .map(|l| {
                let (o, v) = l.split_once(' ').unwrap();
                (o.parse().unwrap(), v.to_string())
            })
            .collect();
        assert_eq!(read.len(), n);
        assert_history(&read, &expected, 0);
        assert_eq!(
            read.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
            expected,
            "order per subscription"
        );
    }
    // Both subscriptions acknowledged everything: nothing is left to read, and the log is empty.
    assert_eq!(cluster.cli_ok(&["consume", "orders", "--subscription", "s1"], None), "");
    let d = cluster.describe("orders");
    assert_eq!(d["log_start"], n as u64);
    assert_eq!(d["log_end"], n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_is_not_stored_twice() {
    let cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("dedup");
    let client = cluster.client();
    let info = client.lookup(&topic).await.unwrap();
    let conn = Connection::connect(&quinn_client(&cluster), info.leader_addr().unwrap()).await.unwrap();
    let batch: Vec<Record> =
        (0..10).map(|i| Record { payload: format!("r{i}").into_bytes(), ..Record::default() }).collect();
    let produce = |seq: u64| Request::Produce {
        topic: topic.clone(),
        producer: 77,
        sequence: seq,
        records: batch.clone(),
    };
    let first = conn.call(&produce(0)).await.unwrap();
    let retry = conn.call(&produce(0)).await.unwrap();
    let next = conn.call(&produce(1)).await.unwrap();
    assert_eq!(first, Response::Produced { base: 0, count: 10, epoch: 1, duplicate: false });
    assert_eq!(retry, Response::Produced { base: 0, count: 10, epoch: 1, duplicate: true });
    assert_eq!(next, Response::Produced { base: 10, count: 10, epoch: 1, duplicate: false });
    let status = client.topic_status(&topic).await.unwrap();
    assert_eq!(status.log_end, 20, "the retry stored nothing");
    client.close().await;
}

fn quinn_client(cluster: &Cluster) -> quinn::Endpoint {
    let identity = herald::certs::load(&cluster.certs, herald::certs::CertRole::Client).unwrap();
    herald::transport::client_endpoint(
        cluster.naming_addr,
        herald::transport::client_config(&identity).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_library_producer_gets_dense_acks() {
    let cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("pipelined");
    let client = cluster.client();
    let next = produce_in_order(&client, &topic, 200, 50).await;
    assert_eq!(next, 10_000);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumer_resumes_from_its_cursor_without_skipping() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("resume");
    // Far more than a pipe buffer holds, so the killed consumer is stopped mid-stream.
    let n = 60_000;
    cluster.cli_ok(&["produce", "resume"], Some(&numbered_lines("m", n)));

    // First consumer: reads part of the topic through --count and exits: its cursor moved.
    let first =
        lines(&cluster.cli_ok(&["consume", "resume", "--subscription", "s", "--count", "1200"], None));
    assert_eq!(first.len(), 1200);
    assert_eq!(first.last().unwrap(), "m-1199");

    // Second consumer: follows, and is killed -9 while reading.
    let mut child = Command::new(BIN)
        .args(["consume", "resume", "--subscription", "s", "--follow"])
        .env("HERALD_NAMING", cluster.naming_addr.to_string())
        .env("HERALD_CERTS", &cluster.certs)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut second = Vec::new();
    let mut line = String::new();
    while second.len() < 2000 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "consumer ended early");
        second.push(line.trim_end().to_string());
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Whatever it wrote before dying is still in the pipe: that is what it delivered.
    second.extend(reader.lines().map(Result::unwrap));
    assert_eq!(second[0], "m-1200", "resumes exactly at the cursor");
    assert!(second.len() < n - 1200, "the kill landed mid-stream");

    // The cursor is somewhere within what the killed consumer delivered (it acknowledges
    // only what reached stdout), and the next consumer starts exactly there.
    let cursor = cluster.describe("resume")["subscriptions"][0]["cursor"].as_u64().unwrap() as usize;
    assert!(
        (1200..=1200 + second.len()).contains(&cursor),
        "cursor {cursor} after {} delivered",
        second.len()
    );
    // The killed consumer holds the subscription until its session lease ends; the next one
    // is told who holds it, then takes over.
    let pid = child.id();
    let third = wait_for("the killed consumer's session lease to end", || async {
        let out = cluster.cli(&["consume", "resume", "--subscription", "s"], None);
        if out.status.success() {
            return Some(lines(&String::from_utf8(out.stdout).unwrap()));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("in use by consumer pid {pid} ")), "{stderr}");
        None
    })
    .await;
    assert_eq!(third[0], format!("m-{cursor}"), "redelivery starts at the committed cursor");
    assert_eq!(third.last().unwrap(), &format!("m-{}", n - 1));
    let all: Vec<String> = first.iter().chain(&second[..cursor - 1200]).chain(&third).cloned().collect();
    let expected: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
    assert!(all == expected, "no skip, no reorder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_consumer_wakes_when_records_commit() {
    let cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("wake");
    let client: std::sync::Arc<Client> = cluster.client();
    let mut consumer =
        client.consumer(topic.clone(), SubscriptionName::new("w").unwrap(), StartFrom::Latest).await.unwrap();
    let waiter = tokio::spawn(async move {
        let records = consumer.poll(10, std::time::Duration::from_secs(30), None).await.unwrap();
        records.into_iter().map(|r| String::from_utf8(r.record.payload).unwrap()).collect::<Vec<_>>()
    });
    // Produce once the fetch is parked at the server.
    let producer = client.producer(TopicName::new("wake").unwrap(), 1);
    let started = std::time::Instant::now();
    let ack = producer.send(vec![Record { payload: b"hello".to_vec(), ..Record::default() }]).await.unwrap();
    ack.await.unwrap().unwrap();
    let got = waiter.await.unwrap();
    assert_eq!(got, ["hello"]);
    // Not a test of speed; a poll loop with a 1 s sleep or a timeout would show here as
    // waiting the whole 30 s.
    assert!(started.elapsed() < std::time::Duration::from_secs(25));
    producer.close().await;
    client.close().await;
}

/// A consumer fetches ahead while the leader has more committed (`client::consumer`, `Ahead`):
/// polls that change their size, acks between polls and a poll that waits still read every
/// record once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_of_changing_sizes_and_acks_between_them_read_every_record_once_in_order() {
    let cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("ahead");
    let client: std::sync::Arc<Client> = cluster.client();
    let producer = client.producer(topic.clone(), 4);
    let n = 200;
    for chunk in (0..n).collect::<Vec<_>>().chunks(25) {
        let records =
            chunk.iter().map(|i| Record { payload: format!("r-{i}").into_bytes(), ..Record::default() });
        producer.send(records.collect()).await.unwrap().await.unwrap().unwrap();
    }
    let mut consumer = client
        .consumer(topic.clone(), SubscriptionName::new("a").unwrap(), StartFrom::Earliest)
        .await
        .unwrap();
    let sizes = [3u32, 3, 2, 7, 7, 1, 40, 40, 5];
    let mut read: Vec<(u64, String)> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for round in 0.. {
        assert!(std::time::Instant::now() < deadline, "read {} of {n} records", read.len());
        if read.len() == n {
            break;
        }
        let max = sizes[round % sizes.len()];
        let wait = if round % 2 == 0 { std::time::Duration::ZERO } else { std::time::Duration::from_secs(1) };
        let got = consumer.poll(max, wait, None).await.unwrap();
        assert!(got.len() <= max as usize, "asked for {max}, got {}", got.len());
        read.extend(got.into_iter().map(|r| (r.offset, String::from_utf8(r.record.payload).unwrap())));
        if round % 3 == 2 {
            let next = read.last().map_or(0, |(o, _)| o + 1);
            assert_eq!(consumer.ack(next).await.unwrap(), next);
        }
    }
    let expected: Vec<(u64, String)> = (0..n as u64).map(|i| (i, format!("r-{i}"))).collect();
    assert!(read == expected, "every record once, in order");
    // Caught up: a poll that waits is answered by the next record.
    let waiter = tokio::spawn(async move {
        let got = consumer.poll(10, std::time::Duration::from_secs(30), None).await.unwrap();
        got.into_iter().map(|r| (r.offset, String::from_utf8(r.record.payload).unwrap())).collect::<Vec<_>>()
    });
    let late = vec![Record { payload: b"late".to_vec(), ..Record::default() }];
    producer.send(late).await.unwrap().await.unwrap().unwrap();
    assert_eq!(waiter.await.unwrap(), [(n as u64, "late".to_string())]);
    producer.close().await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_output_formats_and_head_exits_quietly() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("fmt");
    for sub in ["j", "t", "h"] {
        cluster.cli_ok(&["subscription", "create", "fmt", sub], None);
    }
    cluster.cli_ok(&["produce", "fmt", "--key", "k1", "--header", "h=v"], Some(b"alpha\nbeta\n"));
    let json = cluster.cli_ok(&["consume", "fmt", "--subscription", "j", "--json"], None);
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(first["offset"], 0);
    assert_eq!(first["key"], "k1");
    assert_eq!(first["headers"]["h"], "v");
    assert_eq!(first["value"], "alpha");
    let tsv = cluster
        .cli_ok(&["consume", "fmt", "--subscription", "t", "--format", "{offset}\\t{key}\\t{value}"], None);
    assert_eq!(tsv, "0\tk1\talpha\n1\tk1\tbeta\n");

    // `consume | head -1`: exits 0 without noise when the reader goes away.
    cluster.cli_ok(&["produce", "fmt"], Some(&numbered_lines("x", 50_000)));
    let sh = format!(
        "HERALD_NAMING={} HERALD_CERTS={} {BIN} consume fmt --subscription h | head -1",
        cluster.naming_addr,
        cluster.certs.display()
    );
    let out = Command::new("bash").args(["-o", "pipefail", "-c", &sh]).output().unwrap();
    assert!(out.status.success(), "status {} stderr {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alpha\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_produce_and_consume_with_a_summary_and_status_130() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("stop");
    let herald = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("HERALD_NAMING", cluster.naming_addr.to_string())
            .env("HERALD_CERTS", &cluster.certs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let interrupt = |child: &std::process::Child| {
        assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    };

    // A producer whose input never ends: stopped by Ctrl-C, it says how many were acked.
    let mut producer = herald(&["produce", "stop"]);
    let mut input = producer.stdin.take().unwrap();
    std::io::Write::write_all(&mut input, b"a\nb\nc\n").unwrap();
    wait_for("three records", || async { (cluster.describe("stop")["log_end"] == 3).then_some(()) }).await;
    interrupt(&producer);
    let out = producer.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("produced 3 records to stop (offsets 0..2)") && stderr.contains("interrupted"),
        "{stderr}"
    );
    drop(input);

    // A consumer waiting for more than there is: interrupted, it is no success.
    let mut consumer = herald(&["consume", "stop", "--subscription", "s", "--count", "10"]);
    let mut stdout = BufReader::new(consumer.stdout.take().unwrap());
    let mut line = String::new();
    for _ in 0..3 {
        line.clear();
        stdout.read_line(&mut line).unwrap();
    }
    assert_eq!(line, "c\n");
    interrupt(&consumer);
    let out = consumer.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("consumed 3 records") && stderr.contains("interrupted before 10 records"),
        "{stderr}"
    );
}

/// The common flags have short forms: `produce -k -H -n`, `consume -s -n`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_flags_do_what_the_long_ones_do() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("short");
    let out = cluster.cli(&["produce", "short", "-k", "k1", "-H", "h=v", "-n", "2"], Some(b"a\nb\nc\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = cluster.cli_ok(&["consume", "short", "-s", "s", "-n", "2", "--json"], None);
    let records: Vec<serde_json::Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (r["key"].as_str().unwrap(), r["headers"]["h"].as_str().unwrap(), r["value"].as_str().unwrap())
        })
        .collect();
    assert_eq!(got, [("k1", "v", "a"), ("k1", "v", "b")], "-n 2 stopped the produce after two");
}

/// Input like kcat's and rpk's: `KEY:VALUE` lines, JSON lines (what `consume --json`
/// writes goes back in byte for byte, binary values included), one record per file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_reads_keyed_lines_json_lines_and_files() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("keyed");
    cluster.create_topic("copy");
    cluster.cli_ok(&["produce", "keyed", "-K", ":"], Some(b"k1:v1\nk2:v:2\n"));
    let json = cluster.cli_ok(
        &["produce", "keyed", "--input", "json"],
        Some(
            br#"{"key":"k3","headers":{"h":"x","bin_base64":"/wA="},"value_base64":"AP8="}
{"key":null,"value":{"n":1}}
"#,
        ),
    );
    assert!(json.is_empty(), "records go out, nothing to stdout: {json}");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.txt"));
    std::fs::write(&a, [0xffu8, 0, b'\n', 1]).unwrap();
    std::fs::write(&b, b"whole\nfile\n").unwrap();
    cluster.cli_ok(&["produce", "keyed", "--file", a.to_str().unwrap(), "--file", b.to_str().unwrap()], None);
    let out = cluster.cli(&["produce", "keyed", "--file", "/nonexistent/x"], None);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("file /nonexistent/x: reading it"), "{said}");

    let dump = cluster.cli_ok(&["consume", "keyed", "--offset", "0", "--json"], None);
    let records: Vec<serde_json::Value> = dump.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let keys: Vec<Option<&str>> = records.iter().map(|r| r["key"].as_str()).collect();
    assert_eq!(keys, [Some("k1"), Some("k2"), Some("k3"), None, None, None]);
    assert_eq!(
        (records[1]["value"].as_str(), records[3]["value"].as_str()),
        (Some("v:2"), Some(r#"{"n":1}"#))
    );
    assert_eq!(
        (records[2]["value_base64"].as_str(), records[2]["headers"]["bin_base64"].as_str()),
        (Some("AP8="), Some("/wA="))
    );
    assert_eq!(
        (records[4]["value_base64"].as_str(), records[5]["value"].as_str()),
        (Some("/wAKAQ=="), Some("whole\nfile\n"))
    );

    // What consume --json wrote, produced again, reads back the same (offsets aside).
    cluster.cli_ok(&["produce", "copy", "--input", "json"], Some(dump.as_bytes()));
    let copied = cluster.cli_ok(&["consume", "copy", "--offset", "0", "--json"], None);
    let strip = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("timestamp_ms");
                v
            })
            .collect()
    };
    assert_eq!(strip(&copied), strip(&dump));
    // A line without the delimiter is named, and stops the input there.
    let out = cluster.cli(&["produce", "keyed", "-K", ":"], Some(b"k:v\nnokey\nk:w\n"));
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("line 2: no key delimiter \":\"") && said.contains("produced 1 record "), "{said}");
}
