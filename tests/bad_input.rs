//! G9: bad input gets a typed error naming the limit, the value and who enforced it; only
//! the offending stream or connection is closed; the server keeps serving; nothing stored is
//! lost.

mod common;

use common::{numbered_lines, Cluster};
use herald::certs::{self, CertRole};
use herald::transport::{self, Connection};
use herald::types::{SubscriptionName, TopicName};
use herald::wire::{self, Record, Request, Response, MAX_FRAME_BYTES};
use herald::Error;

async fn connect(cluster: &Cluster, addr: std::net::SocketAddr) -> Connection {
    let identity = certs::load(&cluster.certs, CertRole::Client).unwrap();
    let endpoint = transport::client_endpoint(addr, transport::client_config(&identity).unwrap()).unwrap();
    Connection::connect(&endpoint, addr).await.unwrap()
}

/// Writes raw bytes on a new stream and reads the one answer.
async fn raw_exchange(conn: &Connection, bytes: &[u8]) -> Response {
    let (mut send, mut recv) = conn.raw().open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    let body = recv.read_to_end(MAX_FRAME_BYTES).await.unwrap();
    let (resp, _): (Response, usize) = wire::decode_frame(&body, "test").unwrap().unwrap();
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_unknown_topics_and_subscriptions_get_typed_errors() {
    let cluster = Cluster::start(1).await;
    for bad in ["_internal", ".dot", "white space", "x/y", &"n".repeat(129)] {
        // A bad name is a usage error (status 2), found before anything connects.
        let out = cluster.cli(&["topic", "create", bad], None);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("invalid topic name") && stderr.contains("[A-Za-z0-9._-]"), "{stderr}");
    }
    // So are the other ways to call a command wrongly.
    for (args, says) in [
        (&["consume", "t", "--subscription", "x/y"][..], "invalid subscription name"),
        (&["topic", "create", "t", "--replicas", "0"], "between 1 and 16"),
        (&["consume", "t", "--subscription", "s", "--format", "{foo}"], "unknown field {foo}"),
        (&["topic", "alter", "t"], "nothing to change"),
        (&["consume", "t", "--subscription", "s", "--json", "--format", "{offset}"], "cannot be used with"),
    ] {
        let out = cluster.cli(args, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let out = cluster.cli(&["produce", "missing"], Some(b"x\n"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown topic \"missing\""));

    cluster.create_topic("t");
    let out = cluster.cli(&["subscription", "delete", "t", "nope"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown subscription \"nope\""));
    let out = cluster.cli(&["topic", "create", "t", "--replicas", "1"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // More replicas than live servers is a clear error, never silently fewer.
    let out = cluster.cli(&["topic", "create", "wide"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot place 3 replicas: only 1 topic servers are alive"), "{stderr}");

    // Fetching through a subscription that does not exist, straight on the wire.
    let conn = connect(&cluster, cluster.server_addr(1)).await;
    let fetch = Request::Fetch {
        topic: TopicName::new("t").unwrap(),
        subscription: SubscriptionName::new("ghost").unwrap(),
        from: None,
        max_records: 10,
        max_bytes: 1000,
        max_wait_ms: 0,
        session: None,
    };
    let err = conn.call(&fetch).await.unwrap_err();
    assert!(matches!(err, Error::UnknownSubscription { .. }), "{err}");
    // A naming request sent to a topic server is refused with the reason.
    let err = conn.call(&Request::ListTopics).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_records_are_refused_by_client_and_server_with_the_limit() {
    let cluster = Cluster::start(1).await;
    cluster.cli_ok(&["topic", "create", "small", "--replicas", "1", "--max-record-bytes", "100"], None);
    cluster.cli_ok(&["subscription", "create", "small", "s"], None);

    // The CLI refuses the record before sending it, names its line and stops there: the
    // lines before it are sent, none after. Sizes are as encoded: 150 bytes of payload, its
    // 2-byte length, and the empty key and headers.
    let input = format!("ok-1\n{}\nok-2\n", "x".repeat(150));
    let out = cluster.cli(&["produce", "small"], Some(input.as_bytes()));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2: the record is 154 bytes, over small's limit of 100 bytes"), "{stderr}");
    assert!(stderr.contains("produced 1 record ") && stderr.contains("stopped at line 2"), "{stderr}");
    assert!(stderr.contains("--skip-invalid"), "the fix is named: {stderr}");
    // With --skip-invalid the bad line is named and skipped, and the rest go through.
    let out = cluster.cli(&["produce", "small", "--skip-invalid"], Some(input.as_bytes()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("line 2: the record is 154 bytes"), "{stderr}");
    assert!(stderr.contains("produced 2 records") && stderr.contains("skipped 1 invalid line"), "{stderr}");
    let read = cluster.cli_ok(&["consume", "small", "--offset", "0"], None);
    assert_eq!(read, "ok-1\nok-1\nok-2\n");

    // A client that skips the check meets the server's, and the whole batch is refused.
    let conn = connect(&cluster, cluster.server_addr(1)).await;
    let records = vec![
        Record { payload: b"fine".to_vec(), ..Record::default() },
        Record { payload: vec![b'y'; 101], ..Record::default() },
    ];
    let req = Request::Produce { topic: TopicName::new("small").unwrap(), producer: 5, sequence: 0, records };
    match conn.call(&req).await.unwrap_err() {
        Error::RecordTooLarge { index, size, limit, enforced_by } => {
            assert_eq!((index, size, limit), (1, 104, 100));
            assert!(enforced_by.contains("topic server 1"), "{enforced_by}");
        }
        other => panic!("{other}"),
    }
    // Nothing of the refused batch was stored.
    assert_eq!(cluster.cli_ok(&["consume", "small", "--subscription", "s"], None), "ok-1\nok-1\nok-2\n");

    // A topic limit above what a frame can carry is refused at creation.
    let out =
        cluster.cli(&["topic", "create", "huge", "--replicas", "1", "--max-record-bytes", "100000000"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-record-bytes must be"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_frames_close_only_their_stream() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("safe");
    cluster.cli_ok(&["subscription", "create", "safe", "s"], None);
    cluster.cli_ok(&["produce", "safe"], Some(&numbered_lines("s", 100)));
    let conn = connect(&cluster, cluster.server_addr(1)).await;

    // Garbage with a plausible length.
    let mut garbage = 8u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 8]);
    match raw_exchange(&conn, &garbage).await {
        Response::Error(Error::Malformed { enforced_by, .. }) => {
            assert!(enforced_by.contains("topic server 1"))
        }
        other => panic!("{other:?}"),
    }
    // A length over the limit is refused before anything is allocated.
    match raw_exchange(&conn, &u32::MAX.to_be_bytes()).await {
        Response::Error(Error::FrameTooLarge { size, limit, .. }) => {
            assert_eq!((size, limit), (u32::MAX as u64, MAX_FRAME_BYTES as u64));
        }
        other => panic!("{other:?}"),
    }
    // A frame cut short.
    let mut cut = Vec::new();
    wire::encode_frame(&Request::ListTopics, &mut cut).unwrap();
    cut.truncate(cut.len() - 1);
    cut[3] += 5;
    assert!(matches!(raw_exchange(&conn, &cut).await, Response::Error(Error::Malformed { .. })));

    // The same connection still works, other clients too, and nothing stored was touched.
    let status = conn.call(&Request::TopicStatus { topic: TopicName::new("safe").unwrap() }).await.unwrap();
    assert!(matches!(status, Response::TopicStatus(s) if s.log_end == 100));
    let all = cluster.cli_ok(&["consume", "safe", "--subscription", "s"], None);
    assert_eq!(all.lines().count(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_must_start_with_a_supported_hello() {
    let cluster = Cluster::start(1).await;
    let identity = certs::load(&cluster.certs, CertRole::Client).unwrap();
    let addr = cluster.server_addr(1);
    let endpoint = transport::client_endpoint(addr, transport::client_config(&identity).unwrap()).unwrap();
    let exchange = |req: Request| {
        let endpoint = endpoint.clone();
        async move {
            let conn = endpoint.connect(addr, "127.0.0.1").unwrap().await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let mut buf = Vec::new();
            wire::encode_frame(&req, &mut buf).unwrap();
            send.write_all(&buf).await.unwrap();
            let _ = send.finish();
            let body = recv.read_to_end(MAX_FRAME_BYTES).await.unwrap();
            let (resp, _): (Response, usize) = wire::decode_frame(&body, "test").unwrap().unwrap();
            resp
        }
    };
    match exchange(Request::Hello {
        min_version: wire::PROTOCOL_VERSION + 1,
        max_version: wire::PROTOCOL_VERSION + 3,
        agent: "future".into(),
    })
    .await
    {
        Response::Error(Error::UnsupportedVersion { supported, .. }) => {
            assert_eq!(supported, wire::PROTOCOL_VERSION)
        }
        other => panic!("{other:?}"),
    }
    match exchange(Request::ListServers).await {
        Response::Error(Error::Malformed { detail, .. }) => assert!(detail.contains("Hello"), "{detail}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_before_the_log_start_names_both_offsets() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("old");
    cluster.cli_ok(&["subscription", "create", "old", "a"], None);
    cluster.cli_ok(&["produce", "old"], Some(&numbered_lines("o", 10)));
    cluster.cli_ok(&["consume", "old", "--subscription", "a"], None);
    let conn = connect(&cluster, cluster.server_addr(1)).await;
    let fetch = Request::Fetch {
        topic: TopicName::new("old").unwrap(),
        subscription: SubscriptionName::new("a").unwrap(),
        from: Some(3),
        max_records: 10,
        max_bytes: 1000,
        max_wait_ms: 0,
        session: None,
    };
    match conn.call(&fetch).await.unwrap_err() {
        e @ Error::CursorBeforeLogStart { offset: 3, log_start: 10, .. } => {
            assert!(e.to_string().contains("before the log start 10"), "{e}");
            assert!(e.to_string().contains("herald subscription reset old a --to-earliest"), "{e}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_datagrams_do_not_disturb_the_server() {
    let cluster = Cluster::start(1).await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..1200).map(|j| (i as usize * 31 + j) as u8).collect();
        socket.send_to(&junk, cluster.server_addr(1)).unwrap();
        socket.send_to(&junk[..17], cluster.naming_addr).unwrap();
    }
    cluster.create_topic("fine");
    cluster.cli_ok(&["produce", "fine"], Some(b"still here\n"));
    assert_eq!(cluster.cli_ok(&["consume", "fine", "--subscription", "s"], None), "still here\n");
}
