//! The consumer: reads a topic through a durable subscription, from the leader or from one
//! replica (see [`ReadFrom`]), and acknowledges at the leader.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::debug;

use super::{unexpected, Backoff, Client, POLL_GRACE, STALL_CHECK};
use crate::error::Error;
use crate::transport::{Connection, FramedStream};
use crate::types::{Offset, StoredRecord, SubscriptionName, TopicName};
use crate::wire::{ConsumerSession, Evicted, Request, Response};

/// Reads a topic through a durable subscription.
pub struct Consumer {
    client: Arc<Client>,
    topic: TopicName,
    subscription: SubscriptionName,
    /// Holds the subscription at the leader while this consumer reads (one consumer per
    /// subscription at a time).
    session: ConsumerSession,
    /// Evictions reported by the server and not yet taken by the caller.
    evicted: Option<Evicted>,
    /// Evicted records the server's notices counted so far (it repeats a notice until an
    /// ack moves the cursor on, which clears its count).
    told: u64,
    stream: Option<FramedStream>,
    /// The connection `stream` runs on; acks sent ahead use their own streams on it.
    conn: Option<Connection>,
    /// Acks sent ahead by [`poll`](Self::poll), not awaited there: the server answers an ack
    /// once a majority holds the cursor, and a poll must not wait behind that.
    acks_in_flight: VecDeque<JoinHandle<Result<Response, Error>>>,
    /// Next offset to read in this session; `None` until the first fetch, which starts at
    /// the subscription's committed cursor.
    position: Option<Offset>,
    commit: Offset,
    /// `max_bytes` of the next fetch: [`FETCH_BYTES`], raised to the size of a larger record
    /// when the server says one does not fit.
    fetch_bytes: u32,
    read_from: ReadFrom,
    /// [`ReadFrom::Replica`]: the stream to the replica read from.
    replica: Option<FramedStream>,
    /// When the leader last heard from this consumer (a fetch or an ack: either renews its
    /// hold on the subscription).
    leader_heard: Instant,
    /// An ack [`poll`](Self::poll) was given and holds back (see [`ACK_EVERY`]).
    held_ack: Option<Offset>,
    /// When a poll last sent an ack.
    acked_at: Instant,
    /// A fetch sent on `stream` ahead of the next poll (see [`Ahead`]).
    ahead: Option<Ahead>,
    /// When the last poll at the leader started: polls further apart than [`AHEAD_FRESH`]
    /// send no fetch ahead (its answer would be dropped).
    polled_at: Option<Instant>,
}

/// How soon after a fetch ahead was sent its answer may serve a poll. A poll served from it
/// is then no staler than one that was in flight at that moment: the fetch renewed the
/// consumer's hold on the subscription (a lease of seconds), and a takeover or a leader
/// change since raced with it as with any poll in flight. Later, the poll fetches afresh (and
/// learns of a takeover at once).
const AHEAD_FRESH: Duration = Duration::from_millis(100);

/// A fetch a consumer sends as soon as a poll's records arrive, while the leader has more
/// committed, so the leader reads and sends the next records while the caller decodes and
/// handles these (Kafka's consumer fetches ahead the same way). It does not wait (a wait of
/// zero), so the next poll's own wait is kept: an empty or failed answer is dropped and that
/// poll fetches as if none had been sent, and so it is when the answer is older than
/// [`AHEAD_FRESH`]. At most one per consumer: one answer of at most `max_bytes` held in memory.
#[derive(Debug)]
struct Ahead {
    from: Offset,
    max_records: u32,
    max_bytes: u32,
    sent_at: Instant,
    /// Its answer, once read off the stream (to free the stream for another request).
    answer: Option<Response>,
}

/// What every fetch of a consumer's subscription names: one place builds the request for
/// a poll and for a fetch sent ahead.
struct FetchTarget {
    topic: TopicName,
    subscription: SubscriptionName,
    session: ConsumerSession,
}

impl FetchTarget {
    fn request(&self, from: Option<Offset>, max_records: u32, max_bytes: u32, max_wait_ms: u32) -> Request {
        Request::Fetch {
            topic: self.topic.clone(),
            subscription: self.subscription.clone(),
            from,
            max_records,
            max_bytes,
            max_wait_ms,
            session: Some(self.session.clone()),
        }
    }
}

/// Where a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReadFrom {
    /// The topic's leader.
    #[default]
    Leader,
    /// One replica of the topic, picked by the subscription's name so that subscriptions
    /// spread over the replicas (like Kafka's fetch from follower, KIP-392). A replica serves
    /// records up to the commit point it knows, never past it. Acknowledgements, and with them
    /// the consumer's hold on its subscription and eviction notices, stay at the leader; a
    /// replica read that comes back empty or fails goes on at the leader, so an empty poll
    /// still means the leader had nothing more committed.
    Replica,
}

/// The replica a [`ReadFrom::Replica`] consumer of `subscription` reads from: picked by a hash
/// of the name (FNV-1a) among the replicas in address order, so subscriptions spread evenly
/// and each keeps its replica while the replica set stays.
pub fn replica_for(subscription: &str, replicas: &[SocketAddr]) -> Option<SocketAddr> {
    let mut sorted = replicas.to_vec();
    sorted.sort();
    let hash = crate::types::fnv1a(subscription.bytes());
    sorted.get((hash % sorted.len().max(1) as u64) as usize).copied()
}

/// How long a replica-reading consumer may go without a request to the leader: its hold on
/// the subscription lasts the server's session lease (10 s by default) past its last one.
const LEADER_RENEW: Duration = Duration::from_secs(3);

/// Acks a consumer keeps in flight before it waits for the oldest.
const MAX_ACKS_IN_FLIGHT: usize = 32;

/// Least time between two acks a consumer's polls send: an ack given to a poll sooner is held
/// (later ones replace it, acks being cumulative) and goes with the first poll after this, or
/// as soon as a poll finds nothing to read, or with [`Consumer::ack`] or
/// [`Consumer::release`]. Every ack is a cursor entry that a majority must fsync; a consumer
/// polling every millisecond doubled the commits of a topic at 5,000 records/s, and this
/// took its end-to-end latency from p50 2.0 to 1.3 ms (docs/performance.md). A crash, or a
/// consumer dropped without `ack` or `release`, may read again what the last 10 ms
/// acknowledged, as any at-least-once consumer may.
pub const ACK_EVERY: Duration = Duration::from_millis(10);

/// Whether a read that asked for `asked` bytes and was told the next record takes `size`
/// can take it by asking for `size` (false: no larger, or past what a server serves).
pub(super) fn room_for(size: u64, asked: u32) -> bool {
    size > asked as u64 && size <= crate::server::MAX_FETCH_BYTES as u64
}

/// Record bytes a consumer asks for per fetch. A long-polling fetch holds this much of its
/// connection's memory budget at the server while it waits (`transport::CONNECTION_BUDGET`),
/// so it is kept well below the largest fetch; ~1 MiB is thousands of typical records.
pub const FETCH_BYTES: u32 = 1024 * 1024;

impl Consumer {
    pub(super) fn new(
        client: Arc<Client>,
        topic: TopicName,
        subscription: SubscriptionName,
        session: ConsumerSession,
    ) -> Self {
        Self {
            client,
            topic,
            subscription,
            session,
            evicted: None,
            told: 0,
            stream: None,
            conn: None,
            acks_in_flight: VecDeque::new(),
            position: None,
            commit: 0,
            fetch_bytes: FETCH_BYTES,
            read_from: ReadFrom::Leader,
            replica: None,
            leader_heard: Instant::now(),
            held_ack: None,
            acked_at: Instant::now(),
            ahead: None,
            polled_at: None,
        }
    }

    /// Reads from `from` from now on.
    pub fn read_from(mut self, from: ReadFrom) -> Self {
        self.read_from = from;
        self
    }

    /// The next offset this consumer will read, once known.
    pub fn position(&self) -> Option<Offset> {
        self.position
    }

    /// One round trip on the consumer's stream, reconnecting through the naming server on
    /// retriable failures. `ack` (if any) rides in front of `req` on the same stream.
    async fn exchange(
        &mut self,
        ack: Option<Offset>,
        wait: Duration,
        req: impl Fn(Option<Offset>) -> Request,
    ) -> Result<Response, Error> {
        let mut backoff = Backoff::new(self.client.retry_deadline);
        let limit = wait + POLL_GRACE;
        loop {
            // The stream answers in order: a fetch sent ahead is answered first.
            self.collect_ahead().await;
            let client = self.client.clone();
            let mut moved = false;
            let result = async {
                if self.stream.is_none() {
                    let conn = self.client.leader(&self.topic).await?;
                    self.stream = Some(conn.open().await?);
                    self.conn = Some(conn);
                }
                let stream = self.stream.as_mut().expect("stream");
                if let Some(next) = ack {
                    stream.queue(&Request::Ack {
                        topic: self.topic.clone(),
                        subscription: self.subscription.clone(),
                        next,
                        session: Some(self.session.clone()),
                    })?;
                }
                stream.queue(&req(self.position))?;
                stream.flush().await?;
                let peer = stream.peer();
                let answer = async {
                    if ack.is_some() {
                        stream.recv().await?;
                    }
                    stream.recv().await
                };
                // No answer past the wait: if the book names another leader meanwhile, go
                // there now rather than when this one's connection times out.
                tokio::select! {
                    answer = answer => answer,
                    () = client.leader_moved(&self.topic, peer, wait + STALL_CHECK) => {
                        moved = true;
                        Err(Error::Unavailable { detail: format!("the leader of {} moved", self.topic) })
                    }
                }
            };
            // A dead server sends nothing: do not wait for the idle timeout to say so.
            let result = match tokio::time::timeout(limit, result).await {
                Ok(r) => r,
                Err(_) => Err(Error::Unavailable {
                    detail: format!("no answer from the leader of {} in {limit:?}", self.topic),
                }),
            };
            // (A leader that moved was looked up already.)
            if !moved
                && result
                    .as_ref()
                    .is_err_and(|e| e.is_retriable() || matches!(e, Error::OffsetBeyondEnd { .. }))
            {
                self.client.suspect(&self.topic);
            }
            if result.is_err() {
                // The stream may hold an answer we did not read (e.g. the Fetch behind a failed
                // Ack): never reuse it.
                self.conn = None;
                if let Some(mut s) = self.stream.take() {
                    s.finish();
                    if matches!(result, Err(Error::Unavailable { .. })) {
                        self.client.forget_server(s.peer()).await;
                    }
                }
            }
            // A consumer reads and acks committed offsets only: one beyond the end is a new
            // leader whose commit point has not caught up yet (it does within a round trip to
            // its followers). Retried like a lost leader, not fatal to the consumer.
            let catching_up = matches!(result, Err(Error::OffsetBeyondEnd { .. }));
            match result {
                Err(e) if e.is_retriable() || catching_up => {
                    debug!(error = %e, "consumer retrying");
                    if !backoff.wait().await {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    /// Reads the answer to the fetch sent ahead off the stream, if it is not read yet. A
    /// stream that fails here is dropped, and the fetch with it.
    async fn collect_ahead(&mut self) {
        let Some(ahead) = self.ahead.as_mut().filter(|a| a.answer.is_none()) else { return };
        let answer = match self.stream.as_mut() {
            Some(stream) => tokio::time::timeout(POLL_GRACE, stream.recv()).await,
            None => Ok(Err(Error::internal("no stream"))),
        };
        match answer {
            Ok(Ok(response)) => ahead.answer = Some(response),
            _ => {
                self.ahead = None;
                self.close();
            }
        }
    }

    /// The answer to the fetch sent ahead, if it was for the next `max_records` records
    /// from `position` and is fresh (taken; another is dropped, with the stream if the answer
    /// is not read yet: nothing waits for a stale one).
    async fn take_ahead(&mut self, max_records: u32, max_bytes: u32) -> Option<Response> {
        let ahead = self.ahead.as_ref()?;
        let usable = Some(ahead.from) == self.position
            && ahead.max_records == max_records
            && ahead.max_bytes == max_bytes
            && ahead.sent_at.elapsed() <= AHEAD_FRESH;
        if !usable {
            if ahead.answer.is_none() {
                self.close();
            }
            self.ahead = None;
            return None;
        }
        self.collect_ahead().await;
        self.ahead.take()?.answer
    }

    fn fetch_target(&self) -> FetchTarget {
        FetchTarget {
            topic: self.topic.clone(),
            subscription: self.subscription.clone(),
            session: self.session.clone(),
        }
    }

    /// Sends the next fetch ahead on the stream (see [`Ahead`]) when the leader has committed
    /// records past `position`. A stream that fails here is dropped (the next poll opens one).
    async fn send_ahead(&mut self, max_records: u32, max_bytes: u32, since_last_poll: Option<Duration>) {
        if since_last_poll.is_none_or(|gap| gap > AHEAD_FRESH) {
            return;
        }
        let Some(from) = self.position.filter(|p| *p < self.commit) else { return };
        let req = self.fetch_target().request(Some(from), max_records, max_bytes, 0);
        let Some(stream) = self.stream.as_mut() else { return };
        let sent = match stream.queue(&req) {
            Ok(()) => stream.flush().await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => {
                self.ahead =
                    Some(Ahead { from, max_records, max_bytes, sent_at: Instant::now(), answer: None })
            }
            Err(e) => {
                debug!(topic = %self.topic, error = %e, "fetch ahead not sent; dropping the stream");
                self.close();
            }
        }
    }

    /// Fetches the next records (up to `max_records`), waiting up to `wait` for the first.
    /// `ack`, if given, moves the subscription's cursor to that offset: sent with this poll,
    /// or held until [`ACK_EVERY`] has passed since the last one (or the poll finds nothing).
    pub async fn poll(
        &mut self,
        max_records: u32,
        wait: Duration,
        ack: Option<Offset>,
    ) -> Result<Vec<StoredRecord>, Error> {
        if let Some(next) = ack {
            self.held_ack = Some(self.held_ack.map_or(next, |held| held.max(next)));
        }
        let due = ACK_EVERY.saturating_sub(self.acked_at.elapsed());
        if self.held_ack.is_none() || due.is_zero() {
            let ack = self.take_held_ack();
            return self.poll_once(max_records, wait, ack).await;
        }
        // Held: wait no longer than until it is due; with nothing read by then, send it (and
        // wait on, if there is wait left), so an idle subscription's cursor is never left
        // behind.
        let started = Instant::now();
        let records = self.poll_once(max_records, wait.min(due), None).await?;
        if !records.is_empty() {
            return Ok(records);
        }
        let ack = self.take_held_ack();
        self.poll_once(max_records, wait.saturating_sub(started.elapsed()), ack).await
    }

    /// The held ack, to send now.
    fn take_held_ack(&mut self) -> Option<Offset> {
        let ack = self.held_ack.take();
        if ack.is_some() {
            self.acked_at = Instant::now();
        }
        ack
    }

    /// One poll, sending `ack` first.
    async fn poll_once(
        &mut self,
        max_records: u32,
        wait: Duration,
        ack: Option<Offset>,
    ) -> Result<Vec<StoredRecord>, Error> {
        let replica_read = self.read_from == ReadFrom::Replica
            && self.conn.is_some()
            && self.leader_heard.elapsed() < LEADER_RENEW;
        let Some(from) = self.position.filter(|_| replica_read) else {
            return self.leader_poll(max_records, wait, ack).await;
        };
        self.check_acks().await?;
        if let Some(next) = ack {
            self.ack_ahead(next).await;
        }
        match self.replica_fetch(from, max_records, wait).await {
            Ok(records) if !records.is_empty() => {
                self.position = records.last().map(|r| r.offset + 1);
                return Ok(records);
            }
            Ok(_) => {}
            Err(e) => {
                debug!(topic = %self.topic, error = %e, "replica read failed; reading at the leader");
                self.replica = None;
            }
        }
        self.leader_poll(max_records, Duration::ZERO, None).await
    }

    /// Sends an ack ahead on its own stream to the leader, so a fetch does not wait for the
    /// cursor move to replicate. Acks are cumulative: a lost one is covered by the next.
    /// False when there is no connection to the leader yet (the ack then rides with a fetch).
    async fn ack_ahead(&mut self, next: Offset) -> bool {
        let Some(conn) = &self.conn else { return false };
        let req = Request::Ack {
            topic: self.topic.clone(),
            subscription: self.subscription.clone(),
            next,
            session: Some(self.session.clone()),
        };
        let conn = conn.clone();
        self.acks_in_flight.push_back(tokio::spawn(async move { conn.call(&req).await }));
        self.leader_heard = Instant::now();
        while self.acks_in_flight.len() > MAX_ACKS_IN_FLIGHT {
            if let Some(oldest) = self.acks_in_flight.pop_front() {
                let _ = oldest.await;
            }
        }
        true
    }

    /// Replica reads: the acks sent ahead that were answered. One refused because another
    /// consumer holds the subscription ends this consumer, as a fetch at the leader would;
    /// one that failed otherwise sends the next poll to the leader, looked up again.
    async fn check_acks(&mut self) -> Result<(), Error> {
        while self.acks_in_flight.front().is_some_and(|a| a.is_finished()) {
            let answer = self.acks_in_flight.pop_front().expect("an ack").await;
            let error = match answer {
                Ok(Ok(Response::Error(e))) | Ok(Err(e)) => e,
                Ok(Ok(_)) => continue,
                Err(e) => Error::internal(e),
            };
            // Past the commit point: a deposed leader that does not know yet (a replica showed
            // what the new one committed).
            if error.is_retriable() || matches!(error, Error::OffsetBeyondEnd { .. }) {
                self.client.suspect(&self.topic);
                self.conn = None;
                if let Some(mut s) = self.stream.take() {
                    s.finish();
                }
                continue;
            }
            return Err(error);
        }
        Ok(())
    }

    /// One read at this consumer's replica, from `from`, without a session.
    async fn replica_fetch(
        &mut self,
        from: Offset,
        max_records: u32,
        wait: Duration,
    ) -> Result<Vec<StoredRecord>, Error> {
        if self.replica.is_none() {
            let info = self.client.leader_info(&self.topic).await?;
            let replicas: Vec<SocketAddr> = info.replicas.iter().map(|r| r.addr).collect();
            let addr = replica_for(self.subscription.as_str(), &replicas)
                .ok_or_else(|| Error::Unavailable { detail: format!("{} has no replica", self.topic) })?;
            let stream = self.client.server_conn(addr).await?.open().await?;
            self.replica = Some(stream);
        }
        let stream = self.replica.as_mut().expect("a replica stream");
        let req = Request::Fetch {
            topic: self.topic.clone(),
            subscription: self.subscription.clone(),
            from: Some(from),
            max_records,
            max_bytes: self.fetch_bytes,
            max_wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            session: None,
        };
        let limit = wait + POLL_GRACE;
        let answer = tokio::time::timeout(limit, stream.call(&req)).await.map_err(|_| {
            Error::Unavailable { detail: format!("no answer from a replica of {} in {limit:?}", self.topic) }
        })??;
        match answer {
            Response::Records { records, commit, .. } => {
                self.commit = commit;
                records.decode()
            }
            Response::Error(e) => Err(e),
            other => Err(unexpected(other)),
        }
    }

    /// [`poll`](Self::poll) at the leader, with this consumer's session.
    async fn leader_poll(
        &mut self,
        max_records: u32,
        wait: Duration,
        ack: Option<Offset>,
    ) -> Result<Vec<StoredRecord>, Error> {
        let target = self.fetch_target();
        let wait_ms = wait.as_millis().min(u32::MAX as u128) as u32;
        let mut piggyback = None;
        if let Some(next) = ack {
            if !self.ack_ahead(next).await {
                piggyback = Some(next);
            }
        }
        self.leader_heard = Instant::now();
        let since_last_poll = self.polled_at.replace(Instant::now()).map(|at| at.elapsed());
        // The fetch sent ahead, if it brought records (an empty one did not wait as this
        // poll may: ask again).
        let ahead = self.take_ahead(max_records, self.fetch_bytes).await.filter(
            |r| matches!(r, Response::Records { records, .. } if !records.is_empty() || wait.is_zero()),
        );
        let resp = if let Some(resp) = ahead {
            resp
        } else {
            loop {
                let max_bytes = self.fetch_bytes;
                let result = self
                    .exchange(piggyback, wait, |from| target.request(from, max_records, max_bytes, wait_ms))
                    .await;
                match result {
                    // The next record is larger than we asked for: ask again with room for it.
                    Err(Error::FetchTooSmall { size, .. }) if room_for(size, max_bytes) => {
                        self.fetch_bytes = size as u32;
                    }
                    other => break other?,
                }
            }
        };
        match resp {
            Response::Records { records, commit, evicted, .. } => {
                let records = records.decode()?;
                if let Some(e) = evicted {
                    // The backlog policy moved the subscription past what we had read. The
                    // server repeats the notice until we ack past it: count each record once.
                    self.position = self.position.map(|p| p.max(e.resume_at));
                    let new = e.records.saturating_sub(self.told);
                    self.told = self.told.max(e.records);
                    if new > 0 {
                        self.evicted = Some(match self.evicted {
                            Some(before) => Evicted { records: before.records + new, ..e },
                            None => Evicted { records: new, ..e },
                        });
                    }
                }
                // Until a record arrives, keep reading from the subscription's cursor.
                if let Some(last) = records.last() {
                    self.position = Some(last.offset + 1);
                }
                self.commit = commit;
                self.send_ahead(max_records, self.fetch_bytes, since_last_poll).await;
                Ok(records)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Records the topic's backlog policy skipped for this subscription before it read them,
    /// reported since the last call.
    pub fn take_evicted(&mut self) -> Option<Evicted> {
        self.evicted.take()
    }

    /// The commit offset the last poll saw: with an empty poll and no wait, the consumer has
    /// read everything committed up to then.
    pub fn last_commit(&self) -> Offset {
        self.commit
    }

    /// Moves the subscription's cursor to `next` (everything before it is processed) and
    /// waits until a majority holds it (and every ack sent ahead has been answered).
    pub async fn ack(&mut self, next: Offset) -> Result<Offset, Error> {
        // This ack is cumulative: a held one at or below it is covered.
        let next = self.held_ack.take().map_or(next, |held| held.max(next));
        for pending in self.acks_in_flight.drain(..) {
            // Their outcome does not matter: this ack is cumulative and authoritative.
            let _ = pending.await;
        }
        let (topic, subscription) = (self.topic.clone(), self.subscription.clone());
        let session = Some(self.session.clone());
        self.leader_heard = Instant::now();
        match self
            .exchange(None, Duration::ZERO, move |_| Request::Ack {
                topic: topic.clone(),
                subscription: subscription.clone(),
                next,
                session: session.clone(),
            })
            .await?
        {
            Response::Cursor { cursor } => {
                self.acked_at = Instant::now();
                Ok(cursor)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Ends the consumer's stream (and drops a fetch sent ahead on it).
    pub fn close(&mut self) {
        self.ahead = None;
        if let Some(mut s) = self.stream.take() {
            s.finish();
        }
    }

    /// Lets go of the subscription, so another consumer can take it at once instead of after
    /// this one's session lease. Best effort: if the leader cannot be reached, the lease ends
    /// the session anyway.
    pub async fn release(mut self) {
        if let Some(next) = self.held_ack {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.ack(next)).await;
        }
        // A fetch ahead must not reach the leader after the release (it would take the
        // subscription again): its answer says it was served.
        self.collect_ahead().await;
        for ack in self.acks_in_flight.drain(..) {
            let _ = ack.await;
        }
        self.close();
        let req = Request::Release {
            topic: self.topic.clone(),
            subscription: self.subscription.clone(),
            session: self.session.id,
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.client.leader_call(&self.topic, &req)).await;
    }
}
