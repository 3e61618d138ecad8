//! Topic servers register with the naming server; topics are placed on live servers; the
//! book survives a naming server `kill -9`.

mod common;

use common::{wait_for, Cluster};
use herald::types::TopicName;
use herald::wire::TopicConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_register_and_the_book_survives_a_naming_restart() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let servers = client.list_servers().await.unwrap();
    let ids: Vec<u64> = servers.iter().map(|s| s.id).collect();
    assert_eq!(ids, [1, 2, 3]);
    for s in &servers {
        assert!(s.alive, "server {} should be alive", s.id);
        assert_eq!(s.addr, cluster.server_addr(s.id));
    }

    // Placement goes to the least loaded live servers: three topics land on three servers.
    let mut leaders = Vec::new();
    for name in ["a", "b", "c"] {
        let info =
            client.create_topic(&TopicName::new(name).unwrap(), 1, TopicConfig::default()).await.unwrap();
        leaders.push(info.leader);
    }
    leaders.sort();
    assert_eq!(leaders, [1, 2, 3]);
    // `topic list` on the CLI shows them.
    let list = cluster.cli_ok(&["topic", "list", "--json"], None);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3);

    cluster.naming.kill();
    cluster.restart_naming();
    // After the restart the book still knows every server and topic, and servers renew
    // their leases on their own.
    cluster.wait_alive(3).await;
    let servers: serde_json::Value =
        serde_json::from_str(&cluster.cli_ok(&["servers", "--json"], None)).unwrap();
    let servers = servers.as_array().unwrap();
    assert_eq!(servers.len(), 3);
    for s in servers {
        assert_eq!(s["alive"], true);
        assert_eq!(s["replicas"], 1);
        assert_eq!(s["leaders"], 1);
        assert_eq!(s["preferred_leaders"], 1);
        let id = s["id"].as_u64().unwrap();
        assert_eq!(s["address"], cluster.server_addr(id).to_string());
    }
    let topics = client.list_topics().await.unwrap();
    let names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    // And new topics get fresh ids.
    let d = client.create_topic(&TopicName::new("d").unwrap(), 1, TopicConfig::default()).await.unwrap();
    assert!(topics.iter().all(|t| t.id < d.id));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_gets_no_new_topics_and_too_few_servers_is_an_error() {
    let mut cluster = Cluster::start(2).await;
    let client = cluster.client();
    cluster.server(2).kill();
    wait_for("server 2 to lose its lease", || async {
        let servers = client.list_servers().await.ok()?;
        servers.iter().any(|s| s.id == 2 && !s.alive).then_some(())
    })
    .await;
    for name in ["x", "y"] {
        let info =
            client.create_topic(&TopicName::new(name).unwrap(), 1, TopicConfig::default()).await.unwrap();
        assert_eq!(info.leader, 1, "only server 1 is alive");
    }
    let err =
        client.create_topic(&TopicName::new("z").unwrap(), 2, TopicConfig::default()).await.unwrap_err();
    assert!(matches!(err, herald::Error::NotEnoughServers { requested: 2, live: 1 }), "{err}");
    client.close().await;
}

/// A topic its replicas never take on (here: a paused server, still within its lease) is an
/// error naming what happened, not a success; it becomes usable once they do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_no_replica_takes_on_is_an_error_until_they_do() {
    let mut cluster = Cluster::start(1).await;
    let client = cluster.client();
    // Placement needs the server alive in the book: pause it right after a heartbeat renewed
    // its lease. A loaded machine may take longer than the lease to create the topic; try
    // again then (a few times, each with a new name).
    let mut placed = None;
    for attempt in 0..5 {
        let name = TopicName::new(format!("unplaced-{attempt}")).unwrap();
        cluster.wait_alive(1).await;
        cluster.server(1).signal("STOP");
        let result = client.create_topic(&name, 1, TopicConfig::default()).await;
        cluster.server(1).signal("CONT");
        match result {
            Err(herald::Error::NotEnoughServers { .. }) => continue,
            Err(herald::Error::NotPlaced { topic, hosting: 0, replicas: 1, leader_hosts: false, .. }) => {
                assert_eq!(topic, name.as_str());
                placed = Some(name);
                break;
            }
            other => panic!("expected NotPlaced, got {other:?}"),
        }
    }
    let name = placed.expect("the server stayed paused within its lease in one of 5 attempts");
    // It stays in the book, and takes records once the server hosts it.
    client.lookup(&name).await.unwrap();
    let acked = common::produce_in_order(&client, &name, 3, 2).await;
    assert_eq!(acked, 6);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_node_and_the_topic() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("logged");
    let log = cluster.dir.path().join("naming.log");
    let line = wait_for("the topic creation in the naming server's JSON log", || async {
        let text = std::fs::read_to_string(&log).ok()?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
            .collect();
        lines.into_iter().find(|l| l["message"] == "topic created")
    })
    .await;
    assert_eq!(line["topic"], "logged");
    assert_eq!(line["principal"], "admin", "admin changes name who made them");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["spans"][0]["node"], "naming", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_take_a_list_of_naming_servers_by_name_and_skip_one_that_is_down() {
    let cluster = Cluster::start(1).await;
    let down = format!("127.0.0.1:{}", common::free_port());
    let list = format!("{down},localhost:{}", cluster.naming_addr.port());
    cluster.cli_ok(&["--naming", &list, "topic", "create", "listed", "--replicas", "1"], None);
    cluster.cli_ok(&["--naming", &list, "produce", "listed"], Some(b"a\nb\n"));
    let read = cluster
        .cli_ok(&["--naming", &list, "consume", "listed", "--subscription", "s", "--count", "2"], None);
    assert_eq!(read, "a\nb\n");

    // An address that is no address is a usage error that names it.
    let bad = cluster.cli(&["--naming", "127.0.0.1", "topic", "list"], None);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("naming server address \"127.0.0.1\""), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_files_and_pipes_carry_no_colour_codes_and_summaries_count_right() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("one");
    let out = cluster.cli(&["produce", "one"], Some(b"only\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("produced 1 record to one (offsets 0..0)"), "{stderr}");
    let out = cluster.cli(&["consume", "one", "--subscription", "s", "--count", "1"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("consumed 1 record from one"), "{stderr}");

    // The servers log to files here: plain text, as a log collector wants it.
    for log in [cluster.naming.log_text(), cluster.servers[0].2.log_text()] {
        assert!(log.contains("INFO"), "{log}");
        assert!(!log.contains('\u{1b}'), "an escape code in a log file:\n{log}");
    }
}

/// `herald servers remove` retires a server gone for good: refused while it is alive, done
/// once it is dead (and holds no replica), after which the book no longer lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_gone_for_good_is_retired_once_dead() {
    let mut cluster = Cluster::start(2).await;
    let out = cluster.cli(&["servers", "remove", "2"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("server 2 is alive"), "{stderr}");
    cluster.server(2).kill();
    let client = cluster.client();
    wait_for("server 2 to lose its lease", || async {
        let servers = client.list_servers().await.ok()?;
        servers.iter().any(|s| s.id == 2 && !s.alive).then_some(())
    })
    .await;
    cluster.cli_ok(&["servers", "remove", "2"], None);
    let ids: Vec<u64> = client.list_servers().await.unwrap().iter().map(|s| s.id).collect();
    assert_eq!(ids, [1]);
    client.close().await;
}

/// `--timeout` bounds how long a command retries a cluster that does not answer: with the
/// topic's only replica dead, a produce gives up after it with the error (by default it
/// would retry for 30 s, as a failover may need).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_bounds_the_retries_of_a_command() {
    let mut cluster = Cluster::start(1).await;
    let topic = cluster.create_topic("stranded");
    let leader = cluster.leader_of(&topic).await;
    // --naming pointed at a topic server by mistake: it says what it is, at once.
    let server = cluster.server_addr(leader).to_string();
    let wrong = cluster.cli(&["topic", "list", "--naming", &server], None);
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("topic server {leader}, which is not a naming server")), "{said}");
    cluster.server(leader).kill();
    let started = std::time::Instant::now();
    let out = cluster.cli(&["produce", "stranded", "--timeout", "2"], Some(b"lost\n"));
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("unavailable") || stderr.contains("Unavailable"), "{stderr}");
    assert!(took < std::time::Duration::from_secs(25), "gave up after {took:?}, not after --timeout 2");
    let bad = cluster.cli(&["topic", "list", "--timeout", "0"], None);
    assert_eq!(bad.status.code(), Some(2), "a zero timeout is a usage error");
}

/// `herald status` sums the cluster up and exits 1 once something needs attention: here a
/// follower killed, whose topics keep a live leader but have a replica on a dead server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_healthy_until_a_server_dies() {
    let mut cluster = Cluster::start(3).await;
    let topic = cluster.create_topic("watched");
    cluster.cli_ok(&["subscription", "create", "watched", "behind"], None);
    cluster.cli_ok(&["produce", "watched"], Some(b"1\n2\n3\n"));
    let text = cluster.cli_ok(&["status"], None);
    assert!(text.contains("3 of 3 alive") && text.contains("healthy  yes"), "{text}");
    assert!(text.contains("3 records over 1 subscriptions; furthest behind: watched/behind, 3"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&cluster.cli_ok(&["status", "--json"], None)).unwrap();
    assert_eq!(json["healthy"], true);
    assert_eq!(json["topics"]["total"], 1);
    assert_eq!(json["lag"]["records"], 3);

    let leader = cluster.leader_of(&topic).await;
    let follower = (1..=3).find(|s| *s != leader).unwrap();
    cluster.server(follower).kill();
    let status = common::wait_for("the dead server in the status", || async {
        let out = cluster.cli(&["status", "--json"], None);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (json["servers"]["dead"] == serde_json::json!([follower])).then_some((out.status.code(), json))
    })
    .await;
    assert_eq!(status.0, Some(1), "unhealthy: exit 1");
    assert_eq!(status.1["healthy"], false);
    assert_eq!(status.1["topics"]["replica_on_dead_server"], serde_json::json!(["watched"]));
    assert_eq!(status.1["topics"]["without_live_leader"], serde_json::json!([]));
}

/// A context saved once finds the cluster from any directory (issue: commands worked only
/// from the repository root); flags and variables still win over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_context_connects_from_any_directory() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("ctx");
    let config = cluster.dir.path().join("contexts.toml");
    let elsewhere = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| -> std::process::Output {
        std::process::Command::new(common::BIN)
            .args(args)
            .current_dir(elsewhere.path())
            .env("HERALD_CONFIG", &config)
            .env("HERALD_TIMEOUT", "3")
            .env_remove("HERALD_NAMING")
            .env_remove("HERALD_CERTS")
            .env_remove("HERALD_CONTEXT")
            .output()
            .unwrap()
    };
    let said = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).to_string();
    let out = run(&["topic", "list"]);
    assert!(!out.status.success() && said(&out).contains("certificates are looked for in"), "{}", said(&out));

    // Saved with a relative certs path, which is kept absolute.
    let relative = pathdiff(&cluster.certs, elsewhere.path());
    let add = ["context", "add", "here", "--naming", &cluster.naming_list, "--certs", &relative, "--use"];
    let out = run(&add);
    assert!(out.status.success(), "{}", said(&out));
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(saved.contains(&format!("certs = {:?}", cluster.certs.canonicalize().unwrap())), "{saved}");
    let out = run(&["topic", "list"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ctx"), "{}", said(&out));

    let show: serde_json::Value =
        serde_json::from_slice(&run(&["context", "show", "--json"]).stdout).unwrap();
    assert_eq!(
        (show["context"].as_str(), show["naming"]["from"].as_str()),
        (Some("here"), Some("context here"))
    );
    assert_eq!(show["timeout"]["from"], "environment");
    // A flag wins over the context.
    let out = run(&["topic", "list", "--certs", "/nonexistent"]);
    assert!(!out.status.success() && said(&out).contains("/nonexistent"), "{}", said(&out));
    // An unknown context is a usage error that names the known ones.
    let out = run(&["topic", "list", "--context", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", said(&out));
    assert!(said(&out).contains("known: here"), "{}", said(&out));
    let out = run(&add);
    assert_eq!(out.status.code(), Some(2), "a second add of the name is refused: {}", said(&out));
    let list = String::from_utf8(run(&["context", "list"]).stdout).unwrap();
    assert!(list.starts_with("* here "), "{list}");
    assert!(run(&["context", "remove", "here"]).status.success());
    assert!(!run(&["topic", "list"]).status.success(), "without the context, nothing to connect with");
}

/// `to` relative to `from`, both absolute (`../../x/certs`).
fn pathdiff(to: &std::path::Path, from: &std::path::Path) -> String {
    let (to, from) = (to.canonicalize().unwrap(), from.canonicalize().unwrap());
    let common = to.components().zip(from.components()).take_while(|(a, b)| a == b).count();
    let ups = from.components().count() - common;
    let mut out = std::path::PathBuf::new();
    for _ in 0..ups {
        out.push("..");
    }
    for c in to.components().skip(common) {
        out.push(c);
    }
    out.to_string_lossy().into_owned()
}
