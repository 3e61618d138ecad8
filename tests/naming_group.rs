//! The naming group on real processes: three naming servers replicate the book with Raft;
//! losing the leader, a follower, all of them, or one's data directory costs no acked
//! record and leaves no topic wedged.

mod common;

use std::time::Instant;

use common::history::{check, Load, Reader};
use common::{read_all, replicated_topic, wait_for, Cluster, Options, DEADLINE};

async fn group(servers: usize) -> Cluster {
    Cluster::start_with(servers, Options { naming_members: 3, ..Options::default() }).await
}

/// Creates a topic (of two replicas: a topic server may be down) through a new CLI process,
/// retrying until the group takes admin commands again; returns how long that took.
///
/// An attempt may fail although its change was made (the leader changed while it committed,
/// or the topic servers did not place it in time: the error says it may have been made);
/// the next attempt then finds the topic, which counts as the group having taken it.
async fn admin_works_again(cluster: &Cluster, name: &str) -> std::time::Duration {
    let start = Instant::now();
    loop {
        let out = cluster.cli(&["topic", "create", name, "--replicas", "2"], None);
        let error = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || error.contains(&format!("topic {name:?} already exists")) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for `topic create {name}` to work; it last said: {error}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naming_status_shows_one_leader_and_every_member() {
    let cluster = group(1).await;
    cluster.naming_leader().await;
    let status = wait_for("every member to know the leader", || async {
        let s = cluster.naming_status();
        let members = s["members"].as_array()?.clone();
        let leader = s["leader"].as_u64()?;
        members.iter().all(|m| m["leader"].as_u64() == Some(leader)).then_some(s)
    })
    .await;
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{status}");
    let leaders = members.iter().filter(|m| m["role"] == "leader").count();
    assert_eq!(leaders, 1, "{status}");
    for m in members {
        assert!(m["term"].as_u64().unwrap() >= 1 && m["applied"].as_u64().unwrap() >= 1, "{status}");
    }
    // The table names the leader too.
    let table = cluster.cli_ok(&["naming", "status"], None);
    assert!(table.contains("leader: member"), "{table}");
}

/// `NamingRaft` requests member `id` was sent, whatever their result.
fn raft_requests_to(cluster: &Cluster, id: u64) -> f64 {
    cluster
        .scrape_naming(id)
        .lines()
        .filter(|l| l.starts_with("herald_requests_total{") && l.contains("operation=\"NamingRaft\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A round of Raft is one request: a follower's answers to the leader's heartbeats and
/// appends ride back in the answer to them, so an idle leader is sent no Raft requests while
/// each follower is sent one per heartbeat (before, each answer was a request of its own:
/// twice the packets and wake-ups of an idle group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_naming_leader_is_sent_no_raft_requests() {
    let cluster = group(1).await;
    let mut last = None;
    // A leader change during the window (a loaded machine) measures again, a few times.
    for _ in 0..3 {
        let leader = cluster.naming_leader().await;
        let follower = (1..=3).find(|m| *m != leader).unwrap();
        let (leader_before, follower_before) =
            (raft_requests_to(&cluster, leader), raft_requests_to(&cluster, follower));
        wait_for("a follower to be sent 20 more heartbeats", || async {
            (raft_requests_to(&cluster, follower) >= follower_before + 20.0).then_some(())
        })
        .await;
        let to_leader = raft_requests_to(&cluster, leader) - leader_before;
        if cluster.naming_leader().await == leader {
            assert!(
                to_leader <= 2.0,
                "the leader was sent {to_leader} Raft requests while a follower was sent 20"
            );
            return;
        }
        last = Some(to_leader);
    }
    panic!("the naming leader changed in each of three windows (last: {last:?} requests to it)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_naming_leader_under_load_loses_nothing_and_admin_comes_back() {
    let mut cluster = group(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "busy").await;
    let reader = Reader::start(&client, &topic, "live").await;
    let load = Load::start(&client, &topic, "b", 600, 10);
    wait_for("some acks", || async { (load.acked() >= 50).then_some(()) }).await;

    let naming_leader = cluster.naming_leader().await;
    cluster.naming_member(naming_leader).kill();
    let took = admin_works_again(&cluster, "after").await;
    eprintln!("kill -9 of the naming leader to a working `topic create`: {took:?}");

    let acks = load.finish().await;
    let live = reader.finish(6_000).await;
    check(&live, &acks);
    let new_leader = cluster.naming_leader().await;
    assert_ne!(new_leader, naming_leader);

    // The old leader comes back as a follower and catches up.
    cluster.start_naming_member(naming_leader);
    wait_for("the old naming leader to catch up", || async {
        Cluster::naming_books_agree(&cluster.naming_status()).then_some(())
    })
    .await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_naming_leader_and_a_topic_leader_killed_together_the_topic_fails_over() {
    let mut cluster = group(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "both").await;
    let old = cluster.leader_of(&topic).await;
    let old_epoch = client.lookup(&topic).await.unwrap().epoch;
    let reader = Reader::start(&client, &topic, "live").await;
    let load = Load::start(&client, &topic, "b", 600, 10);
    wait_for("some acks", || async { (load.acked() >= 50).then_some(()) }).await;

    let naming_leader = cluster.naming_leader().await;
    let killed_at = Instant::now();
    cluster.naming_member(naming_leader).kill();
    cluster.server(old).kill();

    let acks = load.finish().await;
    let first_new = acks.iter().filter(|(_, a, _)| a.epoch > old_epoch).map(|(t, _, _)| *t).min();
    eprintln!(
        "kill -9 of the naming leader and the topic leader to the first ack from the new topic leader: {:?}",
        first_new.map(|t| t - killed_at)
    );
    let live = reader.finish(6_000).await;
    check(&live, &acks);
    let info = client.lookup(&topic).await.unwrap();
    assert_ne!(info.leader, old);
    assert!(
        info.epoch > old_epoch,
        "epochs only grow across naming leaders: {} then {}",
        old_epoch,
        info.epoch
    );
    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    admin_works_again(&cluster, "later").await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_naming_follower_killed_changes_nothing() {
    let mut cluster = group(3).await;
    let leader = cluster.naming_leader().await;
    let follower = (1..=3).find(|m| *m != leader).unwrap();
    cluster.naming_member(follower).kill();
    let client = cluster.client();
    let topic = replicated_topic(&client, "f").await;
    let acks = Load::start(&client, &topic, "b", 100, 10).finish().await;
    check(&read_all(&client, &topic, "check").await, &acks);
    assert_eq!(cluster.naming_leader().await, leader, "a follower's loss elects no one");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_naming_server_down_healthy_topics_go_on_and_the_cluster_converges_after() {
    let mut cluster = group(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "alone").await;
    let before = Load::start(&client, &topic, "before", 50, 10).finish().await;
    for m in 1..=3 {
        cluster.naming_member(m).kill();
    }
    // The producer and the consumer know the topic's leader: they carry on.
    let during = Load::start(&client, &topic, "during", 100, 10).finish().await;
    let mut acks = before;
    acks.extend(during);
    check(&read_all(&client, &topic, "check").await, &acks);

    // A new CLI process fails fast, naming every address it tried.
    let started = Instant::now();
    let out = cluster.cli(&["topic", "list"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for addr in cluster.naming_list.split(',') {
        assert!(stderr.contains(addr), "{addr} not named: {stderr}");
    }
    eprintln!("a new CLI process with the naming group down failed after {:?}", started.elapsed());
    assert!(
        started.elapsed() < common::DEADLINE / 4,
        "it must fail within about a connect timeout, not retry for 30 s ({:?})",
        started.elapsed()
    );

    for m in 1..=3 {
        cluster.start_naming_member(m);
    }
    cluster.wait_alive(3).await;
    admin_works_again(&cluster, "converged").await;
    let after = Load::start(&client, &topic, "after", 20, 10).finish().await;
    acks.extend(after);
    check(&read_all(&client, &topic, "check2").await, &acks);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_naming_member_rejoins_and_catches_up() {
    let mut cluster = group(3).await;
    cluster.create_topic("t1");
    let leader = cluster.naming_leader().await;
    let wiped = (1..=3).find(|m| *m != leader).unwrap();
    cluster.naming_member(wiped).kill();
    let dir = cluster.dir.path().join(format!("naming-{wiped}"));
    std::fs::remove_dir_all(&dir).unwrap();
    cluster.create_topic("t2");
    cluster.start_naming_member(wiped);
    wait_for("the wiped member to hold the book again", || async {
        Cluster::naming_books_agree(&cluster.naming_status()).then_some(())
    })
    .await;
    // It counts toward the majority again: with the third member down, the book still moves.
    let third = (1..=3).find(|m| *m != leader && *m != wiped).unwrap();
    cluster.naming_member(third).kill();
    admin_works_again(&cluster, "t3").await;
    let listed = cluster.cli_ok(&["topic", "list"], None);
    for t in ["t1", "t2", "t3"] {
        assert!(listed.contains(t), "{listed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_naming_leader_is_replaced_and_changes_nothing_when_it_wakes() {
    let mut cluster = group(3).await;
    let old = cluster.naming_leader().await;
    cluster.naming_member(old).signal("STOP");
    // The other two are a majority: a new leader, and the book moves on.
    admin_works_again(&cluster, "while-frozen").await;
    cluster.naming_member(old).signal("CONT");
    wait_for("the old leader to follow the new one", || async {
        let s = cluster.naming_status();
        let leader = s["leader"].as_u64().filter(|l| *l != old)?;
        let follow = s["members"].as_array()?.iter().all(|m| m["leader"].as_u64() == Some(leader));
        (follow && Cluster::naming_books_agree(&s)).then_some(())
    })
    .await;
    let listed = cluster.cli_ok(&["topic", "list"], None);
    assert!(listed.contains("while-frozen"), "{listed}");
}
