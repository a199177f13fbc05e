//! The writer of one answer produced here: takes the producer's events from a bounded queue,
//! sends whatever queued up in one script call (the first one also opens the answer), and only
//! then hands them to this process's listeners, so a listener here never sees an event a
//! listener elsewhere could miss. It renews the answer's lease and notices a stop asked for on
//! another instance.
//!
//! Redis failing is expected, not fatal. A call that fails is sent again (the append script
//! recognises a batch it already holds) for up to [`WRITE_PATIENCE`]: a restart or a failover
//! costs a pause, not the answer. A Redis that comes back without the answer, or with its log
//! ending early, is written again from this process's copy of every delivered event.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::live_index::LiveIndex;
use super::scripts::Scripts;
use super::{BATCH, LEASE_TTL, LIVE_TTL, RedisLog, entry_args, millis};
use crate::events::StreamEvent;
use crate::shared::{ChatKeys, Redis};
use crate::stream_log::memory::MemoryLog;
use crate::stream_log::{AnswerSignals, Audience, Claim, LogError};

/// Renewal is also when a stop asked for elsewhere is noticed by an answer stalled upstream.
const RENEW_EVERY: Duration = Duration::from_millis(500);
/// Every this many renewals the sweep's index of live answers is told the lease goes on (it marks
/// the lease's end `LEASE_TTL` ahead, so 5 × 0.5 s leaves it well inside).
const MARK_EVERY_RENEWALS: u64 = 5;
/// How long a batch is offered to a Redis that does not answer before the answer is given up
/// (its listeners get a retryable error): longer than a restart or a replica's promotion takes.
pub(super) const WRITE_PATIENCE: Duration = Duration::from_secs(20);
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

/// What the writer of an answer produced here is asked to do.
pub(super) enum Command {
    Event(StreamEvent),
    /// Answer with the id of the last event delivered once everything before is sent.
    Flush(oneshot::Sender<Option<i64>>),
}

pub(super) struct Writer {
    pub queue: mpsc::Sender<Command>,
    pub claim: Claim,
    pub signals: AnswerSignals,
}

impl Writer {
    /// Waits until everything queued before is written (or refused); the last id delivered.
    pub async fn flush(&self) -> Result<Option<i64>, LogError> {
        let stopped = || LogError("the answer's writer has stopped".into());
        let (reply, delivered) = oneshot::channel();
        self.queue
            .send(Command::Flush(reply))
            .await
            .map_err(|_| stopped())?;
        delivered.await.map_err(|_| stopped())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterState {
    Healthy,
    /// The lease is someone else's: nothing more is written anywhere.
    Fenced,
    /// Redis failed for longer than [`WRITE_PATIENCE`]: nothing more goes to it; this process's
    /// listeners still get their end.
    Unavailable,
}

/// What a script said about the answer's place in Redis.
enum Verdict {
    Written {
        stop: bool,
    },
    Fenced,
    /// Redis lost the answer, or part of its log: write it again.
    Lost,
}

fn verdict(code: i64) -> Verdict {
    match code {
        -1 => Verdict::Fenced,
        -2 | -3 => Verdict::Lost,
        code => Verdict::Written {
            stop: code % 2 == 1,
        },
    }
}

pub(super) struct WriterTask {
    pub redis: Redis,
    pub scripts: Arc<Scripts>,
    pub local: Arc<MemoryLog>,
    pub live: LiveIndex,
    pub chat_id: String,
    pub message_id: String,
    pub first_id: i64,
    pub keys: ChatKeys,
    pub claim: Claim,
    pub signals: AnswerSignals,
    /// Told how many listeners other instances have (the disconnect policy counts them too).
    audience: Arc<Audience>,
    state: WriterState,
    /// The id of the last event Redis acknowledged: where its log should end.
    delivered: Option<i64>,
    renewals: u64,
}

impl WriterTask {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        log: &RedisLog,
        chat_id: &str,
        message_id: &str,
        first_id: i64,
        keys: ChatKeys,
        claim: Claim,
        signals: AnswerSignals,
        audience: Arc<Audience>,
    ) -> Self {
        Self {
            redis: log.redis.clone(),
            scripts: log.scripts.clone(),
            local: log.local.clone(),
            live: log.live.clone(),
            chat_id: chat_id.to_owned(),
            message_id: message_id.to_owned(),
            first_id,
            keys,
            claim,
            signals,
            audience,
            state: WriterState::Healthy,
            delivered: None,
            renewals: 0,
        }
    }

    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
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

    fn expected_top(&self) -> i64 {
        self.delivered.unwrap_or(0)
    }

    async fn write(&mut self, events: &mut Vec<StreamEvent>) {
        match self.state {
            WriterState::Healthy => {}
            WriterState::Fenced => return events.clear(),
            WriterState::Unavailable => return self.deliver_terminal_only(events),
        }
        let mut failing_since = None;
        let mut backoff = RETRY_BACKOFF.0;
        loop {
            let sent = match self.delivered {
                // The sweep's index learns of the answer in the same moment its log begins, not
                // one round trip before the asker's first event.
                None => {
                    let (sent, ()) = tokio::join!(
                        self.append(events, self.expected_top()),
                        self.live.mark(&self.chat_id)
                    );
                    sent
                }
                Some(top) => self.append(events, top).await,
            };
            let error = match sent {
                Ok(Verdict::Written { stop }) => {
                    self.delivered = events.last().map(|e| e.id).or(self.delivered);
                    self.local.push(&self.chat_id, events.drain(..));
                    if stop {
                        self.signals.stop.cancel();
                    }
                    return;
                }
                Ok(Verdict::Fenced) => return self.fenced(events),
                Ok(Verdict::Lost) => match self.reseed().await {
                    Ok(true) => continue,
                    Ok(false) => return self.fenced(events),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() + backoff >= WRITE_PATIENCE {
                tracing::error!(chat_id = %self.chat_id, "SSE stream error: the shared log refused events: {error}");
                self.state = WriterState::Unavailable;
                self.deliver_terminal_only(events);
                // The producer stops at its next token and stores what was delivered.
                self.signals.failed.cancel();
                return;
            }
            tracing::warn!(chat_id = %self.chat_id, "the shared log refused events, sending them again: {error}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_BACKOFF.1);
        }
    }

    /// Nobody can be told more, but this process's listeners get their end.
    fn deliver_terminal_only(&self, events: &mut Vec<StreamEvent>) {
        let terminal: Vec<_> = events.drain(..).filter(|e| e.kind.is_terminal()).collect();
        self.local.push(&self.chat_id, terminal);
    }

    async fn append(
        &self,
        events: &[StreamEvent],
        expected_top: i64,
    ) -> Result<Verdict, redis::RedisError> {
        let mut invocation = self.scripts.append.prepare_invoke();
        invocation
            .key(&self.keys.answer)
            .key(&self.keys.lease)
            .key(&self.keys.log)
            .arg(self.claim.fence)
            .arg(match expected_top {
                0 => millis(LIVE_TTL),
                _ => 0,
            })
            .arg(&self.message_id)
            .arg(expected_top)
            // The first batch opens the answer; RESEED opens one Redis lost.
            .arg(match expected_top {
                0 => self.first_id,
                _ => 0,
            });
        entry_args(events, &mut invocation);
        let code: i64 = invocation.invoke_async(&mut self.redis.conn()).await?;
        Ok(verdict(code))
    }

    /// Writes the answer into Redis again — its hash, its lease and every event delivered so far,
    /// with the ids they had — after Redis lost it. `false`: fenced meanwhile.
    async fn reseed(&mut self) -> Result<bool, redis::RedisError> {
        tracing::warn!(chat_id = %self.chat_id, "redis lost this answer's log; writing it again");
        let delivered = self.local.events(&self.chat_id);
        let mut batches = delivered.chunks(BATCH);
        let first = batches.next().unwrap_or_default();
        let mut invocation = self.scripts.reseed.prepare_invoke();
        invocation
            .key(&self.keys.answer)
            .key(&self.keys.lease)
            .key(&self.keys.log)
            .arg(self.claim.fence)
            .arg(millis(LEASE_TTL))
            .arg(millis(LIVE_TTL))
            .arg(&self.message_id)
            .arg(self.first_id);
        entry_args(first, &mut invocation);
        let code: i64 = invocation.invoke_async(&mut self.redis.conn()).await?;
        if code == -1 {
            return Ok(false);
        }
        let mut top = first.last().map_or(0, |e| e.id);
        for batch in batches {
            match self.append(batch, top).await? {
                Verdict::Written { .. } => top = batch.last().map_or(top, |e| e.id),
                Verdict::Fenced => return Ok(false),
                // Lost again while writing it: the caller's next try starts over.
                Verdict::Lost => return Ok(true),
            }
        }
        self.delivered = delivered.last().map(|e| e.id);
        self.live.mark(&self.chat_id).await;
        Ok(true)
    }

    async fn renew(&mut self) {
        if self.state != WriterState::Healthy {
            return;
        }
        let mut invocation = self.scripts.renew.prepare_invoke();
        invocation
            .key(&self.keys.answer)
            .key(&self.keys.lease)
            .key(&self.keys.log)
            .key(&self.keys.listeners)
            .arg(self.claim.fence)
            .arg(millis(LEASE_TTL))
            .arg(&self.message_id)
            .arg(self.expected_top());
        let renewed: Result<(i64, usize), _> =
            invocation.invoke_async(&mut self.redis.conn()).await;
        if let Ok((_, listeners)) = renewed {
            self.audience.hear_remote(listeners);
        }
        match renewed.map(|(code, _)| verdict(code)) {
            Ok(Verdict::Fenced) => self.fenced(&mut Vec::new()),
            Ok(Verdict::Lost) => {
                if let Ok(false) = self.reseed().await {
                    self.fenced(&mut Vec::new());
                }
            }
            Ok(Verdict::Written { stop: true }) => self.signals.stop.cancel(),
            Ok(Verdict::Written { stop: false }) => {
                // The sweep's index only needs to know roughly when the lease ends.
                self.renewals += 1;
                if self.renewals.is_multiple_of(MARK_EVERY_RENEWALS) {
                    self.live.mark(&self.chat_id).await;
                }
            }
            // Transient: the lease lasts many renewals; if it lapses, the next write is fenced.
            Err(e) => {
                tracing::warn!(chat_id = %self.chat_id, "could not renew the answer's lease: {e}")
            }
        }
    }

    fn fenced(&mut self, events: &mut Vec<StreamEvent>) {
        tracing::warn!(chat_id = %self.chat_id, "the answer was taken over by another instance; this producer stops");
        events.clear();
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
