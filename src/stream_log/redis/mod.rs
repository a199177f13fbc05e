//! The shared stream log: each live answer's events in a Redis Stream (entry id `<event id>-0`,
//! so `Last-Event-ID` is a stream position), next to a hash that says who owns the answer and a
//! lease the owner renews. Any instance can follow, stop, or — once the owner's lease lapses —
//! take over and conclude an answer.
//!
//! The producer never waits on Redis per token. Its events go into a bounded queue; one writer
//! task per answer sends whatever has queued up in one script call (one round trip for a burst of
//! tokens), and only then hands them to this process's own listeners through an in-memory log —
//! so a listener here never sees an event that a listener elsewhere could miss. The same task
//! renews the lease and notices a stop asked for on another instance.
//!
//! Fencing: every write is a script that first checks the lease still holds the writer's fence.
//! A producer that was paused past its lease (and taken over) finds its writes refused and stops;
//! it cannot add to the log, and `ChatStore::finish_turn` refuses an answer already concluded.
//!
//! Redis losing data (a restart without persistence, a failover to a replica that missed the
//! last writes, a flush) is detected by the same scripts and repaired by the producer from its
//! own copy ([`scripts`], [`writer`]); followers elsewhere wait it out, never read past a hole,
//! and end with a retryable error at their last id if the answer does not come back
//! ([`follower`]).
//!
//! Memory in Redis per live answer: one entry per event (its text plus ~40 bytes of entry
//! overhead), so bounded by the bot's `max_tokens`; plus a small hash and the lease. Once the
//! answer is stored its log and hash stay `redis.keep_ended_secs` (60 s by default, for listeners
//! reading its end), and a deleted chat's keys go at once: Redis holds what live and recently
//! ended answers need, not a key per chat ever made.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod follower;
mod live_index;
mod scripts;
mod writer;

use futures_util::stream::BoxStream;
use redis::streams::StreamRangeReply;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use follower::{decode_entry, remote_follower};
use live_index::LiveIndex;
use scripts::Scripts;
use writer::{Command, Writer, WriterTask};

use super::memory::MemoryLog;
use super::{
    AnswerSignals, Audience, Claim, ClaimError, EventLog, LogError, Orphan, StopOutcome, codec,
};
use crate::events::StreamEvent;
use crate::shared::Redis;

/// How long an owner's lease lasts without renewal: an instance that dies leaves its answers
/// to be concluded this long after its last renewal (plus one sweep).
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// A live answer's log and hash expire this long after their last write, whatever happens.
const LIVE_TTL: Duration = Duration::from_secs(6 * 3600);
/// Events one writer may have queued; the producer waits beyond that.
const QUEUE: usize = 1024;
/// Events sent in one script call at most.
const BATCH: usize = 256;

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn unavailable(e: redis::RedisError) -> LogError {
    LogError(e.to_string())
}
pub struct RedisLog {
    redis: Redis,
    /// This process's listeners of the answers produced here: delivered events only.
    local: Arc<MemoryLog>,
    writers: Mutex<HashMap<String, Arc<Writer>>>,
    tasks: TaskTracker,
    scripts: Arc<Scripts>,
    live: LiveIndex,
    /// How long an ended answer's keys stay, for listeners still reading its end
    /// (`redis.keep_ended_secs`).
    keep_ended: Duration,
}

impl RedisLog {
    pub fn new(redis: Redis, tasks: TaskTracker, keep_ended: Duration) -> Self {
        Self {
            live: LiveIndex::new(redis.clone()),
            redis,
            local: Arc::default(),
            writers: Mutex::default(),
            tasks,
            scripts: Arc::default(),
            keep_ended,
        }
    }

    fn writer(&self, chat_id: &str) -> Option<Arc<Writer>> {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(chat_id)
            .cloned()
    }

    /// Runs [`scripts`]' CLOSE for the holder of `claim` (appending `terminal`, if any) and takes
    /// the chat out of the sweep's index; CLOSE's code: `0` closed, `-1` no longer the owner.
    async fn close_answer(
        &self,
        chat_id: &str,
        claim: Claim,
        terminal: Option<&StreamEvent>,
    ) -> Result<i64, LogError> {
        let keys = self.redis.chat_keys(chat_id);
        let mut invocation = self.scripts.close.prepare_invoke();
        invocation
            .key(&keys.answer)
            .key(&keys.lease)
            .key(&keys.log)
            .arg(claim.fence)
            .arg(millis(self.keep_ended));
        if let Some(terminal) = terminal {
            entry_args(std::slice::from_ref(terminal), &mut invocation);
        }
        let closed = invocation.invoke_async(&mut self.redis.conn()).await;
        self.live.unmark(chat_id).await;
        closed.map_err(unavailable)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The `(id, field, value)` triples of events, as the scripts take them.
fn entry_args(events: &[StreamEvent], invocation: &mut redis::ScriptInvocation<'_>) {
    for event in events {
        let (field, value) = codec::encode(&event.kind);
        invocation.arg(event.id).arg(field).arg(value);
    }
}

#[async_trait::async_trait]
impl EventLog for RedisLog {
    async fn claim(&self, chat_id: &str) -> Result<Claim, ClaimError> {
        let keys = self.redis.chat_keys(chat_id);
        let fence: i64 = self
            .scripts
            .claim
            .key(&keys.answer)
            .key(&keys.lease)
            .key(&keys.log)
            .arg(millis(LEASE_TTL))
            .arg(millis(LIVE_TTL))
            .invoke_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)?;
        match fence {
            -1 => Err(ClaimError::Busy),
            -2 => Err(ClaimError::Orphaned),
            fence => Ok(Claim {
                fence: fence as u64,
            }),
        }
    }

    async fn release(&self, chat_id: &str, claim: Claim) {
        let keys = self.redis.chat_keys(chat_id);
        let released: Result<i64, _> = self
            .scripts
            .release
            .key(&keys.answer)
            .key(&keys.lease)
            .arg(claim.fence)
            .invoke_async(&mut self.redis.conn())
            .await;
        if let Err(e) = released {
            tracing::warn!(
                chat_id,
                "could not release a claim (its lease expires by itself): {e}"
            );
        }
    }

    async fn open(
        &self,
        chat_id: &str,
        claim: Claim,
        message_id: &str,
        first_id: i64,
        audience: &Arc<Audience>,
    ) -> Result<AnswerSignals, LogError> {
        // Opened by the writer's first batch, in the same call that logs the first event.
        let keys = self.redis.chat_keys(chat_id);
        self.local.start(chat_id);
        let signals = AnswerSignals::default();
        let (queue, commands) = mpsc::channel(QUEUE);
        let writer = Arc::new(Writer {
            queue,
            claim,
            signals: signals.clone(),
        });
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(chat_id.to_owned(), writer);
        let task = WriterTask::new(
            self,
            chat_id,
            message_id,
            first_id,
            keys,
            claim,
            signals.clone(),
            audience.clone(),
        );
        self.tasks.spawn(task.run(commands));
        Ok(signals)
    }

    async fn append(&self, chat_id: &str, event: StreamEvent) -> Result<(), LogError> {
        let writer = self
            .writer(chat_id)
            .ok_or_else(|| LogError("no answer of this chat is produced here".into()))?;
        writer
            .queue
            .send(Command::Event(event))
            .await
            .map_err(|_| LogError("the answer's writer has stopped".into()))
    }

    async fn flush(&self, chat_id: &str) -> Result<Option<i64>, LogError> {
        let writer = self
            .writer(chat_id)
            .ok_or_else(|| LogError("no answer of this chat is produced here".into()))?;
        writer.flush().await
    }

    async fn close(&self, chat_id: &str) -> Result<(), LogError> {
        let Some(writer) = self.writer(chat_id) else {
            return Ok(());
        };
        // Everything appended (the terminal event last) is written before the answer closes.
        let flushed = writer.flush().await;
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(chat_id);
        self.local.end(chat_id);
        flushed?;
        if writer.signals.lost.is_cancelled() {
            return Ok(()); // taken over: the new owner closes it
        }
        self.close_answer(chat_id, writer.claim, None)
            .await
            .map(|_| ())
    }

    async fn follow(
        &self,
        chat_id: &str,
        after_id: i64,
    ) -> Result<Option<BoxStream<'static, StreamEvent>>, LogError> {
        if let Some(events) = self.local.follower(chat_id, after_id) {
            return Ok(Some(events));
        }
        let keys = self.redis.chat_keys(chat_id);
        let state: Option<String> = redis::cmd("HGET")
            .arg(&keys.answer)
            .arg("state")
            .query_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)?;
        if !matches!(state.as_deref(), Some("live" | "claimed")) {
            return Ok(None);
        }
        Ok(Some(remote_follower(
            self.redis.clone(),
            self.scripts.clone(),
            keys,
            after_id,
        )))
    }

    async fn request_stop(&self, chat_id: &str) -> Result<StopOutcome, LogError> {
        let keys = self.redis.chat_keys(chat_id);
        let found: i64 = self
            .scripts
            .stop
            .key(&keys.answer)
            .key(&keys.lease)
            .invoke_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)?;
        Ok(match found {
            1 => StopOutcome::Stopping,
            2 => StopOutcome::Orphaned,
            _ => StopOutcome::NotRunning,
        })
    }

    async fn take_over(&self, chat_id: &str) -> Result<Option<Orphan>, LogError> {
        // This process's own producer is alive (if its lease lapsed in an outage, it takes the
        // lease up again on its next write), and right after an outage nobody is known dead.
        let produced_here = self
            .writer(chat_id)
            .is_some_and(|w| !w.signals.lost.is_cancelled());
        if produced_here || !self.redis.steady_for(LEASE_TTL) {
            return Ok(None);
        }
        let keys = self.redis.chat_keys(chat_id);
        let taken: Vec<String> = self
            .scripts
            .take_over
            .key(&keys.answer)
            .key(&keys.lease)
            .arg(millis(LEASE_TTL))
            .invoke_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)?;
        let [fence, message_id, first_id] = taken.as_slice() else {
            return Ok(None);
        };
        let parse = |text: &str| text.parse::<i64>().map_err(|e| LogError(e.to_string()));
        let range: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&keys.log)
            .arg("-")
            .arg("+")
            .query_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)?;
        let events = range.ids.iter().filter_map(decode_entry).collect();
        Ok(Some(Orphan {
            claim: Claim {
                fence: parse(fence)? as u64,
            },
            message_id: message_id.clone(),
            first_id: parse(first_id)?,
            events,
        }))
    }

    async fn conclude(
        &self,
        chat_id: &str,
        claim: Claim,
        terminal: Option<StreamEvent>,
    ) -> Result<(), LogError> {
        let closed = self.close_answer(chat_id, claim, terminal.as_ref()).await?;
        if closed != 0 {
            return Err(LogError("the answer was taken over again".into()));
        }
        Ok(())
    }

    async fn lapsed(&self) -> Result<Vec<String>, LogError> {
        self.live.lapsed().await
    }

    async fn forget(&self, chat_id: &str) -> Result<(), LogError> {
        let keys = self.redis.chat_keys(chat_id);
        let _: i64 = self
            .scripts
            .forget
            .key(&keys.answer)
            .key(&keys.lease)
            .key(&keys.log)
            .key(&keys.listeners)
            .arg(millis(self.keep_ended))
            .invoke_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)?;
        self.live.unmark(chat_id).await;
        Ok(())
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<(), LogError> {
        self.redis.ping().await.map_err(|e| LogError(e.0))
    }
}
