//! G9 against a hostile client: a raw QUIC client with the ordinary client certificate that
//! writes Herald frames by hand. Each attack gets a typed error or a closed stream; the
//! server's memory stays within a stated bound (read from `/proc/PID/status`); an honest
//! producer and consumer on the same server keep working during and after.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{read_all, sample, wait_for, Cluster, Options};
use herald::certs::{self, CertRole};
use herald::client::Client;
use herald::transport::{self, Connection};
use herald::types::{Header, Record, StoredRecord, SubscriptionName, TopicName};
use herald::wire::{self, Request, MAX_FRAME_BYTES};
use herald::Error;

const MIB: u64 = 1024 * 1024;

async fn connect(cluster: &Cluster, addr: std::net::SocketAddr) -> Result<Connection, Error> {
    let identity = certs::load(&cluster.certs, CertRole::Client).unwrap();
    let endpoint = transport::client_endpoint(addr, transport::client_config(&identity).unwrap()).unwrap();
    Connection::connect(&endpoint, addr).await
}

/// An honest producer and consumer: `n` more records produced (acked in order, dense) and
/// all `expect_total` read back in order through subscription `s`.
async fn honest_round(client: &Arc<Client>, topic: &TopicName, n: usize, expect_total: usize) {
    let producer = client.producer(topic.clone(), 16);
    let mut acks = Vec::new();
    for i in 0..n {
        let record = Record { payload: format!("h-{i}").into_bytes(), ..Record::default() };
        acks.push(producer.send(vec![record]).await.unwrap());
    }
    producer.close().await;
    let first = (expect_total - n) as u64;
    for (i, ack) in acks.into_iter().enumerate() {
        assert_eq!(ack.await.unwrap().unwrap().base, first + i as u64, "acked in order, dense");
    }
    let read = read_all(client, topic, "s").await;
    let offsets: Vec<u64> = read.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (0..expect_total as u64).collect::<Vec<_>>(), "every acked record, in order, once");
}

/// A fetch through `subscription` that answers at once (a read that does not take the
/// subscription, unless `session` is given).
fn fetch(topic: &TopicName, subscription: &str, from: Option<u64>, max_bytes: u32) -> Request {
    fetch_as(topic, subscription, from, max_bytes, None)
}

fn fetch_as(
    topic: &TopicName,
    subscription: &str,
    from: Option<u64>,
    max_bytes: u32,
    session: Option<herald::wire::ConsumerSession>,
) -> Request {
    Request::Fetch {
        topic: topic.clone(),
        subscription: SubscriptionName::new(subscription).unwrap(),
        from,
        max_records: 10_000,
        max_bytes,
        max_wait_ms: 0,
        session,
    }
}

type RawStream = (quinn::SendStream, quinn::RecvStream);

/// Opens `streams` streams that each announce a 16 MiB frame and send nothing more.
async fn announce_lengths(conn: &Connection, streams: usize) -> Vec<RawStream> {
    let mut held = Vec::new();
    for _ in 0..streams {
        let (mut send, recv) = conn.raw().open_bi().await.unwrap();
        send.write_all(&(MAX_FRAME_BYTES as u32).to_be_bytes()).await.unwrap();
        held.push((send, recv));
    }
    held
}

/// Pipelines `per_stream` copies of `req` on each of `streams` streams, never reading answers.
async fn pipeline_unread(
    conn: &Connection,
    req: &Request,
    streams: usize,
    per_stream: usize,
) -> Vec<RawStream> {
    let mut frames = Vec::new();
    for _ in 0..per_stream {
        wire::encode_frame(req, &mut frames).unwrap();
    }
    let mut held = Vec::new();
    for _ in 0..streams {
        let (mut send, recv) = conn.raw().open_bi().await.unwrap();
        send.write_all(&frames).await.unwrap();
        held.push((send, recv));
    }
    held
}

fn rss_line(what: &str, before: u64, peak: u64, after: u64) {
    eprintln!(
        "RSS under {what}: before {} MiB, peak {} MiB, after {} MiB",
        before / MIB,
        peak / MIB,
        after / MIB
    );
}

/// Attack 1: streams that announce a 16 MiB frame and send nothing more, and streams that
/// send almost all of one, on several connections. Buffers grow only as bytes arrive and
/// each connection holds at most its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_never_finished_hold_at_most_the_budget() {
    let mut cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("honest");
    cluster.cli_ok(&["subscription", "create", "honest", "s"], None);
    let client = cluster.client();
    honest_round(&client, &topic, 10, 10).await;
    let before = cluster.server(1).rss();

    let addr = cluster.server_addr(1);
    let mut attackers = Vec::new();
    let mut held = Vec::new();
    for _ in 0..3 {
        let conn = connect(&cluster, addr).await.unwrap();
        // Lengths only: 100 streams, 1.6 GB announced, 400 bytes sent.
        held.extend(announce_lengths(&conn, 100).await);
        attackers.push(conn);
    }
    // Bodies sent but for their last byte, as fast as the server takes them.
    let conn = connect(&cluster, addr).await.unwrap();
    let mut writers = Vec::new();
    for _ in 0..20 {
        let (mut send, recv) = conn.raw().open_bi().await.unwrap();
        writers.push(tokio::spawn(async move {
            let mut frame = (MAX_FRAME_BYTES as u32).to_be_bytes().to_vec();
            frame.resize(4 + MAX_FRAME_BYTES - 1, 7);
            let _ = send.write_all(&frame).await;
            (send, recv)
        }));
    }
    attackers.push(conn);
    // The server holds budgets for them: wait until it is full, then look at its memory.
    // Each connection is charged three whole frames (a fourth is over its 64 MiB budget).
    wait_for("the attackers to fill their budgets", || async {
        let held = sample(&cluster.scrape(Some(1)), "herald_budget_bytes", "").unwrap_or(0.0);
        (held >= 4.0 * 48.0 * MIB as f64).then_some(())
    })
    .await;
    // Only the connection that sent bodies holds memory for them: three frames' worth.
    let server = cluster.server(1);
    wait_for("the bodies to arrive", || async { (server.rss() > before + 40 * MIB).then_some(()) }).await;
    let mut peak = cluster.server(1).rss();
    // The honest client on its own connection is not held up.
    honest_round(&client, &topic, 10, 20).await;
    peak = peak.max(cluster.server(1).rss());
    // Lengths alone hold no memory; the bodies at most one connection's budget (64 MiB).
    assert!(peak < before + 100 * MIB, "RSS grew from {} to {} MiB", before / MIB, peak / MIB);

    for conn in &attackers {
        conn.close();
    }
    drop(held);
    for w in writers {
        w.abort();
    }
    wait_for("the budgets to be returned", || async {
        let held = sample(&cluster.scrape(Some(1)), "herald_budget_bytes", "").unwrap_or(1.0);
        (held == 0.0).then_some(())
    })
    .await;
    honest_round(&client, &topic, 10, 30).await;
    let after = cluster.server(1).rss();
    rss_line("frames never finished", before, peak, after);
}

/// Attack 2: records made of empty headers, empty batches, and records larger than what a
/// fetch asks for. Sizes are counted as encoded; the header count is capped while decoding;
/// no record blocks a subscription or a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_limits_count_encoded_sizes_and_no_record_blocks_a_reader() {
    let cluster = Cluster::start(3).await;
    cluster.cli_ok(&["topic", "create", "small", "--max-record-bytes", "1000"], None);
    let small = TopicName::new("small").unwrap();
    let client = cluster.client();
    let leader = cluster.leader_of(&small).await;
    let conn = connect(&cluster, cluster.server_addr(leader)).await.unwrap();
    let empty = |n: usize| vec![Header { name: String::new(), value: Vec::new() }; n];
    let produce = |records: Vec<Record>, sequence| Request::Produce {
        topic: small.clone(),
        producer: 77,
        sequence,
        records,
    };
    // 100 empty headers and 900 bytes of payload are over 1,000 bytes as encoded.
    let record = Record { headers: empty(100), payload: vec![1; 900], ..Record::default() };
    match conn.call(&produce(vec![record], 0)).await.unwrap_err() {
        Error::RecordTooLarge { size, limit: 1000, .. } => assert!(size > 1000, "{size}"),
        other => panic!("{other}"),
    }
    // More headers than a record may have is refused while decoding: the stream is closed.
    let record = Record { headers: empty(10_000), ..Record::default() };
    let err = conn.call(&produce(vec![record], 1)).await.unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "{err}");
    // An empty batch stores nothing and keeps no producer state.
    let err = conn.call(&produce(Vec::new(), 1)).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { .. }) && err.to_string().contains("at least one"),
        "{err}"
    );

    // Records of 7 MiB on a topic that allows them: every replica takes them, a consumer
    // reads them though it asks for 1 MiB per fetch, and a raw fetch that asks for too little
    // is told how much the next record needs.
    cluster.cli_ok(&["topic", "create", "big", "--max-record-bytes", &(8 * MIB).to_string()], None);
    cluster.cli_ok(&["subscription", "create", "big", "s"], None);
    // Holds the records, so they stay stored after `s` reads them.
    cluster.cli_ok(&["subscription", "create", "big", "hold"], None);
    let big = TopicName::new("big").unwrap();
    let producer = client.producer(big.clone(), 4);
    let mut acks = Vec::new();
    for i in 0..3u8 {
        let record = Record { payload: vec![i; 7 * MIB as usize], ..Record::default() };
        acks.push(producer.send(vec![record]).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap().unwrap();
    }
    producer.close().await;
    let mut consumer =
        client.consumer(big.clone(), SubscriptionName::new("s").unwrap(), Default::default()).await.unwrap();
    let mut got: Vec<StoredRecord> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "read {} of 3 large records in 60 s", got.len());
        let next = got.last().map(|r| r.offset + 1);
        got.extend(consumer.poll(10, Duration::from_millis(500), next).await.unwrap());
    }
    let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![0, 1, 2]);
    assert!(got.iter().enumerate().all(|(i, r)| r.record.payload == vec![i as u8; 7 * MIB as usize]));
    let big_leader = cluster.leader_of(&big).await;
    let conn = connect(&cluster, cluster.server_addr(big_leader)).await.unwrap();
    match conn.call(&fetch(&big, "hold", Some(1), 1000)).await.unwrap_err() {
        Error::FetchTooSmall { offset: 1, size, max_bytes: 1000, .. } => assert!(size > 7 * MIB, "{size}"),
        other => panic!("{other}"),
    }
    // Every replica holds all three (followers fetch entries one at a time when large).
    wait_for("every replica to hold the large records", || async {
        let status = cluster.describe("big");
        let replicas = status["replicas"].as_array().cloned().unwrap_or_default();
        (replicas.len() == 3 && replicas.iter().all(|r| r["log_end"].as_u64() == Some(3))).then_some(())
    })
    .await;
}

/// Attack 3: fetches pipelined on streams whose answers are never read. Each is charged its
/// answer before it runs, so a connection holds at most its budget in answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_answers_hold_at_most_the_budget() {
    let mut cluster = Cluster::start(1).await;
    let limit = (4 * MIB).to_string();
    cluster.cli_ok(&["topic", "create", "big", "--replicas", "1", "--max-record-bytes", &limit], None);
    cluster.cli_ok(&["subscription", "create", "big", "s"], None);
    let topic = cluster.create_topic("honest");
    cluster.cli_ok(&["subscription", "create", "honest", "s"], None);
    let client = cluster.client();
    let big = TopicName::new("big").unwrap();
    let producer = client.producer(big.clone(), 4);
    let mut acks = Vec::new();
    for i in 0..4u8 {
        let record = Record { payload: vec![i; 3 * MIB as usize], ..Record::default() };
        acks.push(producer.send(vec![record]).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap().unwrap();
    }
    producer.close().await;
    honest_round(&client, &topic, 10, 10).await;
    let before = cluster.server(1).rss();

    let conn = connect(&cluster, cluster.server_addr(1)).await.unwrap();
    // 8 streams x 50 fetches of 12 MiB answers: 4.8 GB if all were served.
    let held = pipeline_unread(&conn, &fetch(&big, "s", Some(0), 16 * MIB as u32), 8, 50).await;
    wait_for("the attacker to fill its budget", || async {
        let held = sample(&cluster.scrape(Some(1)), "herald_budget_bytes", "").unwrap_or(0.0);
        (held >= 48.0 * MIB as f64).then_some(())
    })
    .await;
    let mut peak = cluster.server(1).rss();
    honest_round(&client, &topic, 10, 20).await;
    peak = peak.max(cluster.server(1).rss());
    // At most the connection's budget in answers (64 MiB: three 12 MiB answers charged 16 MiB
    // each), plus slack for the allocator and redb's cache.
    assert!(peak < before + 120 * MIB, "RSS grew from {} to {} MiB", before / MIB, peak / MIB);
    conn.close();
    drop(held);
    honest_round(&client, &topic, 10, 30).await;
    let after = cluster.server(1).rss();
    rss_line("unread fetch answers", before, peak, after);
}

/// Connections beyond the per-address limit are refused before their handshake; closing
/// some makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_address() {
    const CAP: usize = 12;
    let options = Options { server_args: &["--max-connections-per-ip", "12"], ..Options::default() };
    let cluster = Cluster::start_with(1, options).await;
    let addr = cluster.server_addr(1);
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..CAP + 5 {
        match connect(&cluster, addr).await {
            Ok(conn) => open.push(conn),
            Err(e) => {
                assert!(matches!(e, Error::Unavailable { .. }), "{e}");
                refused += 1;
            }
        }
    }
    // The naming server's own connection to the topic server counts too.
    assert!(open.len() <= CAP && refused >= 5, "{} open, {refused} refused", open.len());
    let scraped = cluster.scrape(Some(1));
    assert!(sample(&scraped, "herald_refused_connections_total", "").unwrap_or(0.0) >= 5.0, "{scraped}");
    for conn in open.drain(..) {
        conn.close();
    }
    wait_for("a connection to be admitted again", || async { connect(&cluster, addr).await.ok() }).await;
}

/// Text people read later (a consumer's session name, shown as a subscription's holder and
/// logged) must be printable: a newline would forge a log line. Keys, data directories and
/// databases are private to the user running Herald.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_people_read_are_printable_and_files_are_private() {
    use herald::wire::ConsumerSession;
    use std::os::unix::fs::PermissionsExt;
    let mut cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("t");
    cluster.cli_ok(&["subscription", "create", "t", "s"], None);
    let conn = connect(&cluster, cluster.server_addr(1)).await.unwrap();
    let forged = "x\n2026-12-01T00:00:00.000000Z ERROR herald::naming: FORGED LINE \u{1b}[2J";
    let with_session =
        |name: String| fetch_as(&topic, "s", None, 1000, Some(ConsumerSession { id: 1, name }));
    let err = conn.call(&with_session(forged.into())).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { .. }) && err.to_string().contains("control character"),
        "{err}"
    );
    let long = with_session("n".repeat(10_000));
    assert!(matches!(conn.call(&long).await.unwrap_err(), Error::InvalidArgument { .. }));
    let log = cluster.server(1).log_text();
    assert!(!log.contains("FORGED LINE") && !log.contains('\u{1b}'), "{log}");
    let describe = cluster.cli_ok(&["topic", "describe", "t"], None);
    assert!(!describe.contains("FORGED"), "{describe}");

    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for entry in std::fs::read_dir(&cluster.certs).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with("key.pem") {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
    let data = cluster.dir.path().join("server-1");
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("herald.redb")), 0o600);
    assert_eq!(mode(&cluster.dir.path().join("naming")), 0o700);
    assert_eq!(mode(&cluster.dir.path().join("naming").join("book.redb")), 0o600);
}

/// Figures for the notes, not a check (`cargo test --release --test hostile -- --ignored
/// --nocapture`): an honest producer's throughput on one server alone and beside an attacker
/// that holds half-sent frames and unread fetch answers on the same server, median of 3 each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn honest_throughput_beside_an_attacker() {
    const RECORDS: usize = 200_000;
    let cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("honest");
    let client = cluster.client();
    let run = |client: Arc<Client>, topic: TopicName| async move {
        let started = std::time::Instant::now();
        let producer = client.producer(topic, 32);
        let mut acks = Vec::new();
        for chunk in 0..RECORDS / 100 {
            let batch = (0..100)
                .map(|i| Record { payload: vec![(chunk + i) as u8; 100], ..Record::default() })
                .collect();
            acks.push(producer.send(batch).await.unwrap());
        }
        producer.close().await;
        for ack in acks {
            ack.await.unwrap().unwrap();
        }
        RECORDS as f64 / started.elapsed().as_secs_f64()
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let mut alone = Vec::new();
    for _ in 0..3 {
        alone.push(run(client.clone(), topic.clone()).await);
    }
    // The attacker: lengths without bodies, and fetches whose answers it never reads.
    let addr = cluster.server_addr(1);
    let mut held = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..3 {
        let conn = connect(&cluster, addr).await.unwrap();
        held.extend(announce_lengths(&conn, 100).await);
        conns.push(conn);
    }
    cluster.cli_ok(&["subscription", "create", "honest", "s"], None);
    let conn = connect(&cluster, addr).await.unwrap();
    held.extend(pipeline_unread(&conn, &fetch(&topic, "s", Some(0), 16 * MIB as u32), 8, 50).await);
    conns.push(conn);
    let mut attacked = Vec::new();
    for _ in 0..3 {
        attacked.push(run(client.clone(), topic.clone()).await);
    }
    eprintln!(
        "honest produce, {RECORDS} x 100 B: alone {:.0} records/s {alone:.0?}; beside the attacker {:.0} records/s {attacked:.0?}",
        median(alone.clone()),
        median(attacked.clone())
    );
}

/// A frame whose body stops coming is answered `Malformed` and its stream closed after the
/// frame timeout; a connection left without streams is closed after the idle limit, while
/// one with a stream open stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_frames_and_idle_connections_time_out() {
    let options = Options {
        server_args: &["--frame-timeout-secs", "1", "--idle-connection-secs", "2"],
        ..Options::default()
    };
    let cluster = Cluster::start_with(1, options).await;
    let addr = cluster.server_addr(1);
    let conn = connect(&cluster, addr).await.unwrap();
    let (mut send, mut recv) = conn.raw().open_bi().await.unwrap();
    send.write_all(&100u32.to_be_bytes()).await.unwrap();
    send.write_all(b"only part of it").await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(MAX_FRAME_BYTES))
        .await
        .expect("answered within the frame timeout")
        .unwrap();
    let (resp, _): (herald::wire::Response, usize) = wire::decode_frame(&answer, "test").unwrap().unwrap();
    let err = resp.into_result().unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }) && err.to_string().contains("did not arrive"), "{err}");
    drop((send, recv));

    // `busy` keeps a stream open; `conn` has none left and is closed.
    let busy = connect(&cluster, addr).await.unwrap();
    let (mut held, _held_recv) = busy.raw().open_bi().await.unwrap();
    held.write_all(&[0, 0]).await.unwrap();
    wait_for("the idle connection to be closed", || async { conn.is_closed().then_some(()) }).await;
    assert!(!busy.is_closed(), "a connection with a stream open is not idle");
}
