//! F19 (issue "ten times NATS"): a record chunk damaged on one replica's disk (a bit flipped
//! in a stored value, which redb's own checks do not see) is never served, and is repaired from
//! a peer that holds it committed, so that replica serves every acked record again, once and
//! in order (the simulator covers the same on a leader: `damaged-chunk-on-the-leader`).

mod common;

use redb::{ReadableDatabase, ReadableTable};

use common::history::{check, Load};
use common::{replicated_topic, sample, wait_for, Cluster};
use herald::storage::chunk::Chunk;
use herald::types::{ServerId, StartFrom, SubscriptionName};

/// The stored chunks, as `storage::tables::CHUNKS` defines them.
const CHUNKS: redb::TableDefinition<(u64, u64), &[u8]> = redb::TableDefinition::new("record_chunks");

/// Flips one bit in the first stored chunk of `topic_id` in a stopped server's data
/// directory; returns the chunk's base offset.
fn damage_first_chunk(dir: &std::path::Path, topic_id: u64) -> u64 {
    let db = redb::Database::create(dir.join("herald.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    let base = {
        let mut table = txn.open_table(CHUNKS).unwrap();
        let (base, mut value) = {
            let (key, value) =
                table.range((topic_id, 0)..(topic_id + 1, 0)).unwrap().next().unwrap().unwrap();
            (key.value().1, value.value().to_vec())
        };
        let last = value.len() - 1;
        value[last] ^= 0x01;
        table.insert((topic_id, base), value.as_slice()).unwrap();
        base
    };
    txn.commit().unwrap();
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_damaged_on_a_follower_is_repaired_from_a_peer() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client();
    let topic = replicated_topic(&client, "bitflip").await;
    let info = client.lookup(&topic).await.unwrap();
    let leader = cluster.leader_of(&topic).await;
    // A subscription made before the records, so they are kept until it reads them.
    let straight = SubscriptionName::new("straight").unwrap();
    client.create_subscription(&topic, &straight, StartFrom::Earliest, false).await.unwrap();
    let load = Load::start(&client, &topic, "b", 20, 10);
    let acks = load.finish().await;
    let end: u64 = acks.iter().map(|(_, a, _)| a.base + a.count as u64).max().unwrap();
    let follower: ServerId = [1, 2, 3].into_iter().find(|s| *s != leader).unwrap();
    let labels = format!("topic=\"{topic}\"");
    wait_for("the follower to hold every record and know it committed", || async {
        let text = cluster.scrape(Some(follower));
        let at = |metric| sample(&text, metric, &labels);
        (at("herald_log_end") == Some(end as f64) && at("herald_commit_offset") == Some(end as f64))
            .then_some(())
    })
    .await;

    cluster.server(follower).kill();
    let data = cluster.dir.path().join(format!("server-{follower}"));
    let base = damage_first_chunk(&data, info.id);
    eprintln!("flipped a bit in topic #{}'s chunk at offset {base} on server {follower}", info.id);
    let certs = cluster.certs.clone();
    cluster.server(follower).spawn(&certs);
    // The damaged replica runs and registers: one bad chunk does not take a server down.
    cluster.wait_alive(3).await;

    // The scrub at start finds the damaged chunk and a peer's copy replaces it.
    wait_for("the damaged follower to repair its chunk from a peer", || async {
        let text = cluster.scrape(Some(follower));
        (sample(&text, "herald_chunks_repaired_total", "") == Some(1.0)
            && sample(&text, "herald_damaged_chunks", "") == Some(0.0)
            && sample(&text, "herald_commit_offset", &labels) == Some(end as f64))
        .then_some(())
    })
    .await;
    // Read straight from the repaired replica: every acked record, once, in order.
    let read: Vec<(u64, String)> = cluster
        .replica_records(follower, &topic, "straight")
        .await
        .into_iter()
        .map(|r| (r.offset, String::from_utf8(r.record.payload.to_vec()).unwrap()))
        .collect();
    check(&read, &acks);
    client.close().await;

    // On its disk the chunk passes its checksum again and holds the same records.
    cluster.server(follower).kill();
    let value = chunk_at(&data, info.id, base).expect("the chunk is still stored");
    let chunk = Chunk::parse(&value).expect("the repaired chunk passes its checksum");
    assert!(chunk.end(base) > base && chunk.end(base) <= end, "it holds records {base}..{}", chunk.end(base));
}

/// The stored chunk of `topic_id` at `base` in a stopped server's data directory.
fn chunk_at(dir: &std::path::Path, topic_id: u64, base: u64) -> Option<Vec<u8>> {
    let db = redb::Database::create(dir.join("herald.redb")).unwrap();
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(CHUNKS).unwrap();
    let value = table.get((topic_id, base)).unwrap()?.value().to_vec();
    Some(value)
}
