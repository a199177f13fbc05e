//! Following an answer generated on another instance, from its Redis Stream: blocking reads on
//! a connection of its own while one of the capped places is free, else polling.
//!
//! Redis failing under a follower is waited out for [`TROUBLE_GRACE`]: a read that fails
//! reconnects and reads again from the last id delivered (never `$`), and an answer whose hash is
//! gone (Redis restarted empty) is given time for its producer to write it again. A follower
//! never yields past a hole: an event whose id does not follow the last one is not sent, the
//! log is read again from the last id, and if the hole stays the stream ends without a terminal
//! (the caller then ends it with a retryable error at that id, or from storage).
//!
//! While it reads, a follower keeps a presence in the answer's listener set, renewed every
//! [`PRESENCE_EVERY`] and expiring [`PRESENCE_TTL`] after the last renewal (so a follower whose
//! client is gone stops counting by itself): the producer, on another instance, counts these
//! listeners too before it cancels an answer nobody hears.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::BoxStream;
use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::scripts::Scripts;
use super::writer::WRITE_PATIENCE;
use super::{BATCH, millis};
use crate::events::StreamEvent;
use crate::shared::{ChatKeys, Link, Redis};
use crate::stream_log::codec;

/// A follower's blocking read waits this long before it looks whether the answer still exists.
const BLOCK: Duration = Duration::from_secs(1);
/// A follower without a blocking connection of its own polls this often; also the pause
/// before reading again after a failure.
const POLL: Duration = Duration::from_millis(50);
/// How long a follower waits out Redis failing or having lost the answer: as long as the
/// producer offers its events to Redis, and a little more for it to write them again.
const TROUBLE_GRACE: Duration = WRITE_PATIENCE.saturating_add(Duration::from_secs(5));
const PRESENCE_EVERY: Duration = Duration::from_secs(1);
const PRESENCE_TTL: Duration = Duration::from_secs(3);
/// The listener set outlives its last presence by this much (it is tiny).
const PRESENCE_SET_TTL: Duration = Duration::from_secs(60);

pub(super) fn decode_entry(entry: &redis::streams::StreamId) -> Option<StreamEvent> {
    let id: i64 = entry.id.split('-').next()?.parse().ok()?;
    let (field, value) = entry.map.iter().next()?;
    let redis::Value::BulkString(bytes) = value else {
        return None;
    };
    codec::decode(id, field, bytes)
}

/// What one read found.
enum Read {
    Events(Vec<StreamEvent>),
    Quiet,
    Failed,
}

struct Follower {
    redis: Redis,
    scripts: Arc<Scripts>,
    keys: ChatKeys,
    /// This follower's member in the answer's listener set.
    presence_id: String,
    presence_due: Instant,
    reader: Option<(Link, OwnedSemaphorePermit)>,
    cursor: i64,
    /// Whether an event was delivered: from then on each must follow the one before.
    delivered_any: bool,
    /// Since when reads fail, the answer is unknown to Redis, or the log has a hole.
    trouble_since: Option<Instant>,
}

impl Follower {
    /// Renews this follower's presence when it is due; a failure only means it may lapse.
    async fn announce(&mut self) {
        if Instant::now() < self.presence_due {
            return;
        }
        self.presence_due = Instant::now() + PRESENCE_EVERY;
        let announced: Result<i64, _> = self
            .scripts
            .present
            .key(&self.keys.listeners)
            .arg(millis(PRESENCE_TTL))
            .arg(&self.presence_id)
            .arg(millis(PRESENCE_SET_TTL))
            .invoke_async(&mut self.redis.conn())
            .await;
        if let Err(e) = announced {
            tracing::debug!("could not renew a listener's presence: {e}");
        }
    }

    async fn read(&mut self) -> Read {
        let mut options = StreamReadOptions::default().count(BATCH);
        if self.reader.is_some() {
            options = options.block(millis(BLOCK) as usize);
        }
        let position = format!("{}-0", self.cursor);
        let mut command = redis::cmd("XREAD");
        command
            .arg(&options)
            .arg("STREAMS")
            .arg(&self.keys.log)
            .arg(&position);
        let read: Result<Option<StreamReadReply>, _> = match &mut self.reader {
            Some((conn, _)) => command.query_async(conn).await,
            None => command.query_async(&mut self.redis.conn()).await,
        };
        let Ok(read) = read else {
            // A blocking connection never reconnects by itself: a new one for the next read.
            self.reader = None;
            return Read::Failed;
        };
        let events: Vec<StreamEvent> = read
            .into_iter()
            .flat_map(|reply| reply.keys)
            .flat_map(|key| key.ids)
            .filter_map(|entry| decode_entry(&entry))
            .collect();
        match events.is_empty() {
            true => Read::Quiet,
            false => Read::Events(events),
        }
    }

    /// Whether the answer is still being generated; `None` when Redis cannot say.
    async fn still_live(&self) -> Option<bool> {
        let state: Option<String> = redis::cmd("HGET")
            .arg(&self.keys.answer)
            .arg("state")
            .query_async(&mut self.redis.conn())
            .await
            .ok()?;
        match state.as_deref() {
            Some("live" | "claimed") => Some(true),
            // The hash is gone: Redis lost it, and its producer may write it again.
            None => None,
            Some(_) => Some(false),
        }
    }

    /// Marks trouble; `false` once it has lasted longer than the grace.
    async fn bear_trouble(&mut self) -> bool {
        let since = *self.trouble_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= TROUBLE_GRACE {
            return false;
        }
        tokio::time::sleep(POLL).await;
        if self.reader.is_none() {
            self.reader = self.redis.blocking_connection(BLOCK).await.ok().flatten();
        }
        true
    }
}

/// Ends after the terminal event — or without one if the answer stops being live or Redis
/// cannot give it for longer than the grace.
pub(super) fn remote_follower(
    redis: Redis,
    scripts: Arc<Scripts>,
    keys: ChatKeys,
    after_id: i64,
) -> BoxStream<'static, StreamEvent> {
    Box::pin(async_stream::stream! {
        let reader = redis.blocking_connection(BLOCK).await.ok().flatten();
        let mut follower = Follower {
            redis,
            scripts,
            keys,
            presence_id: uuid::Uuid::new_v4().simple().to_string(),
            presence_due: Instant::now(),
            reader,
            cursor: after_id,
            delivered_any: false,
            trouble_since: None,
        };
        let mut quiet_since = Instant::now();
        loop {
            follower.announce().await;
            let events = match follower.read().await {
                Read::Events(events) => events,
                Read::Failed => {
                    if follower.bear_trouble().await {
                        continue;
                    }
                    return;
                }
                Read::Quiet => {
                    if follower.reader.is_none() {
                        tokio::time::sleep(POLL).await;
                    }
                    if quiet_since.elapsed() >= BLOCK || follower.trouble_since.is_some() {
                        quiet_since = Instant::now();
                        match follower.still_live().await {
                            Some(true) => follower.trouble_since = None,
                            Some(false) => return,
                            None => {
                                if !follower.bear_trouble().await {
                                    return;
                                }
                            }
                        }
                    }
                    continue;
                }
            };
            quiet_since = Instant::now();
            let mut hole = false;
            for event in events {
                if follower.delivered_any && event.id != follower.cursor + 1 {
                    // A hole (the log was lost and is being written again): read from the
                    // cursor once more rather than skip it.
                    hole = true;
                    break;
                }
                follower.trouble_since = None;
                follower.delivered_any = true;
                follower.cursor = event.id;
                let terminal = event.kind.is_terminal();
                yield event;
                if terminal {
                    return;
                }
            }
            if hole && !follower.bear_trouble().await {
                return;
            }
        }
    })
}
