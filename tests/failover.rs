//! Failover on real processes, checked against what was acknowledged: every acked record is
//! read, in order, once; replicas agree up to the commit offset.

mod common;

use std::time::{Duration, Instant};

use common::history::{check, Load, Reader, Watcher};
use common::{read_all, replicated_topic, wait_for, Cluster};
use herald::types::{StartFrom, SubscriptionName};
use herald::wire::Record;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_produce_loses_no_acked_record() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "failover").await;
    let old = cluster.leader_of(&topic).await;
    let reader = Reader::start(&client, &topic, "live").await;
    // And one reading without a subscription (`consume --offset 0 --follow`).
    let watcher = Watcher::start(&client, &topic);
    let load = Load::start(&client, &topic, "b", 400, 25);
    wait_for("some acks", || async { (load.acked() >= 100).then_some(()) }).await;
    let killed_at = Instant::now();
    cluster.server(old).kill();
    let acks = load.finish().await;
    let live = reader.finish(10_000).await;
    check(&live, &acks);
    check(&watcher.finish(10_000).await, &acks);
    let old_epoch = acks[0].1.epoch;
    let first_new = acks.iter().filter(|(_, a, _)| a.epoch > old_epoch).map(|(t, _, _)| *t).min().unwrap();
    eprintln!(
        "failover: kill -9 of the leader to the first ack from the new leader: {:?}",
        first_new - killed_at
    );
    let new = cluster.leader_of(&topic).await;
    assert_ne!(new, old);

    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    let status = client.topic_status(&topic).await.unwrap();
    assert_eq!(status.log_start, 0, "nothing deleted while a subscription ('keep') has not read it");
    // The two live replicas hold the same records up to the commit offset.
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|s| *s != old).collect();
    let a = cluster.replica_records(survivors[0], &topic, "keep").await;
    let b = cluster.replica_records(survivors[1], &topic, "keep").await;
    let common_len = a.len().min(b.len());
    assert_eq!(a[..common_len], b[..common_len], "replicas agree");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_catches_up_and_matches_the_leader() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "catchup").await;
    let leader = cluster.leader_of(&topic).await;
    let follower = [1, 2, 3].into_iter().find(|s| *s != leader).unwrap();
    let load = Load::start(&client, &topic, "b", 300, 20);
    wait_for("some acks", || async { (load.acked() >= 50).then_some(()) }).await;
    cluster.server(follower).kill();
    // The leader and the other follower are a majority: producing goes on.
    wait_for("acks without the follower", || async { (load.acked() >= 200).then_some(()) }).await;
    cluster.restart_server(follower);
    let acks = load.finish().await;
    wait_for("the restarted follower to catch up", || async {
        let s = client.topic_status(&topic).await.ok()?;
        s.replicas.iter().all(|r| r.caught_up).then_some(())
    })
    .await;
    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    let leader_copy = cluster.replica_records(leader, &topic, "keep").await;
    let follower_copy = cluster.replica_records(follower, &topic, "keep").await;
    assert_eq!(leader_copy.len(), 6000);
    assert_eq!(follower_copy, leader_copy, "the restarted follower holds exactly the leader's records");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_deposed_acks_nothing_and_rejoins_as_follower() {
    use herald::transport::Connection;
    use herald::wire::{Request, Response};

    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "paused").await;
    let old = cluster.leader_of(&topic).await;
    let before = Load::start(&client, &topic, "before", 50, 10).finish().await;

    // A client already connected to the old leader, as a stale producer would be.
    let identity = herald::certs::load(&cluster.certs, herald::certs::CertRole::Client).unwrap();
    let addr = cluster.server_addr(old);
    let endpoint =
        herald::transport::client_endpoint(addr, herald::transport::client_config(&identity).unwrap())
            .unwrap();
    let stale = Connection::connect(&endpoint, addr).await.unwrap();

    cluster.server(old).signal("STOP");
    let new = wait_for("a new leader", || async {
        let leader = client.lookup(&topic).await.ok()?.leader;
        (leader != old).then_some(leader)
    })
    .await;
    let during = Load::start(&client, &topic, "during", 50, 10).finish().await;
    cluster.server(old).signal("CONT");

    // Whatever the old leader does now, it acknowledges nothing.
    let req = Request::Produce {
        topic: topic.clone(),
        producer: 0xdead,
        sequence: 0,
        records: vec![Record { payload: b"from-the-past".to_vec(), ..Record::default() }],
    };
    match stale.call(&req).await {
        Ok(Response::Produced { .. }) => panic!("the deposed leader acknowledged a record"),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(e) => assert!(e.is_retriable(), "{e}"),
    }
    // It rejoins as a follower of the new leader, and the replicas converge.
    wait_for("the old leader to catch up as a follower", || async {
        let s = client.topic_status(&topic).await.ok()?;
        (s.replicas.iter().all(|r| r.caught_up) && s.server == new).then_some(())
    })
    .await;
    let acks: Vec<_> = before.into_iter().chain(during).collect();
    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    assert!(read.iter().all(|(_, p)| p != "from-the-past"));
    let copy = cluster.replica_records(old, &topic, "keep").await;
    assert_eq!(copy, cluster.replica_records(new, &topic, "keep").await, "the old leader truncated by epoch");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_double_failover_keeps_every_acked_record() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "double").await;
    let a = cluster.leader_of(&topic).await;
    let reader = Reader::start(&client, &topic, "live").await;
    let load = Load::start(&client, &topic, "b", 600, 10);
    wait_for("some acks", || async { (load.acked() >= 50).then_some(()) }).await;
    cluster.server(a).kill();
    let b = wait_for("a second leader", || async {
        let leader = client.lookup(&topic).await.ok()?.leader;
        (leader != a).then_some(leader)
    })
    .await;
    let acked = load.acked();
    wait_for("acks from the second leader", || async { (load.acked() >= acked + 50).then_some(()) }).await;
    // B dies too, and A comes back: A and the third replica must elect, and the one holding
    // B's epoch must win, keeping everything B committed.
    cluster.server(b).kill();
    cluster.restart_server(a);
    let acks = load.finish().await;
    let live = reader.finish(6000).await;
    check(&live, &acks);
    let c = cluster.leader_of(&topic).await;
    assert_ne!(c, b);
    cluster.restart_server(b);
    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    wait_for("all three replicas to converge", || async {
        let s = client.topic_status(&topic).await.ok()?;
        s.replicas.iter().all(|r| r.caught_up).then_some(())
    })
    .await;
    let copies = [
        cluster.replica_records(1, &topic, "keep").await,
        cluster.replica_records(2, &topic, "keep").await,
        cluster.replica_records(3, &topic, "keep").await,
    ];
    assert_eq!(copies[0], copies[1]);
    assert_eq!(copies[1], copies[2]);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_replicated_cluster_killed_and_restarted_keeps_everything() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "everything").await;
    let acks = Load::start(&client, &topic, "b", 100, 20).finish().await;
    let mut consumer = client
        .consumer(topic.clone(), SubscriptionName::new("half").unwrap(), StartFrom::Earliest)
        .await
        .unwrap();
    let first = consumer.poll(1000, Duration::from_secs(1), None).await.unwrap();
    consumer.ack(first.last().unwrap().offset + 1).await.unwrap();
    let cursor = first.last().unwrap().offset + 1;
    client.close().await;

    cluster.naming.kill();
    for id in [1, 2, 3] {
        cluster.server(id).kill();
    }
    cluster.restart_naming();
    for id in [1, 2, 3] {
        cluster.restart_server(id);
    }
    cluster.wait_alive(3).await;

    let client = cluster.client();
    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    // The subscription resumes at its committed cursor.
    let mut consumer = client
        .consumer(topic.clone(), SubscriptionName::new("half").unwrap(), StartFrom::Earliest)
        .await
        .unwrap();
    let rest = consumer.poll(10_000, Duration::from_secs(1), None).await.unwrap();
    assert_eq!(rest.first().unwrap().offset, cursor);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_acks_nothing_and_rejoins_after_the_partition_heals() {
    use herald::transport::Connection;
    use herald::wire::{Request, Response};

    let cluster = Cluster::start_isolatable(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "partitioned").await;
    assert_eq!(cluster.leader_of(&topic).await, 1, "the first topic lands on server 1");
    let reader = Reader::start(&client, &topic, "live").await;
    let before = Load::start(&client, &topic, "before", 50, 10).finish().await;

    // A producer on the leader's side of the partition, talking to it directly.
    let identity = herald::certs::load(&cluster.certs, herald::certs::CertRole::Client).unwrap();
    let real = cluster.server_addr(1);
    let endpoint =
        herald::transport::client_endpoint(real, herald::transport::client_config(&identity).unwrap())
            .unwrap();
    let stale = Connection::connect(&endpoint, real).await.unwrap();

    cluster.isolate(true);
    let req = Request::Produce {
        topic: topic.clone(),
        producer: 0xbad,
        sequence: 0,
        records: vec![Record { payload: b"isolated".to_vec(), ..Record::default() }],
    };
    let pending = tokio::spawn(async move { stale.call(&req).await });
    // The majority side elects a new leader and goes on.
    let new = wait_for("a leader on the majority side", || async {
        let leader = client.lookup(&topic).await.ok()?.leader;
        (leader != 1).then_some(leader)
    })
    .await;
    let during = Load::start(&client, &topic, "during", 50, 10).finish().await;
    cluster.isolate(false);

    // Healed: the old leader learns of the new epoch and refuses; it never acknowledged.
    match pending.await.unwrap() {
        Ok(Response::Produced { .. }) => panic!("the isolated leader acknowledged a record"),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(e) => assert!(e.is_retriable(), "{e}"),
    }
    wait_for("the old leader to rejoin as a follower", || async {
        let s = client.topic_status(&topic).await.ok()?;
        (s.server == new && s.replicas.iter().all(|r| r.caught_up)).then_some(())
    })
    .await;
    let acks: Vec<_> = before.into_iter().chain(during).collect();
    let live = reader.finish(1000).await;
    check(&live, &acks);
    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    assert!(read.iter().all(|(_, p)| p != "isolated"));
    assert_eq!(
        cluster.replica_records(1, &topic, "keep").await,
        cluster.replica_records(new, &topic, "keep").await
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_lost_for_good_is_replaced_and_the_new_one_catches_up() {
    let mut cluster = Cluster::start(4).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "healing").await;
    let info = client.lookup(&topic).await.unwrap();
    let spare = [1, 2, 3, 4].into_iter().find(|s| info.replicas.iter().all(|r| r.server != *s)).unwrap();
    let lost = info.replicas.iter().map(|r| r.server).find(|s| *s != info.leader).unwrap();
    let before = Load::start(&client, &topic, "before", 100, 20).finish().await;
    cluster.server(lost).kill();
    let during = Load::start(&client, &topic, "during", 100, 20).finish().await;

    // The spare joins as a learner, votes once it caught up, then the lost replica leaves:
    // one voter at a time, each in a new epoch.
    let healed = wait_for("the lost replica to be replaced", || async {
        let info = client.lookup(&topic).await.ok()?;
        let voting = info.replicas.iter().any(|r| r.server == spare);
        (voting && info.replicas.iter().all(|r| r.server != lost)).then_some(info)
    })
    .await;
    assert_eq!(healed.replicas.len(), 3);
    assert!(healed.learners.is_empty());
    assert_eq!(healed.leader, info.leader, "the leader stays");
    assert!(healed.epoch > info.epoch, "a new replica set is a new epoch");
    wait_for("the new replica to catch up", || async {
        let s = client.topic_status(&topic).await.ok()?;
        (s.replicas.len() == 3 && s.replicas.iter().all(|r| r.caught_up)).then_some(())
    })
    .await;
    let acks: Vec<_> = before.into_iter().chain(during).collect();
    let read = read_all(&client, &topic, "check").await;
    check(&read, &acks);
    assert_eq!(
        cluster.replica_records(spare, &topic, "keep").await,
        cluster.replica_records(info.leader, &topic, "keep").await,
        "the new replica holds the leader's records"
    );
    client.close().await;
}
