//! The reader: reads a topic from an offset without a subscription, like `kcat -o` or
//! `nats stream view`. It holds nothing and acknowledges nothing, so it keeps no record
//! alive: records are still deleted once every subscription has read them, and a reader
//! that falls behind the log start is told how many it missed and goes on from there.

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::consumer::room_for;
use super::{unexpected, Backoff, Client, FETCH_BYTES, POLL_GRACE};
use crate::error::Error;
use crate::types::{Offset, StoredRecord, TopicName};
use crate::wire::{Request, Response};

/// Reads a topic from an offset, through no subscription.
pub struct Reader {
    client: Arc<Client>,
    topic: TopicName,
    /// The next offset to read.
    position: Offset,
    /// The highest commit offset an answer showed: a newer leader may not know it yet for a
    /// moment after a failover, which is worth waiting for, while an offset past anything
    /// ever committed is the caller's mistake.
    commit: Offset,
    /// `max_bytes` of the next read: [`FETCH_BYTES`], raised to the size of a larger record
    /// when the server says one does not fit.
    fetch_bytes: u32,
    /// Records deleted before this reader got to them, since the caller last asked.
    skipped: Option<Skipped>,
}

/// Records deleted before a [`Reader`] read them (every subscription had read them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    /// The first offset missed.
    pub from: Offset,
    /// Where the reader went on: the log start when it looked.
    pub resume_at: Offset,
}

/// Where the records of a time start, and the log's bounds then (see [`Client::locate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// The first committed offset stamped at or after the time (`commit` if none is yet).
    pub offset: Offset,
    /// The oldest offset still stored.
    pub log_start: Offset,
    /// One past the newest committed offset.
    pub commit: Offset,
}

impl Client {
    /// A reader of `topic` from offset `from` (see [`Reader`]), an offset the caller saw
    /// committed (or the end): a leader elected meanwhile that has not caught up to it yet is
    /// waited for, while an offset past the end stays an [`Error::OffsetBeyondEnd`].
    pub fn reader(self: &Arc<Self>, topic: TopicName, from: Offset) -> Reader {
        Reader {
            client: self.clone(),
            topic,
            position: from,
            commit: from,
            fetch_bytes: FETCH_BYTES,
            skipped: None,
        }
    }

    /// The first committed offset of `topic` whose record was stamped at or after `time_ms`
    /// (ms since the Unix epoch; a record's stamp is its leader's clock when it appended it).
    pub async fn locate(&self, topic: &TopicName, time_ms: u64) -> Result<Located, Error> {
        match self.leader_call(topic, &Request::Locate { topic: topic.clone(), time_ms }).await? {
            Response::Located { offset, log_start, commit } => Ok(Located { offset, log_start, commit }),
            other => Err(unexpected(other)),
        }
    }
}

impl Reader {
    /// The next offset this reader will read.
    pub fn position(&self) -> Offset {
        self.position
    }

    /// The highest commit offset the reads so far showed.
    pub fn last_commit(&self) -> Offset {
        self.commit
    }

    /// Records deleted before this reader read them, since the last call.
    pub fn take_skipped(&mut self) -> Option<Skipped> {
        self.skipped.take()
    }

    /// Reads the next committed records (up to `max_records`), waiting up to `wait` for the
    /// first, at the topic's leader (looked up again when it fails or moves).
    pub async fn poll(&mut self, max_records: u32, wait: Duration) -> Result<Vec<StoredRecord>, Error> {
        let mut backoff = Backoff::new(self.client.retry_deadline);
        loop {
            let req = Request::Read {
                topic: self.topic.clone(),
                from: self.position,
                max_records,
                max_bytes: self.fetch_bytes,
                max_wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            };
            match self.call(&req, wait + POLL_GRACE).await {
                Ok(Response::Records { records, commit, .. }) => {
                    self.commit = self.commit.max(commit);
                    let records = records.decode()?;
                    if let Some(last) = records.last() {
                        self.position = last.offset + 1;
                    }
                    return Ok(records);
                }
                Ok(Response::Error(e)) | Err(e) => match e {
                    // Deleted before we got there: say so, and go on from the log start.
                    Error::CursorBeforeLogStart { log_start, .. } if log_start > self.position => {
                        self.skipped = Some(Skipped {
                            from: self.skipped.map_or(self.position, |s| s.from),
                            resume_at: log_start,
                        });
                        self.position = log_start;
                    }
                    Error::FetchTooSmall { size, .. } if room_for(size, self.fetch_bytes) => {
                        self.fetch_bytes = size as u32;
                    }
                    // A new leader whose commit point has not caught up with what an answer
                    // already showed committed: it does within a round trip to its followers.
                    e if e.is_retriable()
                        || matches!(e, Error::OffsetBeyondEnd { .. }) && self.position <= self.commit =>
                    {
                        self.client.suspect(&self.topic);
                        debug!(topic = %self.topic, error = %e, "reader retrying");
                        if !backoff.wait().await {
                            return Err(e);
                        }
                    }
                    e => return Err(e),
                },
                Ok(other) => return Err(unexpected(other)),
            }
        }
    }

    /// One attempt at the leader, given up after `limit`; a server that does not answer is
    /// forgotten, so the next attempt connects afresh (a dead one sends nothing).
    async fn call(&self, req: &Request, limit: Duration) -> Result<Response, Error> {
        let conn = self.client.leader(&self.topic).await?;
        let answer = tokio::time::timeout(limit, conn.call(req)).await.unwrap_or_else(|_| {
            Err(Error::Unavailable {
                detail: format!("no answer from the leader of {} in {limit:?}", self.topic),
            })
        });
        if matches!(answer, Err(Error::Unavailable { .. })) {
            self.client.forget_server(conn.addr()).await;
        }
        answer
    }
}
