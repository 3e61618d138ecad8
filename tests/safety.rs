//! The five replication defects found by fault testing, each replayed on real processes and
//! checked against the guarantee it broke: committed cursors never move back and
//! subscriptions never vanish (G3, G6), no acked record is lost to a membership change (G1),
//! a topic commits again once the faults stop, a restarted leader never re-leads its old
//! epoch (G1, G2), and a naming server restart does not fail over healthy leaders.

mod common;

use std::time::{Duration, Instant};

use common::history::{check, Load};
use common::{read_all, wait_for, Cluster, Options, LEASE_MS, REPLACE_AFTER_MS};
use herald::types::{ServerId, StartFrom, SubscriptionName, TopicName};
use herald::wire::{Record, TopicConfig};

fn sub(name: &str) -> SubscriptionName {
    SubscriptionName::new(name).unwrap()
}

/// The leader's followers of `topic`, lowest id first.
async fn followers(cluster: &Cluster, topic: &TopicName) -> (ServerId, ServerId, ServerId) {
    let client = cluster.client();
    let info = client.lookup(topic).await.unwrap();
    client.close().await;
    let mut rest: Vec<ServerId> =
        info.replicas.iter().map(|r| r.server).filter(|s| *s != info.leader).collect();
    rest.sort();
    (info.leader, rest[0], rest[1])
}

/// Waits until the book names a leader other than `old`; returns it.
async fn new_leader(cluster: &Cluster, topic: &TopicName, old: ServerId) -> ServerId {
    let client = cluster.client();
    let leader = wait_for("a new leader", || async {
        let leader = client.lookup(topic).await.ok()?.leader;
        (leader != old).then_some(leader)
    })
    .await;
    client.close().await;
    leader
}

/// Waits until every replica of `topic` holds everything its leader has.
async fn caught_up(cluster: &Cluster, topic: &TopicName) {
    let client = cluster.client();
    wait_for("every replica caught up", || async {
        let s = client.topic_status(topic).await.ok()?;
        s.replicas.iter().all(|r| r.caught_up).then_some(())
    })
    .await;
    client.close().await;
}

/// Defect 1. A follower that was down while a cursor moved must not take the topic back to
/// the old cursor; a subscription created after a failover must outlive the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_cursors_and_new_subscriptions_survive_every_leader_change() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = TopicName::new("cursors").unwrap();
    client.create_topic(&topic, 3, TopicConfig::default()).await.unwrap();
    client.create_subscription(&topic, &sub("s"), StartFrom::Earliest, false).await.unwrap();
    common::produce_in_order(&client, &topic, 2, 10).await;
    // Ties in an election went to the lowest id: take that follower down (a paused one would
    // still find the leader's last answer in its socket buffer when it resumes).
    let (leader, down, other) = followers(&cluster, &topic).await;
    caught_up(&cluster, &topic).await;
    cluster.server(down).kill();
    let mut consumer = client.consumer(topic.clone(), sub("s"), StartFrom::Earliest).await.unwrap();
    let first = consumer.poll(10, Duration::from_secs(1), None).await.unwrap();
    assert_eq!(first.len(), 10);
    assert_eq!(consumer.ack(10).await.unwrap(), 10, "committed on the leader and {other}");
    consumer.release().await;
    cluster.server(leader).kill();
    cluster.restart_server(down);
    let second = new_leader(&cluster, &topic, leader).await;

    let mut consumer = client.consumer(topic.clone(), sub("s"), StartFrom::Earliest).await.unwrap();
    let again = consumer.poll(10, Duration::from_secs(2), None).await.unwrap();
    assert_eq!(again.first().map(|r| r.offset), Some(10), "the committed cursor of s went back");
    consumer.release().await;
    let t = client.create_subscription(&topic, &sub("t"), StartFrom::Earliest, false).await.unwrap();
    assert!(t >= 10, "t starts at the log start (10), not before it: {t}");

    // The next leader change, back to a server that was down meanwhile: t stays.
    cluster.server(second).kill();
    cluster.restart_server(leader);
    new_leader(&cluster, &topic, second).await;
    let subs = wait_for("the subscriptions after the second failover", || async {
        client.subscriptions(&topic).await.ok()
    })
    .await;
    let cursor = |name: &str| subs.iter().find(|s| s.name.as_str() == name).map(|s| s.cursor);
    assert_eq!(cursor("s"), Some(10), "{subs:?}");
    assert_eq!(cursor("t"), Some(t), "subscription t vanished or moved: {subs:?}");
    let read = read_all(&client, &topic, "t").await;
    let offsets: Vec<u64> = read.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (t..20).collect::<Vec<_>>(), "t reads everything from where it started");
    client.close().await;
}

/// Defect 2. With one replica dead and another cut off from the naming server only, replacing
/// a replica must not leave acked records on a minority of the new replica set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_replica_never_leaves_acked_records_on_a_minority() {
    let options = Options { naming_proxies: true, ..Options::default() };
    let mut cluster = Cluster::start_with(4, options).await;
    let client = cluster.client();
    let topic = TopicName::new("healing").unwrap();
    client.create_topic(&topic, 3, TopicConfig::default()).await.unwrap();
    client.create_subscription(&topic, &sub("keep"), StartFrom::Earliest, false).await.unwrap();
    let info = client.lookup(&topic).await.unwrap();
    let spare = (1..=4).find(|s| info.replicas.iter().all(|r| r.server != *s)).unwrap();
    let (leader, dead, cut) = followers(&cluster, &topic).await;
    let before = Load::start(&client, &topic, "before", 1, 5).finish().await;
    caught_up(&cluster, &topic).await;
    // `cut` goes quiet for the naming server first, so it is the one replaced; it keeps
    // replicating, and with `dead` gone the leader and `cut` alone hold the next records.
    let cut_at = Instant::now();
    cluster.cut_from_naming(cut, true);
    tokio::time::sleep(Duration::from_millis(LEASE_MS / 2)).await;
    cluster.server(dead).kill();
    let during = Load::start(&client, &topic, "during", 1, 5).finish().await;
    // The leader stops shortly before the naming server replaces `cut`, while its lease
    // still runs: the newcomer cannot copy anything from it.
    let stop_at = cut_at + Duration::from_millis(REPLACE_AFTER_MS) - Duration::from_millis(LEASE_MS / 2);
    tokio::time::sleep(stop_at.saturating_duration_since(Instant::now())).await;
    cluster.server(leader).signal("STOP");
    let until = Instant::now() + Duration::from_millis(3 * LEASE_MS);
    while Instant::now() < until {
        let info = client.lookup(&topic).await.unwrap();
        if info.replicas.iter().any(|r| r.server == spare) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.restart_server(dead);
    // The old leader stays paused well past its lease: whatever the others can elect now
    // must hold every acked record.
    tokio::time::sleep(Duration::from_millis(4 * LEASE_MS)).await;
    cluster.server(leader).signal("CONT");
    cluster.cut_from_naming(cut, false);

    let after = Load::start(&client, &topic, "after", 1, 5).finish().await;
    let acks: Vec<_> = before.into_iter().chain(during).chain(after).collect();
    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    client.close().await;
}

/// Defect 3. An election that cannot gather a majority (the leader paused, then a second
/// replica) must be retried once they are back, though the deposed leader heartbeats again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_election_is_retried_until_the_topic_commits_again() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = TopicName::new("wedge").unwrap();
    client.create_topic(&topic, 3, TopicConfig::default()).await.unwrap();
    client.create_subscription(&topic, &sub("keep"), StartFrom::Earliest, false).await.unwrap();
    let before = Load::start(&client, &topic, "before", 5, 5).finish().await;
    let (leader, second, _) = followers(&cluster, &topic).await;
    let start = Instant::now();
    // The election starts about a lease after the leader stops, while `second` still has a
    // lease but cannot answer its promise request.
    cluster.server(leader).signal("STOP");
    tokio::time::sleep(Duration::from_millis(LEASE_MS * 55 / 100)).await;
    cluster.server(second).signal("STOP");
    tokio::time::sleep(Duration::from_millis(LEASE_MS * 25 / 10).saturating_sub(start.elapsed())).await;
    cluster.server(leader).signal("CONT");
    cluster.server(second).signal("CONT");

    let after = Load::start(&client, &topic, "after", 5, 5).finish().await;
    let acks: Vec<_> = before.into_iter().chain(after).collect();
    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    client.close().await;
}

/// Defect 4. A leader that loses its unsynced writes in a power cut and restarts within its
/// lease must not lead its old epoch again: it would write other records at offsets its
/// followers already hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_after_a_power_cut_never_leads_its_old_epoch() {
    let options = Options { volatile_writes: true, ..Options::default() };
    let mut cluster = Cluster::start_with(3, options).await;
    let client = cluster.client();
    let topic = TopicName::new("power").unwrap();
    client.create_topic(&topic, 3, TopicConfig::default()).await.unwrap();
    client.create_subscription(&topic, &sub("keep"), StartFrom::Earliest, false).await.unwrap();
    let load = Load::start(&client, &topic, "b", 1500, 20);
    for round in 1..=3 {
        wait_for("acks", || async { (load.acked() >= round * 300).then_some(()) }).await;
        let before = client.lookup(&topic).await.unwrap();
        cluster.restart_server(before.leader);
        let after = wait_for("the restarted leader's topic in a new epoch", || async {
            let info = client.lookup(&topic).await.ok()?;
            (info.epoch > before.epoch).then_some(info)
        })
        .await;
        assert!(after.epoch > before.epoch);
    }
    let acks = load.finish().await;
    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    wait_for("all replicas caught up", || async {
        let s = client.topic_status(&topic).await.ok()?;
        s.replicas.iter().all(|r| r.caught_up).then_some(())
    })
    .await;
    let copies = [
        cluster.replica_records(1, &topic, "keep").await,
        cluster.replica_records(2, &topic, "keep").await,
        cluster.replica_records(3, &topic, "keep").await,
    ];
    assert_eq!(copies[0].len(), read.len());
    assert!(copies[0] == copies[1] && copies[1] == copies[2], "replicas hold the same records");
    client.close().await;
}

/// Defect 5. Servers need a moment to reconnect to a restarted naming server; it must not
/// take them for dead meanwhile and move their leaders. Here the leader of every topic
/// reconnects after the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_naming_server_does_not_fail_over_healthy_leaders() {
    let options = Options { naming_proxies: true, ..Options::default() };
    let mut cluster = Cluster::start_with(3, options).await;
    let client = cluster.client();
    let mut topics = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let topic = TopicName::new(name).unwrap();
        client.create_topic(&topic, 3, TopicConfig::default()).await.unwrap();
        let producer = client.producer(topic.clone(), 1);
        let ack = producer.send(vec![Record { payload: b"x".to_vec(), ..Record::default() }]).await.unwrap();
        ack.await.unwrap().unwrap();
        producer.close().await;
        topics.push((topic.clone(), client.lookup(&topic).await.unwrap()));
    }
    client.close().await;
    let leader = topics[0].1.leader;
    cluster.cut_from_naming(leader, true);
    cluster.restart_naming();
    let client = cluster.client();
    wait_for("the followers to report to the restarted naming server", || async {
        let servers = client.list_servers().await.ok()?;
        (servers.iter().filter(|s| s.alive && s.id != leader).count() == 2).then_some(())
    })
    .await;
    cluster.cut_from_naming(leader, false);
    cluster.wait_alive(3).await;
    // Watch the book for a few leases after the restart: no topic changes epoch.
    let until = Instant::now() + Duration::from_millis(4 * LEASE_MS);
    while Instant::now() < until {
        for (topic, before) in &topics {
            let info = client.lookup(topic).await.unwrap();
            assert_eq!(info.epoch, before.epoch, "{topic} failed over after the naming server restarted");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.close().await;
}
