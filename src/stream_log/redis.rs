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
//! Memory in Redis per live answer: one entry per event (its text plus ~40 bytes of entry
//! overhead), so bounded by the bot's `max_tokens`; plus a small hash and the lease. The log is
//! kept [`KEEP_AFTER_CLOSE`] once the answer is stored, the hash a day.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::stream::BoxStream;
use redis::Script;
use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::memory::MemoryLog;
use super::{AnswerSignals, Claim, ClaimError, EventLog, LogError, Orphan, StopOutcome, codec};
use crate::events::StreamEvent;
use crate::shared::{ChatKeys, Redis};

/// How long an owner's lease lasts without renewal: an instance that dies leaves its answers
/// to be concluded this long after its last renewal (plus one sweep).
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// Renewal is also when a stop asked for elsewhere is noticed by an answer stalled upstream.
const RENEW_EVERY: Duration = Duration::from_millis(500);
/// Every this many renewals the sweep's index of live answers is told the lease goes on (it marks
/// the lease's end `LEASE_TTL` ahead, so 5 × 0.5 s leaves it well inside).
const MARK_EVERY_RENEWALS: u64 = 5;
/// A stored answer's log stays this long, for listeners still reading its end.
const KEEP_AFTER_CLOSE: Duration = Duration::from_secs(60);
/// A live answer's log and hash expire this long after their last write, whatever happens.
const LIVE_TTL: Duration = Duration::from_secs(6 * 3600);
/// Events one writer may have queued; the producer waits beyond that.
const QUEUE: usize = 1024;
/// Events sent in one script call at most.
const BATCH: usize = 256;
/// A follower's blocking read waits this long before it looks whether the answer still exists.
const BLOCK: Duration = Duration::from_secs(1);
/// A follower without a blocking connection of its own polls this often.
const POLL: Duration = Duration::from_millis(50);

/// `{fence}`, or `{-1}` busy, `{-2}` orphaned (live but its lease lapsed).
const CLAIM: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('HGET', KEYS[1], 'state') == 'live' then return -2 end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('SET', KEYS[2], fence, 'PX', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'claimed', 'stop', '0')
redis.call('HDEL', KEYS[1], 'message_id', 'first_id')
redis.call('DEL', KEYS[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return fence
";

const OPEN: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'state', 'live', 'message_id', ARGV[2], 'first_id', ARGV[3])
return 0
";

/// `0` written, `1` written and a stop is asked for, `-1` fenced. The log's expiry is set by the
/// batch that creates it (`ARGV[2]` > 0), not by every one: this script runs per burst of tokens.
const APPEND: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
for i = 3, #ARGV, 3 do
  redis.call('XADD', KEYS[3], ARGV[i] .. '-0', ARGV[i + 1], ARGV[i + 2])
end
if ARGV[2] ~= '0' then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
if redis.call('HGET', KEYS[1], 'stop') == '1' then return 1 end
return 0
";

const RENEW: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[1], 'stop') == '1' then return 1 end
return 0
";

/// Appends the terminal events given (if any), marks the answer done and drops the lease.
const CLOSE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
for i = 4, #ARGV, 3 do
  redis.call('XADD', KEYS[3], ARGV[i] .. '-0', ARGV[i + 1], ARGV[i + 2])
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'state', 'done')
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'state', 'done')
return 0
";

/// `0` nothing running, `1` asked to stop, `2` orphaned.
const STOP: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'live' and state ~= 'claimed' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then return 2 end
redis.call('HSET', KEYS[1], 'stop', '1')
return 1
";

/// `{fence, message_id, first_id}` when the lease lapsed on a live answer (now ours), else `{}`.
const TAKE_OVER: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return {} end
if redis.call('HGET', KEYS[1], 'state') ~= 'live' then return {} end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('SET', KEYS[2], fence, 'PX', ARGV[1])
return {tostring(fence), redis.call('HGET', KEYS[1], 'message_id'),
        redis.call('HGET', KEYS[1], 'first_id')}
";

struct Scripts {
    claim: Script,
    open: Script,
    append: Script,
    renew: Script,
    close: Script,
    release: Script,
    stop: Script,
    take_over: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            claim: Script::new(CLAIM),
            open: Script::new(OPEN),
            append: Script::new(APPEND),
            renew: Script::new(RENEW),
            close: Script::new(CLOSE),
            release: Script::new(RELEASE),
            stop: Script::new(STOP),
            take_over: Script::new(TAKE_OVER),
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn unavailable(e: redis::RedisError) -> LogError {
    LogError(e.to_string())
}

/// What the writer of an answer produced here is asked to do.
enum Command {
    Event(StreamEvent),
    /// Answer with the id of the last event delivered once everything before is sent.
    Flush(oneshot::Sender<Option<i64>>),
}

struct Writer {
    queue: mpsc::Sender<Command>,
    claim: Claim,
    signals: AnswerSignals,
}

impl Writer {
    /// Waits until everything queued before is written (or refused); the last id delivered.
    async fn flush(&self) -> Result<Option<i64>, LogError> {
        let stopped = || LogError("the answer's writer has stopped".into());
        let (reply, delivered) = oneshot::channel();
        self.queue
            .send(Command::Flush(reply))
            .await
            .map_err(|_| stopped())?;
        delivered.await.map_err(|_| stopped())
    }
}

pub struct RedisLog {
    redis: Redis,
    /// This process's listeners of the answers produced here: delivered events only.
    local: Arc<MemoryLog>,
    writers: Mutex<HashMap<String, Arc<Writer>>>,
    tasks: TaskTracker,
    scripts: Arc<Scripts>,
}

impl RedisLog {
    pub fn new(redis: Redis, tasks: TaskTracker) -> Self {
        Self {
            redis,
            local: Arc::default(),
            writers: Mutex::default(),
            tasks,
            scripts: Arc::default(),
        }
    }

    fn writer(&self, chat_id: &str) -> Option<Arc<Writer>> {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(chat_id)
            .cloned()
    }

    fn live_set(&self) -> String {
        self.redis.key("live")
    }

    /// Marks the chat's answer as live until `now + LEASE_TTL`, for the sweep.
    async fn mark_live(redis: &Redis, live_set: &str, chat_id: &str) {
        let until = now_ms() + millis(LEASE_TTL);
        let marked: Result<i64, _> = redis::cmd("ZADD")
            .arg(live_set)
            .arg(until)
            .arg(chat_id)
            .query_async(&mut redis.conn())
            .await;
        if let Err(e) = marked {
            tracing::debug!("could not mark a live answer for the sweep: {e}");
        }
    }

    async fn unmark_live(&self, chat_id: &str) {
        let removed: Result<i64, _> = redis::cmd("ZREM")
            .arg(self.live_set())
            .arg(chat_id)
            .query_async(&mut self.redis.conn())
            .await;
        if let Err(e) = removed {
            tracing::debug!("could not unmark a live answer: {e}");
        }
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
    ) -> Result<AnswerSignals, LogError> {
        let keys = self.redis.chat_keys(chat_id);
        let opened: i64 = self
            .scripts
            .open
            .key(&keys.answer)
            .key(&keys.lease)
            .arg(claim.fence)
            .arg(message_id)
            .arg(first_id)
            .invoke_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)?;
        if opened != 0 {
            return Err(LogError(
                "the claim was lost before the answer opened".into(),
            ));
        }
        Self::mark_live(&self.redis, &self.live_set(), chat_id).await;
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
        let task = WriterTask {
            redis: self.redis.clone(),
            scripts: self.scripts.clone(),
            local: self.local.clone(),
            live_set: self.live_set(),
            chat_id: chat_id.to_owned(),
            keys,
            claim,
            signals: signals.clone(),
            state: WriterState::Healthy,
            delivered: None,
            renewals: 0,
        };
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
        let keys = self.redis.chat_keys(chat_id);
        let closed: Result<i64, _> = self
            .scripts
            .close
            .key(&keys.answer)
            .key(&keys.lease)
            .key(&keys.log)
            .arg(writer.claim.fence)
            .arg(millis(KEEP_AFTER_CLOSE))
            .arg(millis(Duration::from_secs(86_400)))
            .invoke_async(&mut self.redis.conn())
            .await;
        self.unmark_live(chat_id).await;
        closed.map(|_| ()).map_err(unavailable)
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
        Ok(Some(remote_follower(self.redis.clone(), keys, after_id)))
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
        let keys = self.redis.chat_keys(chat_id);
        let mut invocation = self.scripts.close.prepare_invoke();
        invocation
            .key(&keys.answer)
            .key(&keys.lease)
            .key(&keys.log)
            .arg(claim.fence)
            .arg(millis(KEEP_AFTER_CLOSE))
            .arg(millis(Duration::from_secs(86_400)));
        if let Some(terminal) = &terminal {
            entry_args(std::slice::from_ref(terminal), &mut invocation);
        }
        let closed: i64 = invocation
            .invoke_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)?;
        self.unmark_live(chat_id).await;
        if closed != 0 {
            return Err(LogError("the answer was taken over again".into()));
        }
        Ok(())
    }

    async fn lapsed(&self) -> Result<Vec<String>, LogError> {
        redis::cmd("ZRANGEBYSCORE")
            .arg(self.live_set())
            .arg("-inf")
            .arg(now_ms())
            .arg("LIMIT")
            .arg(0)
            .arg(100)
            .query_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<(), LogError> {
        self.redis.ping().await.map_err(|e| LogError(e.0))
    }
}

fn decode_entry(entry: &redis::streams::StreamId) -> Option<StreamEvent> {
    let id: i64 = entry.id.split('-').next()?.parse().ok()?;
    let (field, value) = entry.map.iter().next()?;
    let redis::Value::BulkString(bytes) = value else {
        return None;
    };
    codec::decode(id, field, bytes)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterState {
    Healthy,
    /// The lease is someone else's: nothing more is written anywhere.
    Fenced,
    /// Redis failed: nothing more goes to it; this process's listeners still get their end.
    Unavailable,
}

struct WriterTask {
    redis: Redis,
    scripts: Arc<Scripts>,
    local: Arc<MemoryLog>,
    live_set: String,
    chat_id: String,
    keys: ChatKeys,
    claim: Claim,
    signals: AnswerSignals,
    state: WriterState,
    delivered: Option<i64>,
    renewals: u64,
}

impl WriterTask {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut renewal = tokio::time::interval(RENEW_EVERY);
        renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events = Vec::with_capacity(BATCH);
        let mut flushes = Vec::new();
        loop {
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(command) => sort(command, &mut events, &mut flushes),
                    None => return,
                },
                _ = renewal.tick() => {
                    self.renew().await;
                    continue;
                }
            }
            // Whatever queued up meanwhile goes in the same round trip.
            while events.len() < BATCH {
                match commands.try_recv() {
                    Ok(command) => sort(command, &mut events, &mut flushes),
                    Err(_) => break,
                }
            }
            if !events.is_empty() {
                self.write(&mut events).await;
            }
            for flush in flushes.drain(..) {
                let _ = flush.send(self.delivered);
            }
        }
    }

    async fn write(&mut self, events: &mut Vec<StreamEvent>) {
        match self.state {
            WriterState::Healthy => {}
            WriterState::Fenced => return events.clear(),
            WriterState::Unavailable => {
                // Nobody can be told more, but this process's listeners get their end.
                let terminal: Vec<_> = events.drain(..).filter(|e| e.kind.is_terminal()).collect();
                return self.local.push(&self.chat_id, terminal);
            }
        }
        let mut invocation = self.scripts.append.prepare_invoke();
        invocation
            .key(&self.keys.answer)
            .key(&self.keys.lease)
            .key(&self.keys.log)
            .arg(self.claim.fence)
            .arg(match self.delivered {
                None => millis(LIVE_TTL),
                Some(_) => 0,
            });
        entry_args(events, &mut invocation);
        let written: Result<i64, _> = invocation.invoke_async(&mut self.redis.conn()).await;
        match written {
            Ok(-1) => self.fenced(),
            Ok(outcome) => {
                self.delivered = events.last().map(|e| e.id).or(self.delivered);
                self.local.push(&self.chat_id, events.drain(..));
                if outcome == 1 {
                    self.signals.stop.cancel();
                }
            }
            Err(e) => {
                tracing::error!(chat_id = %self.chat_id, "SSE stream error: the shared log refused events: {e}");
                self.state = WriterState::Unavailable;
                let terminal: Vec<_> = events.drain(..).filter(|e| e.kind.is_terminal()).collect();
                self.local.push(&self.chat_id, terminal);
                // The producer stops at its next token and stores what was delivered.
                self.signals.failed.cancel();
            }
        }
        events.clear();
    }

    async fn renew(&mut self) {
        if self.state != WriterState::Healthy {
            return;
        }
        let renewed: Result<i64, _> = self
            .scripts
            .renew
            .key(&self.keys.answer)
            .key(&self.keys.lease)
            .arg(self.claim.fence)
            .arg(millis(LEASE_TTL))
            .invoke_async(&mut self.redis.conn())
            .await;
        match renewed {
            Ok(-1) => self.fenced(),
            Ok(1) => self.signals.stop.cancel(),
            Ok(_) => {
                // The sweep's index only needs to know roughly when the lease ends.
                self.renewals += 1;
                if self.renewals.is_multiple_of(MARK_EVERY_RENEWALS) {
                    RedisLog::mark_live(&self.redis, &self.live_set, &self.chat_id).await;
                }
            }
            // Transient: the lease lasts many renewals; if it lapses, the next write is fenced.
            Err(e) => {
                tracing::warn!(chat_id = %self.chat_id, "could not renew the answer's lease: {e}")
            }
        }
    }

    fn fenced(&mut self) {
        tracing::warn!(chat_id = %self.chat_id, "the answer was taken over by another instance; this producer stops");
        self.state = WriterState::Fenced;
        self.signals.lost.cancel();
        // This process's listeners end here and pick the answer up from the shared log.
        self.local.end(&self.chat_id);
    }
}

fn sort(
    command: Command,
    events: &mut Vec<StreamEvent>,
    flushes: &mut Vec<oneshot::Sender<Option<i64>>>,
) {
    match command {
        Command::Event(event) => events.push(event),
        Command::Flush(reply) => flushes.push(reply),
    }
}

/// An answer generated on another instance, read from its Redis Stream: blocking reads on a
/// connection of its own while one is free, else polling. Ends after the terminal event — or
/// without one if the answer stops being live (the caller then turns to storage).
fn remote_follower(redis: Redis, keys: ChatKeys, after_id: i64) -> BoxStream<'static, StreamEvent> {
    Box::pin(async_stream::stream! {
        let mut cursor = after_id;
        let mut reader = redis.blocking_connection(BLOCK).await.ok().flatten();
        let mut quiet_since = tokio::time::Instant::now();
        loop {
            let mut options = StreamReadOptions::default().count(BATCH);
            if reader.is_some() {
                options = options.block(millis(BLOCK) as usize);
            }
            let position = format!("{cursor}-0");
            let read: Result<Option<StreamReadReply>, _> = match &mut reader {
                Some((conn, _)) => redis::cmd("XREAD")
                    .arg(&options)
                    .arg("STREAMS")
                    .arg(&keys.log)
                    .arg(&position)
                    .query_async(conn)
                    .await,
                None => redis::cmd("XREAD")
                    .arg(&options)
                    .arg("STREAMS")
                    .arg(&keys.log)
                    .arg(&position)
                    .query_async(&mut redis.conn())
                    .await,
            };
            let Ok(read) = read else { return };
            let entries: Vec<_> = read
                .into_iter()
                .flat_map(|reply| reply.keys)
                .flat_map(|key| key.ids)
                .collect();
            for entry in &entries {
                let Some(event) = decode_entry(entry) else { continue };
                cursor = event.id;
                let terminal = event.kind.is_terminal();
                yield event;
                if terminal {
                    return;
                }
            }
            if !entries.is_empty() {
                quiet_since = tokio::time::Instant::now();
                continue;
            }
            if reader.is_none() {
                tokio::time::sleep(POLL).await;
            }
            if quiet_since.elapsed() >= BLOCK {
                quiet_since = tokio::time::Instant::now();
                let state: Option<String> = redis::cmd("HGET")
                    .arg(&keys.answer)
                    .arg("state")
                    .query_async(&mut redis.conn())
                    .await
                    .unwrap_or_default();
                if !matches!(state.as_deref(), Some("live" | "claimed")) {
                    return;
                }
            }
        }
    })
}
