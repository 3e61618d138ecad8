use bytes::Bytes;
use redb::Database;

use super::faults::SimDisk;
use super::tables::META;
use super::*;
use crate::replication::{BatchOutcome, Cursor, Entry, EntryKind, ShippedEntry};
use crate::types::{
    now_ms, Offset, ProducerId, Sequence, StartFrom, StoredRecord, SubscriptionName, TopicName,
};
use crate::wire::{BacklogPolicy, TopicConfig};

fn meta(id: TopicId, name: &str) -> TopicMeta {
    let config = TopicConfig { max_record_bytes: 64, ..TopicConfig::default() };
    TopicMeta::new(id, TopicName::new(name).unwrap(), config, vec![1], vec![], 1, 1)
}

/// A topic of a three-replica set, hosted on a server that follows.
fn follower_meta(id: TopicId) -> TopicMeta {
    TopicMeta { voters: vec![1, 2, 3], leader: 2, ..meta(id, "replicated") }
}

/// Creates a single-replica topic this server leads in epoch 1.
async fn solo(store: &Store, m: TopicMeta) -> Arc<TopicLog> {
    let id = m.id;
    let log = store.create_topic(m).await.unwrap();
    store.become_leader(id, 1).await.unwrap();
    log
}

fn records(values: &[&str]) -> Vec<Record> {
    values.iter().map(|v| Record { payload: v.as_bytes().to_vec(), ..Record::default() }).collect()
}

fn sub(name: &str) -> SubscriptionName {
    SubscriptionName::new(name).unwrap()
}

/// Records `from..end` as a consumer gets them: a fetch answer, decoded.
fn read(
    store: &Store,
    log: &TopicLog,
    from: Offset,
    end: Offset,
    max: u32,
    bytes: u32,
) -> Result<Vec<StoredRecord>, Error> {
    store.read_chunks(log, from, end, max, bytes)?.decode()
}

fn payloads(store: &Store, log: &TopicLog) -> Vec<(Offset, String)> {
    let s = log.state();
    read(store, log, s.log_start, s.log_end, 1000, u32::MAX)
        .unwrap()
        .into_iter()
        .map(|r| (r.offset, String::from_utf8(r.record.payload).unwrap()))
        .collect()
}

fn begin(index: Index, epoch: Epoch, end: Offset) -> ShippedEntry {
    ShippedEntry { index, entry: Entry { epoch, end, kind: EntryKind::Begin }, chunk: Bytes::new() }
}

fn batch(
    index: Index,
    epoch: Epoch,
    base: Offset,
    producer: ProducerId,
    sequence: Sequence,
    values: &[&str],
) -> ShippedEntry {
    let count = values.len() as u32;
    let kind = EntryKind::Batch { count, timestamp_ms: 5, producer: Some((producer, sequence)) };
    ShippedEntry {
        index,
        entry: Entry { epoch, end: base + count as Offset, kind },
        chunk: Bytes::from(chunk::encode(5, &records(values))),
    }
}

fn cursor(
    index: Index,
    epoch: Epoch,
    end: Offset,
    name: &str,
    next: Offset,
    log_start: Offset,
) -> ShippedEntry {
    let kind = EntryKind::Cursor { subscription: name.into(), cursor: Some(Cursor::at(next)), log_start };
    ShippedEntry { index, entry: Entry { epoch, end, kind }, chunk: Bytes::new() }
}

fn chunk(epoch: Epoch, entries: Vec<ShippedEntry>, commit_index: Index, commit: Offset) -> ReplicaChunk {
    ReplicaChunk { epoch, entries, commit_index, commit }
}

#[tokio::test]
async fn appends_are_dense_and_retries_are_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, meta(7, "t")).await;
    let a = store.append(7, 42, 0, records(&["a", "b"])).await.unwrap();
    let b = store.append(7, 42, 1, records(&["c"])).await.unwrap();
    assert_eq!((a.base, a.count, b.base, b.count), (0, 2, 2, 1));
    assert_eq!((a.at.index, b.at.index), (1, 2), "entry 0 is the epoch's Begin");
    // A retry of batch 0 gets its original offsets and entry, and stores nothing.
    let again = store.append(7, 42, 0, records(&["a", "b"])).await.unwrap();
    assert_eq!((again.base, again.count, again.duplicate, again.at), (0, 2, true, a.at));
    assert_eq!(log.state().log_end, 3);
    // A batch that skips a number waits for the missing one (the producer resends in order).
    assert!(matches!(
        store.append(7, 42, 5, records(&["x"])).await,
        Err(Error::OutOfOrderSequence { expected: 2, got: 5, .. })
    ));
    assert_eq!(store.append(7, 42, 2, records(&["x"])).await.unwrap().base, 3);
    // Another producer interleaves freely, starting where it likes.
    let other = store.append(7, 43, 9, records(&["d"])).await.unwrap();
    assert_eq!(other.base, 4);
    let got: Vec<_> = payloads(&store, &log).into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, ["a", "b", "c", "x", "d"]);
    store.check_consistency().unwrap();
}

#[tokio::test]
async fn only_the_leader_of_the_current_epoch_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    store.create_topic(TopicMeta { voters: vec![1, 2, 3], ..meta(1, "r") }).await.unwrap();
    assert!(matches!(store.append(1, 1, 0, records(&["a"])).await, Err(Error::NotLeader { .. })));
    store.become_leader(1, 2).await.unwrap();
    store.append(1, 1, 0, records(&["a"])).await.unwrap();
    // A promise of a newer epoch deposes it at once, in storage too.
    store.promise(1, 3).await.unwrap();
    assert!(matches!(store.append(1, 1, 1, records(&["b"])).await, Err(Error::NotLeader { .. })));
    assert!(matches!(store.ack(1, sub("s"), 0).await, Err(Error::NotLeader { .. })));
}

#[tokio::test]
async fn queued_appends_share_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, meta(1, "t")).await;
    let before = store.commits();
    // 200 producers queue a batch each before any is awaited.
    let pending: Vec<_> = (0..200).map(|p| store.append(1, p, 0, records(&["r"]))).collect();
    for (p, fut) in pending.into_iter().enumerate() {
        assert_eq!(fut.await.unwrap().base, p as u64, "queue order is offset order");
    }
    let commits = store.commits() - before;
    assert!(commits < 20, "200 appends took {commits} commits: group commit is not grouping");
    assert_eq!(log.state().commit, 200);
}

#[tokio::test]
async fn reads_stop_before_their_byte_budget_and_name_a_record_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, meta(1, "t")).await;
    store.append(1, 1, 0, records(&["aaaa", "bbbb", &"c".repeat(40)])).await.unwrap();
    store.append(1, 1, 1, records(&["dd", "ee"])).await.unwrap();
    let state = log.state();
    let all = read(&store, &log, 0, state.commit, 100, u32::MAX).unwrap();
    // Every budget: the answer is a prefix of the log, encoded within the budget, and a
    // larger budget never gives less; below the first record's need, the need is named.
    let mut before = 0;
    for budget in 1..400u32 {
        match store.read_chunks(&log, 0, state.commit, 100, budget) {
            Ok(answer) => {
                let encoded: usize = answer
                    .chunks
                    .iter()
                    .map(|(base, c)| postcard::to_stdvec(&(base, c)).unwrap().len())
                    .sum();
                assert!(encoded <= budget as usize, "{encoded} bytes in a budget of {budget}");
                let got = answer.decode().unwrap();
                assert_eq!(got, all[..got.len()], "budget {budget}");
                assert!(got.len() >= before, "budget {budget} gave less than a smaller one");
                before = got.len();
            }
            Err(Error::FetchTooSmall { offset: 0, size, max_bytes, .. }) => {
                assert_eq!(max_bytes, budget as u64);
                assert!(size > budget as u64 && before == 0);
                let answer = store.read_chunks(&log, 0, state.commit, 100, size as u32).unwrap();
                assert_eq!(answer.decode().unwrap().len(), 1, "the size named is enough");
            }
            Err(e) => panic!("budget {budget}: {e}"),
        }
    }
    assert_eq!(before, 5);
    match read(&store, &log, 2, state.commit, 100, 20) {
        Err(Error::FetchTooSmall { offset: 2, size, max_bytes: 20, .. }) => assert!(size > 40),
        other => panic!("expected FetchTooSmall, got {other:?}"),
    }
}

#[tokio::test]
async fn reads_forward_whole_chunks_as_stored_and_trim_the_ones_they_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, meta(1, "t")).await;
    store.append(1, 1, 0, records(&["0", "1", "2"])).await.unwrap();
    store.append(1, 1, 1, records(&["3", "4", "5"])).await.unwrap();
    let commit = log.state().commit;
    let stored = store.read_entries(1, 0, 10, usize::MAX).unwrap();
    let stored: Vec<&Bytes> = stored.iter().map(|e| &e.chunk).filter(|c| !c.is_empty()).collect();
    let whole = store.read_chunks(&log, 0, commit, 100, u32::MAX).unwrap();
    assert_eq!(
        whole.chunks.iter().map(|(b, c)| (*b, c)).collect::<Vec<_>>(),
        vec![(0, stored[0]), (3, stored[1])]
    );
    // From inside the first chunk to inside the second: offsets 1..5, in two trimmed chunks.
    let cut = store.read_chunks(&log, 1, commit, 4, u32::MAX).unwrap();
    assert_eq!(cut.chunks.iter().map(|(b, _)| *b).collect::<Vec<_>>(), vec![1, 3]);
    let got: Vec<(Offset, Vec<u8>)> =
        cut.decode().unwrap().into_iter().map(|r| (r.offset, r.record.payload)).collect();
    let want: Vec<(Offset, Vec<u8>)> = (1..5).map(|o: u64| (o, o.to_string().into_bytes())).collect();
    assert_eq!(got, want);
    // A consumer refuses a chunk that does not follow on, or fails its checksum.
    let mut gap = whole.clone();
    gap.chunks[1].0 = 4;
    assert!(gap.decode().is_err());
    let mut flipped = whole.clone();
    let mut bytes = flipped.chunks[0].1.to_vec();
    bytes[6] ^= 0x40;
    flipped.chunks[0].1 = Bytes::from(bytes);
    assert!(flipped.decode().unwrap_err().to_string().contains("checksum"));
}

#[tokio::test]
async fn subscriptions_and_producers_per_topic_are_bounded() {
    use super::cursors::MAX_SUBSCRIPTIONS_PER_TOPIC;
    use super::producers::MAX_PRODUCERS_PER_TOPIC;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let _log = solo(&store, meta(1, "t")).await;
    let name = |i: usize| SubscriptionName::new(format!("s{i}")).unwrap();
    let created: Vec<_> = (0..MAX_SUBSCRIPTIONS_PER_TOPIC)
        .map(|i| store.create_subscription(1, name(i), StartFrom::Earliest, false))
        .collect();
    for c in created {
        c.await.unwrap();
    }
    let err = store.create_subscription(1, name(9999), StartFrom::Earliest, false).await.unwrap_err();
    assert!(matches!(err, Error::LimitReached { .. }), "{err}");
    // An existing one is still found.
    store.create_subscription(1, name(0), StartFrom::Earliest, true).await.unwrap();

    let pending: Vec<_> =
        (0..MAX_PRODUCERS_PER_TOPIC as u64).map(|p| store.append(1, p, 0, records(&["r"]))).collect();
    for p in pending {
        p.await.unwrap();
    }
    let refused = store.append(1, 1 << 40, 0, records(&["new"])).await.unwrap_err();
    assert!(matches!(refused, Error::LimitReached { .. }), "{refused}");
    // Producers the topic knows go on.
    assert_eq!(
        store.append(1, 7, 1, records(&["again"])).await.unwrap().base,
        MAX_PRODUCERS_PER_TOPIC as u64
    );
}

#[tokio::test]
async fn an_oversize_record_rejects_its_batch_whole_and_uses_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, meta(1, "t")).await;
    let big = "x".repeat(65);
    let refused = store.append(1, 9, 0, records(&["ok", &big])).await.unwrap();
    match refused.refused.expect("refused") {
        Error::RecordTooLarge { index, size, limit, enforced_by } => {
            assert_eq!((index, size, limit), (1, 68, 64), "sized as encoded: 65 bytes and 3 length fields");
            assert!(enforced_by.contains("topic server 1"), "{enforced_by}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(log.state().log_end, 0, "nothing of the batch is stored");
    // The refusal is an entry: a retry gets it again, and the next batch is in order.
    let again = store.append(1, 9, 0, records(&["ok"])).await.unwrap();
    assert!(again.duplicate && matches!(again.refused, Some(Error::InvalidArgument { .. })));
    assert_eq!(store.append(1, 9, 1, records(&["next"])).await.unwrap().base, 0);
    store.check_consistency().unwrap();
}

fn limited(id: TopicId, limit: u64, policy: BacklogPolicy) -> TopicMeta {
    let mut m = meta(id, &format!("limited-{id}"));
    m.config.max_record_bytes = 1000;
    m.config.backlog_limit = Some(limit);
    m.config.backlog_policy = policy;
    m
}

fn hundred_bytes(n: usize) -> Vec<Record> {
    (0..n).map(|_| Record { payload: vec![b'x'; 100], ..Record::default() }).collect()
}

#[tokio::test]
async fn the_reject_policy_refuses_at_the_limit_and_keeps_the_sequence_free() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, limited(1, 2000, BacklogPolicy::Reject)).await;
    store.create_subscription(1, sub("slow"), StartFrom::Earliest, false).await.unwrap();
    let mut seq = 0;
    let refusal = loop {
        match store.append(1, 7, seq, hundred_bytes(3)).await {
            Ok(_) => seq += 1,
            Err(e) => break e,
        }
        assert!(seq < 100, "never refused");
    };
    let stored = log.state().bytes;
    assert!(stored <= 2000 && stored > 1500, "{stored}");
    match refusal {
        Error::BacklogFull { limit, backlog, oldest_held_by, .. } => {
            assert_eq!((limit, backlog, oldest_held_by.as_deref()), (2000, stored, Some("slow")));
        }
        other => panic!("{other:?}"),
    }
    // A batch over the limit by itself says so, rather than blame what is stored.
    let alone = store.append(1, 8, 0, hundred_bytes(25)).await.unwrap_err();
    assert!(matches!(alone, Error::BacklogFull { batch, .. } if batch > 2000), "{alone:?}");
    assert!(alone.to_string().contains("the batch alone is over the limit"), "{alone}");
    // Once the subscription has read, the same batch (same sequence) goes in.
    let end = log.state().log_end;
    store.ack(1, sub("slow"), end).await.unwrap();
    assert_eq!(log.state().bytes, 0);
    let a = store.append(1, 7, seq, hundred_bytes(3)).await.unwrap();
    assert_eq!((a.base, a.duplicate), (end, false));
}

#[tokio::test]
async fn the_evict_policy_moves_only_the_slow_and_records_what_they_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, limited(1, 2000, BacklogPolicy::Evict)).await;
    store.create_subscription(1, sub("slow"), StartFrom::Earliest, false).await.unwrap();
    store.create_subscription(1, sub("fast"), StartFrom::Earliest, false).await.unwrap();
    for seq in 0..40 {
        store.append(1, 7, seq, hundred_bytes(3)).await.expect("evict never refuses");
        store.ack(1, sub("fast"), log.state().log_end).await.unwrap();
        assert!(log.state().bytes <= 2000 + 3 * 120, "{}", log.state().bytes);
    }
    let slow = store.cursor(1, &sub("slow")).unwrap().unwrap();
    let fast = store.cursor(1, &sub("fast")).unwrap().unwrap();
    assert!(slow.evicted > 0 && slow.evicted_at_ms > 0);
    assert_eq!(
        (slow.next, slow.unreported),
        (slow.evicted, slow.evicted),
        "moved by what it lost, not yet told"
    );
    assert_eq!((fast.next, fast.evicted), (120, 0));
    assert_eq!(log.state().log_start, slow.next, "what it lost is freed");
    // An ack past the eviction (the consumer read on, so a read told it) clears the notice,
    // not the record.
    store.ack(1, sub("slow"), slow.next + 1).await.unwrap();
    let told = store.cursor(1, &sub("slow")).unwrap().unwrap();
    assert_eq!((told.unreported, told.evicted, told.next), (0, slow.evicted, slow.next + 1));
    // Without subscriptions there is nobody to evict from: the limit refuses.
    let log2 = solo(&store, limited(2, 500, BacklogPolicy::Evict)).await;
    store.append(2, 7, 0, hundred_bytes(3)).await.unwrap();
    assert!(matches!(
        store.append(2, 7, 1, hundred_bytes(3)).await,
        Err(Error::BacklogFull { oldest_held_by: None, .. })
    ));
    assert_eq!(log2.state().log_end, 3);
    store.check_consistency().unwrap();
}

#[tokio::test]
async fn a_replicated_leader_evicts_once_until_the_deletion_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    // The limit is ten times a batch, so one eviction (down to 90 %) makes room for more.
    let meta = TopicMeta { voters: vec![1, 2, 3], ..limited(1, 20_000, BacklogPolicy::Evict) };
    let log = store.create_topic(meta).await.unwrap();
    store.become_leader(1, 1).await.unwrap();
    // Records count as committed here once durable (what replication would decide); cursor
    // changes are applied only when the test says so.
    let commit_all = || {
        let s = log.state();
        log.set_commit(s.end_index, s.log_end);
    };
    store.create_subscription(1, sub("slow"), StartFrom::Earliest, false).await.unwrap();
    commit_all();
    store.commit(1, log.state().commit_index).await.unwrap();
    let evictions = |store: &Store| {
        let s = log.state();
        store
            .read_entries(1, s.applied, s.end_index, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|e| matches!(e.entry.kind, EntryKind::Cursor { .. }))
            .count()
    };
    let mut seq = 0;
    while evictions(&store) == 0 {
        seq += 1;
        store.append(1, 7, seq, hundred_bytes(3)).await.unwrap();
        commit_all();
        assert!(seq < 200, "never evicted");
    }
    // Until the move is applied and the records go, more batches evict nothing more.
    for _ in 0..2 {
        seq += 1;
        store.append(1, 7, seq, hundred_bytes(3)).await.unwrap();
    }
    assert_eq!(evictions(&store), 1);
    assert_eq!(store.cursor(1, &sub("slow")).unwrap().unwrap().evicted, 0, "applied only once committed");
    let before = log.state().bytes;
    commit_all();
    store.commit(1, log.state().commit_index).await.unwrap();
    let slow = store.cursor(1, &sub("slow")).unwrap().unwrap();
    assert!(slow.evicted > 0);
    assert_eq!(log.state().log_start, slow.next, "what was evicted is deleted");
    assert!(log.state().bytes < before);
    store.check_consistency().unwrap();
}

#[tokio::test]
async fn silent_producers_are_forgotten_on_every_replica_alike() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    solo(&store, meta(1, "t")).await;
    store.append(1, 7, 0, records(&["a"])).await.unwrap();
    store.append(1, 8, 0, records(&["b"])).await.unwrap();
    let states = store.producer_states(1).unwrap();
    assert!(states.iter().all(|(_, p)| p.last_ms > 0 && p.last_ms <= now_ms()));
    assert_eq!(store.expire_producers(1, 0).await.unwrap(), 0, "none is older than the cutoff");
    assert_eq!(store.expire_producers(1, now_ms() + 1).await.unwrap(), 2);
    assert!(store.producer_states(1).unwrap().is_empty());
    // The cost of forgetting: a retry that late is a new batch.
    assert!(!store.append(1, 7, 0, records(&["a"])).await.unwrap().duplicate);
    // A follower dates a producer by the batch's timestamp, as the leader did.
    store.create_topic(follower_meta(2)).await.unwrap();
    store
        .replica_append(2, chunk(1, vec![begin(0, 1, 0), batch(1, 1, 0, 9, 0, &["x"])], 0, 0))
        .await
        .unwrap();
    assert_eq!(store.producer_states(2).unwrap()[0].1.last_ms, 5);
    assert_eq!(store.expire_producers(2, 6).await.unwrap(), 1);
}

#[tokio::test]
async fn lag_in_bytes_is_exact_for_short_lags_and_estimated_for_long_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, meta(1, "t")).await;
    store.create_subscription(1, sub("behind"), StartFrom::Earliest, false).await.unwrap();
    let n = LAG_BYTES_SCAN as usize + 20_000;
    let batch: Vec<Record> =
        (0..n / 4).map(|i| Record { payload: vec![b'x'; 8 + i % 5], ..Record::default() }).collect();
    for seq in 0..4 {
        store.append(1, 7, seq, batch.clone()).await.unwrap();
    }
    store.create_subscription(1, sub("near"), StartFrom::Latest, false).await.unwrap();
    store.append(1, 7, 4, records(&["abc", "defgh"])).await.unwrap();
    let state = log.state();
    let subs = store.subscriptions(1, &state).unwrap();
    let by = |name: &str| subs.iter().find(|s| s.name.as_str() == name).unwrap().clone();
    let near = by("near");
    assert_eq!(near.lag, 2);
    let exact: u64 = 8;
    assert!(near.lag_bytes > exact && near.lag_bytes < exact + 2 * 16, "stored bytes, framing included");
    let behind = by("behind");
    assert!(behind.lag > LAG_BYTES_SCAN);
    // Estimated from the average stored record: within a few percent of the total.
    let total = state.bytes as f64;
    assert!((behind.lag_bytes as f64 - total).abs() / total < 0.01, "{} vs {total}", behind.lag_bytes);
}

#[tokio::test]
async fn records_are_deleted_only_when_every_subscription_passed_them() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, meta(1, "t")).await;
    store.append(1, 1, 0, records(&["0", "1", "2", "3", "4"])).await.unwrap();
    // No subscription: everything is kept, even as records age.
    assert_eq!(log.state().log_start, 0);
    store.create_subscription(1, sub("a"), StartFrom::Earliest, false).await.unwrap();
    let b = store.create_subscription(1, sub("b"), StartFrom::Earliest, false).await.unwrap();
    assert!(
        log.state().applied > b.pending.unwrap().index,
        "a single replica applies cursor changes at once"
    );
    assert_eq!(store.ack(1, sub("a"), 4).await.unwrap().cursor, 4);
    assert_eq!(log.state().log_start, 0, "b still needs offset 0");
    assert_eq!(store.ack(1, sub("b"), 2).await.unwrap().cursor, 2);
    assert_eq!(log.state().log_start, 2);
    assert_eq!(payloads(&store, &log).first().unwrap().0, 2);
    // Cursors never move backwards, and never past the commit offset.
    assert_eq!(store.ack(1, sub("a"), 1).await.unwrap().cursor, 4);
    assert!(matches!(store.ack(1, sub("a"), 6).await, Err(Error::OffsetBeyondEnd { .. })));
    // Deleting b frees what only it held.
    store.delete_subscription(1, sub("b")).await.unwrap();
    assert_eq!(log.state().log_start, 4);
    // Deleting the last subscription keeps the rest for a later subscriber.
    store.delete_subscription(1, sub("a")).await.unwrap();
    assert_eq!(log.state().log_start, 4);
    assert_eq!(
        store.create_subscription(1, sub("late"), StartFrom::Earliest, false).await.unwrap().cursor,
        4
    );
    assert_eq!(store.create_subscription(1, sub("new"), StartFrom::Latest, false).await.unwrap().cursor, 5);
    assert!(
        store.subscriptions(1, &log.state()).unwrap().iter().all(|s| s.name.as_str() != "a"),
        "deleted stay deleted"
    );
    store.check_consistency().unwrap();
}

#[tokio::test]
async fn records_below_the_log_start_inside_a_chunk_are_never_shown_nor_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, meta(1, "t")).await;
    store.append(1, 1, 0, records(&["0", "1", "2", "3", "4"])).await.unwrap();
    store.append(1, 1, 1, records(&["5", "6"])).await.unwrap();
    let full = log.state().bytes;
    store.create_subscription(1, sub("a"), StartFrom::Earliest, false).await.unwrap();
    store.ack(1, sub("a"), 3).await.unwrap();
    let state = log.state();
    assert_eq!(state.log_start, 3);
    let per_record = full / 7; // all seven are the same size
    assert_eq!(state.bytes, 4 * per_record, "what a topic counts is what readers can see");
    let shown: Vec<Offset> = payloads(&store, &log).iter().map(|(o, _)| *o).collect();
    assert_eq!(shown, vec![3, 4, 5, 6]);
    // A read from below the log start (deleted after its snapshot) shows none of 0..3.
    let read = read(&store, &log, 1, state.log_end, 100, u32::MAX).unwrap();
    assert_eq!(read.first().map(|r| r.offset), Some(3));
    // A follower copying the first entry gets only what is at or past the log start.
    let shipped = store.read_entries(1, 0, state.end_index, usize::MAX).unwrap();
    let batch = shipped.iter().find(|e| matches!(e.entry.kind, EntryKind::Batch { .. })).unwrap();
    assert_eq!(chunk::decode_records(&batch.chunk).unwrap(), records(&["3", "4"]));
    assert_eq!(store.record_count().unwrap(), 4);
    store.check_consistency().unwrap();
    store.ack(1, sub("a"), 6).await.unwrap();
    assert_eq!(log.state().bytes, per_record);
    assert_eq!(payloads(&store, &log), vec![(6, "6".to_string())]);
    store.check_consistency().unwrap();
}

/// Flips the last bit of `topic`'s stored chunk at `base` (the store must be closed).
fn flip_a_bit(dir: &std::path::Path, topic: u64, base: u64) {
    let db = Database::create(dir.join("herald.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(super::tables::CHUNKS).unwrap();
        let mut value = table.get((topic, base)).unwrap().unwrap().value().to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        table.insert((topic, base), value.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

#[tokio::test]
async fn a_damaged_chunk_takes_a_peers_copy_of_exactly_its_records_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (good_copy, other) = {
        let (store, logs) = Store::open(dir.path(), Some(1)).unwrap();
        assert!(logs.is_empty());
        let log = solo(&store, meta(1, "t")).await;
        store.append(1, 1, 0, records(&["abc", "def"])).await.unwrap();
        store.append(1, 1, 1, records(&["ghi"])).await.unwrap();
        // Both appends are durable on this one replica: committed (as the caller would know).
        let commit = log.state().log_end;
        assert_eq!(commit, 3);
        // What a peer holding them committed would send; a range not committed is refused.
        assert!(store.committed_chunk(1, 0, 4, commit).is_err());
        let copy = store.committed_chunk(1, 0, 2, commit).unwrap();
        // A peer whose chunk starts lower sends the records asked for, trimmed.
        assert!(store.committed_chunk(1, 1, 2, commit).unwrap().len() < copy.len());
        (copy, store.committed_chunk(1, 2, 3, commit).unwrap())
    };
    // Nothing to repair yet: a good chunk is never overwritten.
    {
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        assert!(!store.repair_chunk(1, 0, good_copy.clone()).await.unwrap());
    }
    flip_a_bit(dir.path(), 1, 0);
    let (store, logs) = Store::open(dir.path(), Some(1)).unwrap();
    let log = &logs[0].0;
    assert!(read(&store, log, 0, 3, 100, u32::MAX).is_err(), "damaged: never served");
    // The wrong records (another chunk, one cut short) are refused and change nothing.
    let refused = store.repair_chunk(1, 0, other.clone()).await.unwrap_err();
    assert!(refused.to_string().contains("refused"), "{refused}");
    let mut flipped = good_copy.to_vec();
    flipped[5] ^= 0x04;
    assert!(store.repair_chunk(1, 0, flipped.into()).await.is_err(), "a damaged copy");
    assert!(read(&store, log, 0, 3, 100, u32::MAX).is_err());
    // The right copy repairs it: every record reads again, and a second repair is a no-op.
    assert!(store.repair_chunk(1, 0, good_copy.clone()).await.unwrap());
    assert_eq!(payloads(&store, log), vec![(0, "abc".into()), (1, "def".into()), (2, "ghi".into())]);
    assert!(!store.repair_chunk(1, 0, good_copy).await.unwrap());
    store.check_consistency().unwrap();
}

#[tokio::test]
async fn the_scrub_finds_every_damaged_chunk_in_bounded_steps() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        for (id, name) in [(1, "a"), (2, "b")] {
            solo(&store, meta(id, name)).await;
            for seq in 0..3 {
                store.append(id, 1, seq, records(&["abc", "def"])).await.unwrap();
            }
        }
    }
    flip_a_bit(dir.path(), 1, 2);
    flip_a_bit(dir.path(), 2, 4);
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    // Nothing found before a read or a scrub meets them.
    assert!(store.damaged().list().is_empty());
    // A budget of one byte checks one chunk per step: six chunks, six steps, then done.
    let (mut at, mut steps) = (Some((0, 0)), 0);
    while let Some(from) = at {
        at = store.scrub(from, 1).unwrap();
        steps += 1;
        assert!(steps <= 7, "the scrub ends");
    }
    assert_eq!(steps, 6);
    assert_eq!(store.damaged().list(), vec![(1, 2), (2, 4)]);
}

#[tokio::test]
async fn a_chunk_damaged_on_disk_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
        solo(&store, meta(1, "t")).await;
        store.append(1, 1, 0, records(&["abc", "def"])).await.unwrap();
    }
    {
        // A bit flips in the stored value: redb's pages are intact, the chunk is not.
        let db = Database::create(dir.path().join("herald.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(super::tables::CHUNKS).unwrap();
            let mut value = table.get((1, 0)).unwrap().unwrap().value().to_vec();
            let last = value.len() - 1;
            value[last] ^= 0x01;
            table.insert((1, 0), value.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let (store, logs) = Store::open(dir.path(), Some(1)).unwrap();
    let log = &logs[0].0;
    let err = read(&store, log, 0, 2, 100, u32::MAX).expect_err("a damaged chunk is refused");
    assert!(matches!(err, Error::Storage { .. }) && err.to_string().contains("checksum"), "{err}");
    assert!(store.read_entries(1, 0, 10, usize::MAX).is_err(), "nor shipped to a follower");
    assert!(store.check_consistency().unwrap_err().contains("checksum"));
}

#[tokio::test]
async fn a_follower_stores_the_leaders_chunk_as_shipped_and_refuses_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
    let log = store.create_topic(follower_meta(1)).await.unwrap();
    let good = batch(1, 1, 0, 7, 0, &["a", "b"]);
    let mut flipped = good.clone();
    let mut bytes = flipped.chunk.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    flipped.chunk = Bytes::from(bytes);
    let mut restamped = good.clone();
    restamped.chunk = Bytes::from(chunk::encode(6, &records(&["a", "b"])));
    let mut overfull = good.clone();
    overfull.chunk = Bytes::from(chunk::encode(5, &records(&["a", "b", "c"])));
    let mut not_a_batch = begin(0, 1, 0);
    not_a_batch.chunk = good.chunk.clone();
    for (what, entries) in [
        ("a flipped bit", vec![begin(0, 1, 0), flipped]),
        ("another timestamp", vec![begin(0, 1, 0), restamped]),
        ("more records than the batch", vec![begin(0, 1, 0), overfull]),
        ("records on a Begin entry", vec![not_a_batch]),
    ] {
        let err = store.replica_append(1, chunk(1, entries, 0, 0)).await.expect_err(what);
        assert!(err.to_string().contains("refused"), "{what}: {err}");
        let s = log.state();
        assert_eq!((s.end_index, s.log_end, s.bytes), (0, 0, 0), "{what}: nothing written");
    }
    store.replica_append(1, chunk(1, vec![begin(0, 1, 0), good.clone()], 0, 0)).await.unwrap();
    // Stored as shipped, and shipped on as stored: the same bytes.
    let shipped = store.read_entries(1, 1, 2, usize::MAX).unwrap();
    assert_eq!(shipped, vec![good]);
    assert_eq!(payloads(&store, &log), vec![(0, "a".to_string()), (1, "b".to_string())]);
    store.check_consistency().unwrap();
}

#[test]
fn a_directory_of_another_storage_format_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), Some(1)).unwrap());
    {
        let db = Database::create(dir.path().join("herald.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("format", 2).unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open(dir.path(), Some(1)).err().expect("refused").to_string();
    assert!(
        err.contains("storage format 2") && err.contains(&format!("reads format {STORAGE_FORMAT}")),
        "{err}"
    );
}

#[tokio::test]
async fn everything_survives_a_reopen_and_a_replica_leads_again_only_in_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path(), None).unwrap();
        solo(&store, meta(3, "kept")).await;
        store.append(3, 5, 0, records(&["a", "b", "c"])).await.unwrap();
        store.create_subscription(3, sub("s"), StartFrom::Earliest, false).await.unwrap();
        store.create_subscription(3, sub("slow"), StartFrom::Earliest, false).await.unwrap();
        store.ack(3, sub("s"), 2).await.unwrap();
        store.ack(3, sub("slow"), 1).await.unwrap();
        let r =
            store.create_topic(TopicMeta { voters: vec![1, 2, 3], ..meta(4, "replicated") }).await.unwrap();
        let id = store.server_id();
        store.assign(4, vec![id, 2, 3], vec![], id, 7).await.unwrap();
        store.become_leader(4, 7).await.unwrap();
        assert_eq!(r.state().leading, Some(7));
    }
    let (store, logs) = Store::open(dir.path(), None).unwrap();
    assert_eq!(logs.len(), 2);
    let (log, meta) = logs.iter().find(|(l, _)| l.id == 3).unwrap();
    let state = log.state();
    assert_eq!((state.log_start, state.log_end, state.commit, state.epoch), (1, 3, 3, 1));
    assert_eq!(state.leading, None, "no replica leads after a restart until told to");
    assert_eq!(meta.name.as_str(), "kept");
    assert_eq!(store.cursor(3, &sub("s")).unwrap(), Some(Cursor::at(2)));
    // A single replica resumes its epoch; the dedup window survived too.
    store.become_leader(3, 1).await.unwrap();
    let again = store.append(3, 5, 0, records(&["a", "b", "c"])).await.unwrap();
    assert!(again.duplicate);
    // A replicated topic's restarted leader never leads its old epoch again: it may have lost
    // unsynced entries that its followers hold.
    assert!(matches!(store.become_leader(4, 7).await, Err(Error::StaleEpoch { current: 8, .. })));
    store.become_leader(4, 8).await.unwrap();
    store.check_consistency().unwrap();
    // The data directory stays bound to its server id.
    let id = store.server_id();
    drop(store);
    assert!(Store::open(dir.path(), Some(id + 1)).is_err());
}

#[tokio::test]
async fn deleting_a_topic_removes_its_data_and_a_new_id_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    solo(&store, meta(1, "t")).await;
    store.append(1, 1, 0, records(&["a", "b"])).await.unwrap();
    store.delete_topic(1).await.unwrap();
    assert_eq!(store.record_count().unwrap(), 0);
    assert_eq!(store.entry_count().unwrap(), 0);
    let log = store.create_topic(meta(2, "t")).await.unwrap();
    assert_eq!(log.state().log_end, 0);
}

#[tokio::test]
async fn commits_wake_waiting_readers() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, meta(1, "t")).await;
    let mut watch = log.watch();
    watch.borrow_and_update();
    store.append(1, 1, 0, records(&["a"])).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), watch.changed()).await.unwrap().unwrap();
    assert_eq!(watch.borrow().commit, 1);
}

#[tokio::test]
async fn a_replicated_leader_commits_only_what_replication_says() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = store.create_topic(TopicMeta { voters: vec![1, 2, 3], ..meta(1, "r") }).await.unwrap();
    store.become_leader(1, 1).await.unwrap();
    store.append(1, 1, 0, records(&["a", "b"])).await.unwrap();
    let s = log.state();
    assert_eq!((s.log_end, s.end_index, s.commit), (2, 2, 0), "durable but not committed");
    log.set_commit(5, 9);
    assert_eq!(log.state().commit, 0, "never past the durable end");
    log.set_commit(2, 2);
    assert_eq!(log.state().commit, 2);
    // Entries read for a follower are whole and carry the producer's numbers.
    store.append(1, 1, 1, records(&["c"])).await.unwrap();
    assert_eq!(store.read_entries(1, 0, 3, 1).unwrap().len(), 1, "the first entry always, even over budget");
    let entries = store.read_entries(1, 1, 3, 1).unwrap();
    assert_eq!(entries.len(), 1, "whole entries, stopping before the byte budget");
    assert_eq!(chunk::decode_records(&entries[0].chunk).unwrap().len(), 2);
    assert!(matches!(entries[0].entry.kind, EntryKind::Batch { producer: Some((1, 0)), count: 2, .. }));
    assert_eq!(store.read_entries(1, 0, 3, 1 << 20).unwrap().len(), 3);
}

#[tokio::test]
async fn staged_entries_are_served_from_an_entry_and_cleared_when_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = store.create_topic(TopicMeta { voters: vec![1, 2, 3], ..meta(1, "r") }).await.unwrap();
    store.become_leader(1, 1).await.unwrap();
    // As the writer leaves them between applying a group and its fsync.
    *log.staged.lock().unwrap() = vec![batch(1, 1, 0, 7, 0, &["a", "b"]), batch(2, 1, 2, 7, 1, &["c"])];
    assert_eq!(log.staged(1, 1 << 20).len(), 2);
    assert_eq!(log.staged(2, 1 << 20)[0].index, 2);
    assert!(log.staged(3, 1 << 20).is_empty(), "nothing past the staged end");
    assert_eq!(log.staged(1, 1).len(), 1, "stops at an entry once over the byte budget");
    // The next durable group publishes its state and clears what was staged before.
    store.append(1, 1, 0, records(&["x"])).await.unwrap();
    assert!(log.staged(1, 1 << 20).is_empty());
    let s = log.state();
    assert_eq!((s.end_index, s.staged_end), (2, 2));
}

#[tokio::test]
async fn a_group_that_writes_nothing_is_not_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
    let log = store.create_topic(follower_meta(1)).await.unwrap();
    store
        .replica_append(1, chunk(1, vec![begin(0, 1, 0), batch(1, 1, 0, 7, 0, &["a", "b"])], 0, 0))
        .await
        .unwrap();
    let commits = store.commits();
    // A fetch answer carrying only the leader's new commit point.
    let state = store.replica_append(1, chunk(1, vec![], 2, 2)).await.unwrap();
    assert_eq!((state.commit_index, state.commit), (2, 2), "the commit point is published");
    assert_eq!(store.commits(), commits, "without a write transaction (and its fsync)");
    // Entries still make a commit, and everything survives a reopen.
    store.replica_append(1, chunk(1, vec![batch(2, 1, 2, 7, 1, &["c"])], 2, 2)).await.unwrap();
    assert_eq!(store.commits(), commits + 1);
    drop((store, log));
    let (store, hosted) = Store::open(dir.path(), None).unwrap();
    assert_eq!(hosted[0].0.state().log_end, 3);
    assert_eq!(payloads(&store, &hosted[0].0).len(), 3);
}

#[tokio::test]
async fn a_damaged_chunk_before_a_divergent_tail_does_not_stop_its_truncation() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
        store.create_topic(follower_meta(1)).await.unwrap();
        let entries = vec![begin(0, 1, 0), batch(1, 1, 0, 7, 0, &["a", "b"]), batch(2, 1, 2, 7, 1, &["c"])];
        store.replica_append(1, chunk(1, entries, 3, 1)).await.unwrap();
    }
    flip_a_bit(dir.path(), 1, 0);
    let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
    // The follower's tail (entry 2) diverged from a new leader's log: it goes, and the
    // damaged chunk before it stays for a peer's copy to repair.
    let state = store.truncate(1, 2).await.unwrap();
    assert_eq!((state.end_index, state.log_end), (2, 2));
    store.check_consistency_except(&[(1, 0)]).unwrap();
}

#[tokio::test]
async fn a_chunk_damaged_in_its_header_or_framing_still_loads_and_is_deleted_once_read() {
    for damaged_byte in [4, 5, 6, 7] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
            store.create_topic(follower_meta(1)).await.unwrap();
            let entries = vec![
                begin(0, 1, 0),
                batch(1, 1, 0, 7, 0, &["a", "b"]),
                batch(2, 1, 2, 7, 1, &["c", "d"]),
                cursor(3, 1, 4, "s", 0, 0),
            ];
            store.replica_append(1, chunk(1, entries, 4, 4)).await.unwrap();
        }
        // Past the checksum (4 bytes): the header's varints, then a record's length.
        let db = Database::create(dir.path().join("herald.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(super::tables::CHUNKS).unwrap();
            for base in [0, 2] {
                let mut value = table.get((1, base)).unwrap().unwrap().value().to_vec();
                value[damaged_byte] ^= 0x40;
                table.insert((1, base), value.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
        drop(db);
        // The server starts; the chunk is never served.
        let (store, logs) = Store::open(dir.path(), Some(3)).unwrap();
        let log = &logs[0].0;
        assert!(read(&store, log, 0, 4, 100, u32::MAX).is_err(), "byte {damaged_byte}");
        store.check_consistency_except(&[(1, 0), (1, 2)]).unwrap();
        // The subscription reads past the first: it goes, by where the next chunk starts.
        let entries = vec![cursor(4, 1, 4, "s", 2, 2)];
        let state = store.replica_append(1, chunk(1, entries, 5, 4)).await.unwrap();
        assert_eq!(state.log_start, 2, "byte {damaged_byte}");
        store.check_consistency_except(&[(1, 2)]).unwrap();
        // And past the last: it goes, by the log end.
        let entries = vec![cursor(5, 1, 4, "s", 4, 4)];
        let state = store.replica_append(1, chunk(1, entries, 6, 4)).await.unwrap();
        assert_eq!(state.log_start, 4, "byte {damaged_byte}");
        assert!(payloads(&store, log).is_empty());
        store.check_consistency().unwrap();
    }
}

#[tokio::test]
async fn a_follower_appends_truncates_and_resets_by_the_leaders_word() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
    let log = store.create_topic(follower_meta(1)).await.unwrap();
    assert_eq!(log.state().epoch, 0, "a follower adopts epochs by fetching");
    let entries = vec![
        begin(0, 1, 0),
        batch(1, 1, 0, 7, 0, &["a", "b"]),
        cursor(2, 1, 2, "s", 1, 1),
        batch(3, 1, 2, 7, 1, &["c"]),
    ];
    let state = store.replica_append(1, chunk(1, entries, 3, 2)).await.unwrap();
    assert_eq!((state.log_end, state.end_index, state.commit, state.epoch), (3, 4, 2, 1));
    assert_eq!(store.cursor(1, &sub("s")).unwrap(), Some(Cursor::at(1)), "applied: committed");
    assert_eq!(state.log_start, 1, "the deletion the cursor allowed is applied too");
    // The follower rebuilt the leader's dedup state from the batches.
    assert_eq!(store.producer_states(1).unwrap()[0].1.last_sequence, 1);

    // A promise fences older epochs and reports (last epoch, log end index).
    assert_eq!(store.promise(1, 3).await.unwrap(), (1, 4));
    let stale = chunk(2, vec![], 0, 0);
    assert!(matches!(store.replica_append(1, stale).await, Err(Error::StaleEpoch { current: 3, .. })));

    // Truncating a divergent tail drops its records and the dedup entries of its batches;
    // never what is applied.
    assert!(store.truncate(1, 2).await.is_err(), "entry 2 is applied: committed");
    let state = store.truncate(1, 3).await.unwrap();
    assert_eq!((state.end_index, state.log_end), (3, 2));
    assert_eq!(store.producer_states(1).unwrap()[0].1.last_sequence, 0);
    // The next leader's entries continue from there.
    let state = store
        .replica_append(1, chunk(3, vec![begin(3, 3, 2), batch(4, 3, 2, 8, 0, &["z"])], 5, 3))
        .await
        .unwrap();
    assert_eq!((state.log_start, state.log_end, state.commit, state.epoch), (1, 3, 3, 3));
    let got: Vec<_> = payloads(&store, &log).into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, ["b", "z"], "the leader's deletion applied, the divergent record replaced");
    store.check_consistency().unwrap();

    // Behind what the leader compacted: drop everything, restart at its first stored entry
    // with the state the entries before it built.
    let reset = ReplicaReset {
        start_index: 20,
        start_offset: 10,
        history: vec![(1, 0), (3, 3)],
        applied: 22,
        log_start: 10,
        cursors: vec![("s".into(), Cursor::at(10))],
        producers: vec![(8, ProducerState::default())],
    };
    let state = store.reset(1, reset).await.unwrap();
    assert_eq!((state.log_start, state.log_end, state.end_index, state.epoch), (10, 10, 20, 3));
    assert_eq!(store.record_count().unwrap(), 0);
    assert_eq!(store.cursor(1, &sub("s")).unwrap(), Some(Cursor::at(10)));
    // Entries it gets again below what the leader applied are not applied twice.
    let again =
        vec![cursor(20, 3, 10, "s", 5, 10), cursor(21, 3, 10, "s", 10, 10), cursor(22, 3, 10, "t", 10, 10)];
    store.replica_append(1, chunk(3, again, 23, 10)).await.unwrap();
    assert_eq!(store.cursor(1, &sub("s")).unwrap(), Some(Cursor::at(10)));
    assert_eq!(store.cursor(1, &sub("t")).unwrap(), Some(Cursor::at(10)));
    // And it all survives a reopen.
    drop(log);
    drop(store);
    let (store, logs) = Store::open(dir.path(), Some(3)).unwrap();
    let (log, meta) = &logs[0];
    assert_eq!(meta.promised, 3);
    assert_eq!((log.state().log_start, log.state().end_index), (10, 23));
    store.check_consistency().unwrap();
}

#[tokio::test]
async fn a_restart_from_the_leaders_state_takes_only_the_dedup_outcomes_before_it() {
    // A leader's producer table also holds batches it wrote past the restart point, which may
    // never commit: a follower that took them would, as the next leader, answer a retry of
    // such a batch as a duplicate at offsets another batch takes.
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
    store.create_topic(follower_meta(1)).await.unwrap();
    let outcome =
        |sequence, base, index| BatchOutcome { sequence, base, count: 1, index, epoch: 1, rejected: false };
    let mut state = ProducerState::default();
    state.record(outcome(0, 0, 1), 5);
    state.record(outcome(1, 1, 2), 5);
    let reset = ReplicaReset {
        start_index: 2,
        start_offset: 1,
        history: vec![(1, 0)],
        applied: 2,
        log_start: 1,
        cursors: vec![],
        producers: vec![(7, state)],
    };
    store.reset(1, reset).await.unwrap();
    let producers = store.producer_states(1).unwrap();
    assert_eq!(producers[0].1.last_sequence, 0, "batch 1 (entry 2) comes with its entry, if ever");
    // With the entry, the outcome comes back.
    store.replica_append(1, chunk(1, vec![batch(2, 1, 1, 7, 1, &["b"])], 3, 2)).await.unwrap();
    assert_eq!(store.producer_states(1).unwrap()[0].1.last_sequence, 1);
}

#[tokio::test]
async fn a_follower_restarted_past_its_first_entries_records_never_stores_records_below_its_log_start() {
    // Simulator seed 37874: restarted from a leader's state with the log start (45) inside the
    // records of the entries it then copies (from 30), from a newer leader that had not
    // applied as far and so still shipped them: records 30..44 were stored below the log start.
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
    store.create_topic(follower_meta(1)).await.unwrap();
    let reset = ReplicaReset {
        start_index: 4,
        start_offset: 2,
        history: vec![(1, 0)],
        applied: 6,
        log_start: 5,
        cursors: vec![("s".into(), Cursor::at(5))],
        producers: vec![],
    };
    store.reset(1, reset).await.unwrap();
    let entries = vec![
        batch(4, 1, 2, 7, 2, &["c", "d"]),
        batch(5, 1, 4, 7, 3, &["e", "f", "g"]),
        cursor(6, 1, 7, "s", 6, 6),
    ];
    let state = store.replica_append(1, chunk(1, entries, 7, 7)).await.unwrap();
    assert_eq!((state.log_start, state.log_end), (6, 7));
    assert_eq!(store.record_count().unwrap(), 1, "only g is at or past the log start");
    assert_eq!(store.producer_states(1).unwrap()[0].1.last_sequence, 3, "the dedup outcomes still count");
    store.check_consistency().unwrap();
}

#[tokio::test]
async fn uncommitted_cursor_changes_are_truncated_with_the_records_and_committed_ones_stay() {
    // A follower took cursor changes from a leader that was then deposed: the committed one
    // must stay, the uncommitted one must go with the divergent tail (defect 1 of the safety
    // issue: they were versions without epochs, never reconciled).
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
    store.create_topic(follower_meta(1)).await.unwrap();
    let entries = vec![
        begin(0, 1, 0),
        batch(1, 1, 0, 7, 0, &["a", "b", "c"]),
        cursor(2, 1, 3, "s", 0, 0),
        cursor(3, 1, 3, "s", 2, 2),
        cursor(4, 1, 3, "t", 2, 2),
    ];
    store.replica_append(1, chunk(1, entries, 4, 3)).await.unwrap();
    assert_eq!(store.cursor(1, &sub("s")).unwrap(), Some(Cursor::at(2)));
    assert_eq!(store.cursor(1, &sub("t")).unwrap(), None, "not committed, not applied");
    let state = store.truncate(1, 4).await.unwrap();
    assert_eq!(state.end_index, 4);
    store.replica_append(1, chunk(2, vec![begin(4, 2, 3), cursor(5, 2, 3, "u", 2, 2)], 6, 3)).await.unwrap();
    assert_eq!(store.cursor(1, &sub("t")).unwrap(), None, "t was never committed: gone");
    assert_eq!(store.cursor(1, &sub("u")).unwrap(), Some(Cursor::at(2)));
    assert_eq!(store.cursor(1, &sub("s")).unwrap(), Some(Cursor::at(2)), "the committed cursor stays");
    store.check_consistency().unwrap();
}

#[tokio::test]
async fn applied_entries_are_compacted_and_a_follower_restarts_from_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(1)).unwrap();
    let log = solo(&store, meta(1, "t")).await;
    store.create_subscription(1, sub("s"), StartFrom::Earliest, false).await.unwrap();
    let n = RETAINED_ENTRIES + 2000;
    for seq in 0..n / 2 {
        store.append(1, 7, seq, records(&["r"])).await.unwrap();
        store.ack(1, sub("s"), log.state().log_end).await.unwrap();
    }
    let s = log.state();
    assert!(s.start_index > 0, "applied entries without records were compacted");
    assert!(s.end_index - s.start_index <= RETAINED_ENTRIES + 1100, "{s:?}");
    assert_eq!(store.entry_count().unwrap(), s.end_index - s.start_index);
    let reset = store.reset_snapshot(1).unwrap();
    assert_eq!(reset.start_index, s.start_index);
    assert_eq!(reset.cursors, vec![("s".to_string(), Cursor::at(s.log_end))]);
    assert!(reset.applied >= reset.start_index);
    store.check_consistency().unwrap();
}

/// A store on a [`SimDisk`] with its writer driven by the test.
fn driven(disk: &SimDisk) -> (Store, Writer, Vec<HostedTopic>) {
    Store::open_driven(Path::new("sim"), Some(1), &Medium::Sim(disk.clone()), system_clock()).unwrap()
}

/// Producer 1's first batch, of one record, to `topic`.
fn first_batch(topic: TopicId, reply: Reply<Appended>) -> Command {
    Command::Append { topic, producer: 1, sequence: 0, records: records(&["a"]), refused: None, reply }
}

/// Runs one command through the writer, as one group; returns its answer.
fn run<T>(writer: &mut Writer, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
    let (reply, mut rx) = oneshot::channel();
    writer.stage(vec![make(reply)]);
    writer.finish();
    rx.try_recv().expect("answered")
}

#[test]
fn a_power_cut_mid_group_leaves_a_store_the_rules_accept_and_loses_only_that_group() {
    let disk = SimDisk::new();
    let (store, mut writer, _) = driven(&disk);
    let m = TopicMeta { voters: vec![1, 2, 3], ..meta(1, "r") };
    run(&mut writer, |reply| Command::CreateTopic { meta: m, reply }).unwrap();
    run(&mut writer, |reply| Command::BecomeLeader { topic: 1, epoch: 1, reply }).unwrap();
    for seq in 0..5 {
        run(&mut writer, |reply| Command::Append {
            topic: 1,
            producer: 1,
            sequence: seq,
            records: records(&["a", "b"]),
            refused: None,
            reply,
        })
        .unwrap();
    }
    // The next group is applied and shown to followers; the power goes before its fsync.
    let (reply, _rx) = oneshot::channel();
    writer.stage(vec![Command::Append {
        topic: 1,
        producer: 1,
        sequence: 5,
        records: records(&["lost"]),
        refused: None,
        reply,
    }]);
    disk.power_cut();
    writer.abandon();
    drop((store, writer));
    disk.power_on();
    let (store, _, logs) = driven(&disk);
    store.check_consistency().unwrap();
    let state = logs[0].0.state();
    assert_eq!((state.end_index, state.log_end), (6, 10), "the five durable batches, not the sixth");
    assert_eq!(state.leading, None, "and it does not lead its old epoch again");
}

/// The writer's dedup state is what a restart would load: the checkpoint and the entries
/// after it.
fn dedup_as_loaded(store: &Store, writer: &Writer) {
    for (topic, held) in writer.producer_states() {
        assert_eq!(store.producer_states(topic).unwrap(), held, "topic {topic}");
    }
}

fn checkpoint_rows(store: &Store) -> u64 {
    let txn = store.read_txn().unwrap();
    redb::ReadableTableMetadata::len(&txn.open_table(super::tables::PRODUCERS).unwrap()).unwrap()
}

fn last_sequences(store: &Store) -> Vec<(ProducerId, Sequence)> {
    store.producer_states(1).unwrap().into_iter().map(|(p, s)| (p, s.last_sequence)).collect()
}

#[test]
fn the_producers_dedup_state_is_a_checkpoint_the_entries_after_it_complete() {
    let disk = SimDisk::new();
    let (store, mut writer, _) = driven(&disk);
    writer.set_retention(Retention { retained: 1, batch: 1 });
    run(&mut writer, |reply| Command::CreateTopic { meta: follower_meta(1), reply }).unwrap();
    let append = |writer: &mut Writer, entries, commit_index, commit| {
        let chunk = chunk(1, entries, commit_index, commit);
        run(writer, |reply| Command::ReplicaAppend { topic: 1, chunk, reply }).unwrap();
    };
    // A batch writes its entry and its records, no producer row.
    let first = vec![
        begin(0, 1, 0),
        batch(1, 1, 0, 7, 0, &["a"]),
        batch(2, 1, 1, 7, 1, &["b"]),
        batch(3, 1, 2, 8, 0, &["c"]),
    ];
    append(&mut writer, first, 0, 0);
    assert_eq!(checkpoint_rows(&store), 0);
    assert_eq!(last_sequences(&store), [(7, 1), (8, 0)]);
    dedup_as_loaded(&store, &writer);

    // Truncated above the checkpoint: rebuilt from the entries kept (producer 8's batch went).
    run(&mut writer, |reply| Command::Truncate { topic: 1, to: 3, reply }).unwrap();
    assert_eq!(last_sequences(&store), [(7, 1)]);
    dedup_as_loaded(&store, &writer);

    // Compaction of entries the state was built from checkpoints it first, at the log end
    // (entries 5 and 6 are not committed yet).
    let more = vec![
        batch(3, 1, 2, 8, 0, &["c"]),
        cursor(4, 1, 3, "s", 3, 3),
        batch(5, 1, 3, 7, 2, &["d"]),
        batch(6, 1, 4, 7, 3, &["e"]),
    ];
    append(&mut writer, more, 5, 3);
    assert!(store.entry_count().unwrap() < 7, "entries were compacted");
    assert_eq!(checkpoint_rows(&store), 2);
    dedup_as_loaded(&store, &writer);

    // Truncated below the checkpoint: the outcomes it counted past the cut are forgotten and
    // it is written again at the cut.
    run(&mut writer, |reply| Command::Truncate { topic: 1, to: 6, reply }).unwrap();
    assert_eq!(last_sequences(&store), [(7, 2), (8, 0)]);
    dedup_as_loaded(&store, &writer);
    store.check_consistency().unwrap();

    // The state survives a restart, and forgotten producers stay forgotten.
    drop((store, writer));
    let (store, mut writer, _) = driven(&disk);
    store.check_consistency().unwrap();
    assert_eq!(last_sequences(&store), [(7, 2), (8, 0)]);
    dedup_as_loaded(&store, &writer);
    let more = vec![batch(6, 1, 4, 9, 0, &["f"])];
    append(&mut writer, more, 5, 3);
    assert_eq!(run(&mut writer, |reply| Command::ExpireProducers { topic: 1, cutoff_ms: 6, reply }), Ok(3));
    assert_eq!(checkpoint_rows(&store), 0);
    dedup_as_loaded(&store, &writer);
    drop((store, writer));
    let (store, mut writer, _) = driven(&disk);
    assert!(last_sequences(&store).is_empty());
    dedup_as_loaded(&store, &writer);

    // Over the producer limit a replica forgets the one silent longest (all are equally
    // silent here: the lowest id), and a restart does not bring it back.
    use super::producers::MAX_PRODUCERS_PER_TOPIC;
    let many = MAX_PRODUCERS_PER_TOPIC as u64 + 1;
    let batches = (0..many).map(|i| batch(7 + i, 1, 5 + i, 100 + i, 0, &["x"])).collect();
    append(&mut writer, batches, 5, 3);
    let kept =
        |store: &Store| store.producer_states(1).unwrap().into_iter().map(|(p, _)| p).collect::<Vec<_>>();
    assert_eq!(kept(&store), (101..100 + many).collect::<Vec<_>>());
    dedup_as_loaded(&store, &writer);
    drop((store, writer));
    let (store, writer, _) = driven(&disk);
    assert_eq!(kept(&store).len(), MAX_PRODUCERS_PER_TOPIC);
    dedup_as_loaded(&store, &writer);
    store.check_consistency().unwrap();
}

#[test]
fn a_failed_fsync_fails_the_group_and_a_shown_one_stops_the_server() {
    let disk = SimDisk::new();
    let (store, mut writer, _) = driven(&disk);
    let m = meta(1, "t");
    run(&mut writer, |reply| Command::CreateTopic { meta: m, reply }).unwrap();
    run(&mut writer, |reply| Command::BecomeLeader { topic: 1, epoch: 1, reply }).unwrap();
    disk.fail_syncs(1);
    let err = run(&mut writer, |reply| Command::Append {
        topic: 1,
        producer: 1,
        sequence: 0,
        records: records(&["a"]),
        refused: None,
        reply,
    });
    assert!(matches!(err, Err(Error::Storage { .. })), "{err:?}");
    drop((store, writer));
    let (store, mut writer, _) = driven(&disk);
    store.check_consistency().unwrap();
    run(&mut writer, |reply| Command::BecomeLeader { topic: 1, epoch: 1, reply }).unwrap();
    let a = run(&mut writer, |reply| Command::Append {
        topic: 1,
        producer: 1,
        sequence: 0,
        records: records(&["a"]),
        refused: None,
        reply,
    });
    assert_eq!(a.unwrap().base, 0, "the failed batch was never stored; its retry goes in");

    // A replicated leader whose followers saw the group must not reuse its indexes.
    let m = TopicMeta { voters: vec![1, 2, 3], ..meta(2, "r") };
    run(&mut writer, |reply| Command::CreateTopic { meta: m, reply }).unwrap();
    run(&mut writer, |reply| Command::BecomeLeader { topic: 2, epoch: 1, reply }).unwrap();
    disk.fail_syncs(1);
    let (reply, _rx) = oneshot::channel();
    writer.stage(vec![first_batch(2, reply)]);
    assert_eq!(writer.finish(), GroupOutcome::Fatal);
    drop((store, writer));
    let (store, _, _) = driven(&disk);
    store.check_consistency().unwrap();
}

#[test]
fn a_leader_whose_shown_group_fails_gives_its_epoch_up_and_the_store_is_reopened_in_process() {
    let disk = SimDisk::new();
    let reserve = tempfile::tempdir().unwrap();
    let (store, mut writer, _) = driven(&disk);
    let reopen = disk.clone();
    writer.set_recovery(
        reserve.path().to_path_buf(),
        Box::new(move || Database::builder().create_with_backend(reopen.backend())),
    );
    let m = TopicMeta { voters: vec![1, 2, 3], ..meta(2, "r") };
    let log = run(&mut writer, |reply| Command::CreateTopic { meta: m, reply }).unwrap();
    run(&mut writer, |reply| Command::BecomeLeader { topic: 2, epoch: 1, reply }).unwrap();
    disk.fail_syncs(1);
    let (reply, mut rx) = oneshot::channel();
    writer.stage(vec![first_batch(2, reply)]);
    let outcome = writer.finish();
    assert_ne!(outcome, GroupOutcome::Fatal, "a store that can be reopened goes on");
    assert!(matches!(rx.try_recv().unwrap(), Err(Error::Storage { .. })), "answered, never acked");
    if outcome == GroupOutcome::Broken {
        writer.try_reopen().unwrap();
    }
    assert_eq!(log.state().leading, None, "the epoch its followers may hold more of is given up");
    let again = run(&mut writer, |reply| Command::BecomeLeader { topic: 2, epoch: 1, reply });
    assert!(matches!(again, Err(Error::StaleEpoch { .. })), "never led again: {again:?}");
    // A new epoch is fine, and the store writes again.
    run(&mut writer, |reply| Command::BecomeLeader { topic: 2, epoch: 2, reply }).unwrap();
    assert_eq!(log.state().leading, Some(2));
    drop((store, writer));
    let (store, _, _) = driven(&disk);
    store.check_consistency().unwrap();
}

#[test]
fn a_full_disk_fails_the_group_and_the_store_takes_writes_again_once_there_is_room() {
    let disk = SimDisk::new();
    let (store, mut writer, _) = driven(&disk);
    let m = TopicMeta {
        config: TopicConfig { max_record_bytes: 100_000, ..TopicConfig::default() },
        ..meta(1, "t")
    };
    run(&mut writer, |reply| Command::CreateTopic { meta: m, reply }).unwrap();
    run(&mut writer, |reply| Command::BecomeLeader { topic: 1, epoch: 1, reply }).unwrap();
    disk.set_capacity(Some(disk.len()));
    let big: Vec<Record> = (0..100).map(|_| Record { payload: vec![7; 1000], ..Record::default() }).collect();
    let err = run(&mut writer, |reply| Command::Append {
        topic: 1,
        producer: 1,
        sequence: 0,
        records: big.clone(),
        refused: None,
        reply,
    });
    assert!(matches!(err, Err(Error::Storage { .. })), "{err:?}");
    drop((store, writer));
    disk.set_capacity(None);
    let (store, mut writer, _) = driven(&disk);
    store.check_consistency().unwrap();
    run(&mut writer, |reply| Command::BecomeLeader { topic: 1, epoch: 1, reply }).unwrap();
    let a = run(&mut writer, |reply| Command::Append {
        topic: 1,
        producer: 1,
        sequence: 0,
        records: big,
        refused: None,
        reply,
    });
    assert_eq!(a.unwrap().count, 100);
    store.check_consistency().unwrap();
}

#[tokio::test]
async fn a_time_finds_the_first_record_stamped_at_or_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Some(3)).unwrap();
    let log = store.create_topic(follower_meta(1)).await.unwrap();
    // Batches of 3 records stamped 100, 200, ..., 1000 at offsets 0, 3, ..., 27.
    let mut entries = vec![begin(0, 1, 0)];
    for i in 0..10u64 {
        let stamp = (i + 1) * 100;
        let kind = EntryKind::Batch { count: 3, timestamp_ms: stamp, producer: Some((7, i)) };
        entries.push(ShippedEntry {
            index: i + 1,
            entry: Entry { epoch: 1, end: i * 3 + 3, kind },
            chunk: Bytes::from(chunk::encode(stamp, &records(&["a", "b", "c"]))),
        });
    }
    store.replica_append(1, chunk(1, entries, 0, 0)).await.unwrap();
    let at = |time, log_start, end| store.offset_at_time(&log, log_start, end, time).unwrap();
    assert_eq!(at(0, 0, 30), 0, "before every record: the log start");
    assert_eq!(at(100, 0, 30), 0);
    assert_eq!(at(101, 0, 30), 3, "inside a batch's stamp gap: the next batch");
    assert_eq!(at(500, 0, 30), 12);
    assert_eq!(at(1000, 0, 30), 27);
    assert_eq!(at(1001, 0, 30), 30, "after every record: the end");
    assert_eq!(at(500, 0, 12), 12, "past the end asked: the end");
    assert_eq!(at(100, 4, 30), 4, "a log start inside a batch: never below it");
    assert_eq!(at(300, 4, 30), 6);
    for time in (0..1100).step_by(7) {
        let found = at(time, 0, 30);
        let stamp = |o: u64| (o / 3 + 1) * 100;
        assert!(found == 30 || stamp(found) >= time, "{time}: {found} is stamped before");
        assert!(found == 0 || stamp(found - 1) < time, "{time}: {} is stamped at or after", found - 1);
    }
}
