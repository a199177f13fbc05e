//! The producer of one answer: calls the bot's targets in order until one starts answering,
//! appends each event to the stream log the moment it arrives (every listener reads from there),
//! and stores the outcome whatever happens to the clients.
//!
//! It runs as a tracked task, not inside an HTTP response: it outlives any one connection (a
//! client may reconnect; under the "continue" policy nobody may be listening at all), and its last
//! duty, storing the answer, must happen exactly when the listeners are gone.
//!
//! Fallback rule: a target that fails before its first token (refused, throttled, 5xx, no first
//! token in time) is skipped for the next. Once a token has streamed there is no switch: a
//! failure is an `error` event, so the client never sees text twice.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::StreamTimeouts;
use super::control::{StopCause, TurnControl};
use crate::domain::TokenUsage;
use crate::events::{DoneEvent, EventKind, StreamEvent, StreamFailure};
use crate::metrics::{
    BotTokenLabels, Metrics, OutcomeLabels, TokenLabels, UpstreamErrorLabels, UpstreamLabels,
};
use crate::providers::{
    Admission, ModelRequest, ProviderError, ProviderErrorKind, ProviderEvent, ProviderStream,
    Target,
};
use crate::store::{ChatStore, FinishedTurn, MessageStatus, TurnMeasures};
use crate::stream_log::{AnswerSignals, Audience, EventLog};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

pub(super) struct Turn {
    pub chat_id: String,
    /// Whose answer it is (a provider may give each user a bounded share).
    pub user_id: String,
    pub bot_id: String,
    pub assistant_message_id: String,
    pub last_event_id: i64,
    pub targets: Vec<Target>,
    /// The first target to try, and the place it already granted.
    pub start: usize,
    pub admission: Admission,
    /// The conversation; `model` is filled in per target.
    pub request: ModelRequest,
    /// The answer ends before the first of these.
    pub stops: Vec<String>,
    pub timeouts: StreamTimeouts,
    pub store: Arc<dyn ChatStore>,
    pub log: Arc<dyn EventLog>,
    /// Stop, delete and shutdown reach the answer through this.
    pub control: Arc<TurnControl>,
    /// What the stream log says from outside: a stop asked for on another instance, the claim
    /// lost to a take-over, the log failing.
    pub signals: AnswerSignals,
    /// Who listens: an answer nobody hears for the grace period is cancelled.
    pub audience: Arc<Audience>,
    /// When the whole answer must be over; set when the producer starts.
    pub deadline: Instant,
    pub metrics: Arc<Metrics>,
    /// Shared with the [`Aftermath`], which finishes the turn if this producer panics.
    pub progress: Arc<Progress>,
    /// Cancelled when the server starts draining: an outcome storage still refuses then is left
    /// to the next start's recovery (it holds the text saved while streaming).
    pub draining: CancellationToken,
    /// The user's place among their concurrent streams, held while this answer is generated.
    pub _slot: crate::rate_limit::StreamPlace,
}

/// How long the producer offers an answer's outcome to a database that is away before its
/// listeners are told the answer was interrupted (they hear heartbeats meanwhile): longer than
/// an Aurora or RDS failover usually takes.
const STORE_PATIENCE: Duration = Duration::from_secs(30);
/// How long after that it still tries to store the answer (as interrupted, with exactly the text
/// its listeners got), so that storage ends up holding what they were sent.
const STORE_PERSISTENCE: Duration = Duration::from_secs(600);
const STORE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// Offers `record` to storage until it takes it, a non-transient error, `until`, or `give_up`.
async fn store_outcome(
    store: &dyn ChatStore,
    record: &FinishedTurn,
    until: Instant,
    give_up: &CancellationToken,
    retries: &prometheus_client::metrics::counter::Counter,
) -> Result<bool, crate::store::StoreError> {
    let (mut backoff, max_backoff) = STORE_BACKOFF;
    loop {
        match store.finish_turn(record.clone()).await {
            Err(e) if e.is_transient() && Instant::now() + backoff < until => {
                tracing::warn!(chat_id = %record.chat_id, "storage refused the answer for now, trying again: {e}");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = give_up.cancelled() => return Err(e),
                }
                backoff = (backoff * 2).min(max_backoff);
                retries.inc();
            }
            stored => return stored,
        }
    }
}

/// How far a producer got, kept where its [`Aftermath`] can read it after a panic.
#[derive(Debug, Default)]
pub(super) struct Progress {
    pub last_id: AtomicI64,
    chunks: Mutex<Vec<Arc<str>>>,
    stored: AtomicBool,
    ended: AtomicBool,
    /// Signalled when text arrives (the checkpoint saver waits on it).
    pub changed: tokio::sync::Notify,
    /// Cancelled once the producer is about to store the outcome: no more checkpoints.
    pub over: CancellationToken,
}

impl Progress {
    pub fn new(last_event_id: i64) -> Arc<Self> {
        Arc::new(Self {
            last_id: AtomicI64::new(last_event_id),
            ..Self::default()
        })
    }

    pub fn chunks(&self) -> std::sync::MutexGuard<'_, Vec<Arc<str>>> {
        // A panic while the lock was held leaves the text as it was: still worth storing.
        self.chunks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Finishes a turn whose producer panicked, so that nothing is left half-done: the answer is
/// stored as an error with the text streamed so far, every listener gets a terminal `error`, and
/// the stream log is closed (the caller releases the chat's claim). Without it, the chat would
/// stay busy, its listeners would wait forever and the stored row would stay `streaming`.
pub(super) struct Aftermath {
    pub chat_id: String,
    pub assistant_message_id: String,
    pub store: Arc<dyn ChatStore>,
    pub log: Arc<dyn EventLog>,
    pub progress: Arc<Progress>,
    pub metrics: Arc<Metrics>,
}

impl Aftermath {
    pub async fn after_panic(self) {
        tracing::error!(chat_id = %self.chat_id, "the answer's producer panicked; ending the answer");
        let progress = &self.progress;
        progress.over.cancel();
        let terminal_id = progress.last_id.load(Ordering::SeqCst) + 1;
        let failure = StreamFailure::new("the answer failed on the server", "internal_error", true);
        if !progress.stored.load(Ordering::SeqCst) {
            let chunks = std::mem::take(&mut *progress.chunks());
            let record = FinishedTurn::failed(
                &self.chat_id,
                &self.assistant_message_id,
                chunks,
                &failure,
                terminal_id,
            );
            if let Err(e) = self.store.finish_turn(record).await {
                tracing::error!(chat_id = %self.chat_id, "could not store the failed answer: {e}");
            }
        }
        if !progress.ended.load(Ordering::SeqCst) {
            let event = StreamEvent {
                id: terminal_id,
                kind: EventKind::Error(failure),
            };
            let delivered = self.log.append(&self.chat_id, event).await;
            if let Err(e) = delivered.and(self.log.close(&self.chat_id).await) {
                tracing::error!(chat_id = %self.chat_id, "could not end the failed answer's log: {e}");
            }
        }
        let outcome = OutcomeLabels {
            outcome: "internal_error".into(),
        };
        self.metrics.streams.get_or_create(&outcome).inc();
    }
}

/// How generation ended, before anything is stored.
enum Ending {
    /// The answer is complete.
    Complete,
    /// Something other than the provider ended it.
    Stopped(StopCause),
    Failed(ProviderError),
    /// The stream log refused the answer's events.
    Undeliverable,
    /// Another instance took the answer over (this producer's lease lapsed): it writes nothing
    /// more, anywhere.
    Lost,
}

/// What a target did before its first token.
enum Opening {
    /// It is answering: here is its stream and the first piece of text.
    Answering(ProviderStream, String),
    /// It finished without any text (an empty answer is still an answer).
    Empty,
    Failed(ProviderError),
    Stopped(Ending),
}

/// Assigns ids and appends events to the log; remembers what was said so far.
struct Emitter {
    log: Arc<dyn EventLog>,
    chat_id: String,
    last_id: i64,
    /// The ids and text so far live here, where an [`Aftermath`] finds them.
    progress: Arc<Progress>,
    usage: Option<TokenUsage>,
    /// The target that started answering, if one did.
    answering: Option<usize>,
    /// When the last text went out, for the inter-token gap.
    last_text_at: Option<Instant>,
    /// When the first did, for the usage ledger's time to first token.
    first_text_at: Option<Instant>,
    /// The stream log refused an event: nobody can be told more, so generation stops.
    undeliverable: bool,
}

impl Emitter {
    /// Appends the next event. A log that refuses it (a shared log whose server is gone) marks
    /// the answer as undeliverable: the producer stops and stores what it has.
    async fn send(&mut self, kind: EventKind) {
        self.last_id += 1;
        self.progress.last_id.store(self.last_id, Ordering::SeqCst);
        let event = StreamEvent {
            id: self.last_id,
            kind,
        };
        if let Err(e) = self.log.append(&self.chat_id, event).await
            && !self.undeliverable
        {
            tracing::error!(chat_id = %self.chat_id, "SSE stream error: {e}");
            self.undeliverable = true;
        }
    }

    async fn send_text(&mut self, text: String, gaps: &Histogram) {
        let now = Instant::now();
        match self.last_text_at.replace(now) {
            Some(previous) => gaps.observe((now - previous).as_secs_f64()),
            None => self.first_text_at = Some(now),
        }
        let text: Arc<str> = text.into();
        self.progress.chunks().push(text.clone());
        self.send(EventKind::Content(text)).await;
        self.progress.changed.notify_one();
    }
}

impl Turn {
    pub(super) async fn run(mut self) {
        self.deadline = Instant::now() + self.timeouts.total;
        let mut emitter = Emitter {
            log: self.log.clone(),
            chat_id: self.chat_id.clone(),
            last_id: self.last_event_id,
            progress: self.progress.clone(),
            usage: None,
            answering: None,
            last_text_at: None,
            first_text_at: None,
            undeliverable: false,
        };
        let start = EventKind::Start {
            chat_id: self.chat_id.clone(),
            message_id: self.assistant_message_id.clone(),
        };
        emitter.send(start).await;
        let admission = std::mem::take(&mut self.admission);
        // Boxed, each only while it runs: inline, every open stream's task would carry the room
        // of both at once (1.8 and 2.2 KiB), and of the copies async state machines make.
        let ending = Box::pin(self.generate(&mut emitter, admission)).await;
        Box::pin(self.finish(emitter, ending)).await;
    }

    async fn generate(&self, emitter: &mut Emitter, admission: Admission) -> Ending {
        let mut admission = Some(admission);
        let mut last_error = None;
        for index in self.start..self.targets.len() {
            let target = &self.targets[index];
            let granted = match admission.take() {
                Some(granted) => Ok(granted),
                None => target.provider.admit(&self.user_id),
            };
            let opening = match granted {
                Ok(granted) => self.open(target, granted, emitter).await,
                Err(e) => Opening::Failed(e),
            };
            match opening {
                Opening::Answering(upstream, first) => {
                    emitter.answering = Some(index);
                    let gaps = self.upstream_histogram(&self.metrics.inter_token_gap, target);
                    emitter.send_text(first, &gaps).await;
                    let ending = self.relay(upstream, emitter, &gaps).await;
                    if let Ending::Failed(e) = &ending {
                        self.count_failure(target, e);
                    }
                    return ending;
                }
                Opening::Empty => {
                    emitter.answering = Some(index);
                    return Ending::Complete;
                }
                Opening::Stopped(ending) => return ending,
                Opening::Failed(e) => {
                    self.count_failure(target, &e);
                    if index + 1 < self.targets.len() {
                        tracing::warn!(
                            chat_id = %self.chat_id,
                            provider = target.provider.name(),
                            model = %target.model,
                            detail = e.detail(),
                            "target failed before its first token, trying the next: {e}"
                        );
                    }
                    last_error = Some(e);
                }
            }
        }
        Ending::Failed(last_error.unwrap_or_else(|| {
            ProviderError::new(ProviderErrorKind::Upstream, "the bot has no target to try")
        }))
    }

    /// Calls one target and waits, within the first-token timeout, for its first text.
    async fn open(&self, target: &Target, admission: Admission, emitter: &mut Emitter) -> Opening {
        let mut request = self.request.clone();
        request.model = target.model.clone();
        let called = Instant::now();
        let first_text = async {
            let upstream = target.provider.stream(request, admission).await?;
            let mut upstream = super::stops::cut_at_stops(upstream, &self.stops);
            self.upstream_histogram(&self.metrics.upstream_latency, target)
                .observe(called.elapsed().as_secs_f64());
            loop {
                match upstream.next().await {
                    Some(Ok(ProviderEvent::TextDelta(text))) => {
                        return Ok(Some((upstream, text)));
                    }
                    Some(Ok(ProviderEvent::Usage(usage))) => emitter.usage = Some(usage),
                    Some(Err(e)) => return Err(e),
                    None => return Ok(None),
                }
            }
        };
        let timeout = self.timeouts.first_token;
        let waited = tokio::select! {
            biased;
            ending = self.stopped() => return Opening::Stopped(ending),
            waited = tokio::time::timeout(timeout, first_text) => waited,
        };
        match waited {
            Ok(Ok(Some((upstream, text)))) => {
                self.upstream_histogram(&self.metrics.time_to_first_token, target)
                    .observe(called.elapsed().as_secs_f64());
                Opening::Answering(upstream, text)
            }
            Ok(Ok(None)) => Opening::Empty,
            Ok(Err(e)) => Opening::Failed(e),
            Err(_) => Opening::Failed(ProviderError::new(
                ProviderErrorKind::FirstTokenTimeout,
                format!(
                    "{} sent no token within {} s",
                    target.provider.name(),
                    timeout.as_secs()
                ),
            )),
        }
    }

    /// Streams the rest of a target's answer. Dropping `upstream` on any return closes the
    /// provider connection, which is what cancels the request upstream.
    async fn relay(
        &self,
        mut upstream: ProviderStream,
        emitter: &mut Emitter,
        gaps: &Histogram,
    ) -> Ending {
        // One stop future and one idle timer for the whole answer, not one per token: this loop
        // runs for every token relayed.
        let stopped = self.stopped();
        tokio::pin!(stopped);
        let idle = tokio::time::sleep(self.timeouts.idle);
        tokio::pin!(idle);
        loop {
            let item = tokio::select! {
                biased;
                ending = &mut stopped => return ending,
                item = upstream.next() => item,
                () = &mut idle => {
                    let idle = self.timeouts.idle.as_secs();
                    return Ending::Failed(ProviderError::new(
                        ProviderErrorKind::IdleTimeout,
                        format!("the provider sent nothing for {idle} s in the middle of the answer"),
                    ));
                }
            };
            idle.as_mut().reset(Instant::now() + self.timeouts.idle);
            match item {
                Some(Ok(ProviderEvent::TextDelta(text))) => {
                    emitter.send_text(text, gaps).await;
                    if emitter.undeliverable {
                        return Ending::Undeliverable;
                    }
                }
                Some(Ok(ProviderEvent::Usage(usage))) => emitter.usage = Some(usage),
                Some(Err(e)) => return Ending::Failed(e),
                None => return Ending::Complete,
            }
        }
    }

    fn upstream_histogram(
        &self,
        family: &Family<UpstreamLabels, Histogram, fn() -> Histogram>,
        target: &Target,
    ) -> Histogram {
        family
            .get_or_create(&Metrics::upstream(target.provider.name(), &target.model))
            .clone()
    }

    fn count_failure(&self, target: &Target, error: &ProviderError) {
        let labels = UpstreamErrorLabels {
            provider: target.provider.name().to_owned(),
            model: target.model.clone(),
            code: error.kind.code().to_owned(),
        };
        self.metrics.upstream_errors.get_or_create(&labels).inc();
    }

    /// Counts the answer's outcome, duration and tokens.
    fn count_answer(&self, emitter: &Emitter, status: MessageStatus, terminal: &EventKind) {
        let outcome = match (status, terminal) {
            (_, EventKind::Error(failure)) => failure.code.clone(),
            (MessageStatus::Stopped, _) => "stopped".to_owned(),
            _ => "done".to_owned(),
        };
        let metrics = &self.metrics;
        metrics
            .streams
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        metrics
            .stream_duration
            .observe((Instant::now() - (self.deadline - self.timeouts.total)).as_secs_f64());
        if let (Some(index), Some(usage)) = (emitter.answering, emitter.usage) {
            let target = &self.targets[index];
            for (direction, count) in [
                ("input", usage.input_tokens),
                ("output", usage.output_tokens),
            ] {
                let labels = TokenLabels {
                    provider: target.provider.name().to_owned(),
                    model: target.model.clone(),
                    direction: direction.to_owned(),
                };
                metrics.tokens.get_or_create(&labels).inc_by(count);
            }
        }
    }

    /// The turn's tokens as the ledger has them, by bot and provider.
    fn count_bot_tokens(&self, emitter: &Emitter, (usage, reported): (TokenUsage, bool)) {
        let provider = emitter
            .answering
            .map_or("none", |i| self.targets[i].provider.name());
        let source = if reported { "reported" } else { "counted" };
        for (direction, count) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ] {
            let labels = BotTokenLabels {
                bot: self.bot_id.clone(),
                provider: provider.to_owned(),
                direction: direction.to_owned(),
                source: source.to_owned(),
            };
            self.metrics.bot_tokens.get_or_create(&labels).inc_by(count);
        }
    }

    /// Resolves when something other than the provider ends the answer.
    async fn stopped(&self) -> Ending {
        tokio::select! {
            biased;
            _ = self.control.stopped() => Ending::Stopped(self.control.cause()),
            _ = self.signals.lost.cancelled() => Ending::Lost,
            _ = self.signals.failed.cancelled() => Ending::Undeliverable,
            _ = self.signals.stop.cancelled() => Ending::Stopped(StopCause::Stopped),
            () = self.audience.abandoned() => Ending::Stopped(StopCause::ClientGone),
            _ = tokio::time::sleep_until(self.deadline) => {
                let total = self.timeouts.total.as_secs();
                Ending::Failed(ProviderError::new(
                    ProviderErrorKind::StreamTooLong,
                    format!("the answer took longer than the {total} s a stream may last"),
                ))
            }
        }
    }

    /// Stores the outcome first and only then appends the terminal event, so a client that sees
    /// `done` and reloads the chat finds the answer there. Every ending has a terminal event (an
    /// answer nobody listens to any more gets one too): a client that comes back later replays
    /// exactly what a listener would have seen.
    async fn finish(&self, mut emitter: Emitter, ending: Ending) {
        self.progress.over.cancel();
        // Everything appended is written (or refused) before the outcome is decided.
        let delivered = self.log.flush(&self.chat_id).await;
        if matches!(ending, Ending::Lost) || self.signals.lost.is_cancelled() {
            tracing::warn!(chat_id = %self.chat_id, "answer taken over elsewhere; this producer stores nothing");
            self.progress.stored.store(true, Ordering::SeqCst);
            self.progress.ended.store(true, Ordering::SeqCst);
            return;
        }
        let terminal_id = emitter.last_id + 1;
        let (status, terminal) = self.conclude(ending, &emitter, terminal_id);
        let target = emitter.answering.map(|i| &self.targets[i]);
        let failure = match &terminal {
            EventKind::Error(failure) => Some(failure),
            _ => None,
        };
        let mut record = FinishedTurn {
            chat_id: self.chat_id.clone(),
            assistant_message_id: self.assistant_message_id.clone(),
            content: String::new(),
            // A copy (of pointers): if storing panics, the aftermath still has the text.
            chunks: self.delivered_chunks(delivered),
            status,
            error_code: failure.map(|f| f.code.clone()),
            error_message: failure.map(|f| f.message.clone()),
            error_retryable: failure.map(|f| f.retryable),
            provider: target.map(|t| t.provider.name().to_owned()),
            model: target.map(|t| t.model.clone()),
            usage: emitter.usage,
            last_event_id: terminal_id,
            measures: self.measures(&emitter),
        };
        record.content = record.chunks.concat();
        let ledger = record.ledger_usage();
        let (terminal, unstored) = self.store(record, terminal).await;
        self.count_answer(&emitter, status, &terminal);
        self.count_bot_tokens(&emitter, ledger);
        emitter.send(terminal).await;
        if let Err(e) = self.log.close(&self.chat_id).await {
            tracing::error!(chat_id = %self.chat_id, "could not close the answer's log: {e}");
        }
        self.progress.ended.store(true, Ordering::SeqCst);
        if let Some(record) = unstored {
            self.store_late(record).await;
        }
    }

    /// Times since the turn started, and the prompt counted (about four bytes a token, what
    /// tokenizers of English average) for the ledger when the provider reports no usage.
    fn measures(&self, emitter: &Emitter) -> TurnMeasures {
        let started = self.deadline - self.timeouts.total;
        let millis = |at: Instant| (at - started).as_millis() as u64;
        let request = &self.request;
        let prompt_bytes = request.system_prompt.as_ref().map_or(0, String::len)
            + request
                .messages
                .iter()
                .map(|m| m.content.len())
                .sum::<usize>();
        TurnMeasures {
            first_token_ms: emitter.first_text_at.map(millis),
            duration_ms: Some(millis(Instant::now())),
            counted_input_tokens: prompt_bytes.div_ceil(4) as u64,
        }
    }

    /// Stores the outcome, waiting out a database that is away for up to [`STORE_PATIENCE`];
    /// returns the terminal event to send. Past that, the listeners are told the answer was
    /// interrupted, and the record to store later (as interrupted, with the same text) comes back.
    async fn store(
        &self,
        record: FinishedTurn,
        terminal: EventKind,
    ) -> (EventKind, Option<FinishedTurn>) {
        let until = Instant::now() + STORE_PATIENCE;
        match store_outcome(
            &*self.store,
            &record,
            until,
            &self.draining,
            &self.metrics.answer_store_retries,
        )
        .await
        {
            // `false`: the chat was deleted meanwhile, or — with shared state — the answer was
            // concluded by an instance that found this producer's lease lapsed; then the log
            // refuses this producer's terminal event too (fencing), and the conclusion stands.
            Ok(_) => {
                self.progress.stored.store(true, Ordering::SeqCst);
                (terminal, None)
            }
            Err(e) if e.is_transient() => {
                tracing::error!(chat_id = %self.chat_id, "SSE stream error: storage is away; the answer ends as interrupted: {e}");
                let failure = StreamFailure::new(
                    "the answer was interrupted: it could not be saved; ask again",
                    "answer_interrupted",
                    true,
                );
                let mut late = FinishedTurn::failed(
                    &record.chat_id,
                    &record.assistant_message_id,
                    record.chunks,
                    &failure,
                    record.last_event_id,
                );
                late.status = MessageStatus::Interrupted;
                (EventKind::Error(failure), Some(late))
            }
            Err(e) => {
                tracing::error!(chat_id = %self.chat_id, "SSE stream error: could not store the answer: {e}");
                let failure =
                    StreamFailure::new("the answer could not be saved", "internal_error", true);
                (EventKind::Error(failure), None)
            }
        }
    }

    /// Keeps offering an answer its listeners were told was interrupted, so storage ends up
    /// holding what they were sent; the chat takes no new turn here meanwhile.
    async fn store_late(&self, record: FinishedTurn) {
        let until = Instant::now() + STORE_PERSISTENCE;
        match store_outcome(
            &*self.store,
            &record,
            until,
            &self.draining,
            &self.metrics.answer_store_retries,
        )
        .await
        {
            Ok(_) => {
                tracing::info!(chat_id = %self.chat_id, "the interrupted answer is stored");
                self.progress.stored.store(true, Ordering::SeqCst);
            }
            Err(e) => tracing::error!(
                chat_id = %self.chat_id,
                "the answer stays unstored; the next start recovers it with the text saved while it streamed: {e}"
            ),
        }
    }

    /// The text every listener was sent: all of it, unless the log failed part-way, when only
    /// the pieces it delivered count (the others reached nobody). A piece's id is its place
    /// after the `start` event.
    fn delivered_chunks(
        &self,
        delivered: Result<Option<i64>, crate::stream_log::LogError>,
    ) -> Vec<Arc<str>> {
        let mut chunks = self.progress.chunks().clone();
        if let Ok(Some(last)) = delivered {
            let start_id = self.last_event_id + 1;
            let pieces = (last - start_id).clamp(0, chunks.len() as i64);
            chunks.truncate(pieces as usize);
        }
        chunks
    }

    /// The stored status and the terminal event of an ending.
    fn conclude(
        &self,
        ending: Ending,
        emitter: &Emitter,
        terminal_id: i64,
    ) -> (MessageStatus, EventKind) {
        let failure = |message: &str, code: &str, retryable: bool| {
            EventKind::Error(StreamFailure::new(message, code, retryable))
        };
        match ending {
            Ending::Complete | Ending::Stopped(StopCause::Stopped) => {
                let stopped = !matches!(ending, Ending::Complete);
                let target = emitter.answering.map(|i| &self.targets[i]);
                let done = DoneEvent {
                    chat_id: self.chat_id.clone(),
                    message_id: self.assistant_message_id.clone(),
                    usage: emitter.usage.unwrap_or_default(),
                    provider: target.map_or("", |t| t.provider.name()).to_owned(),
                    model: target.map(|t| t.model.clone()).unwrap_or_default(),
                    stopped,
                };
                let status = if stopped {
                    MessageStatus::Stopped
                } else {
                    MessageStatus::Complete
                };
                (status, EventKind::Done(done))
            }
            Ending::Stopped(StopCause::ClientGone) => {
                tracing::info!(chat_id = %self.chat_id, "client went away; answer stored as interrupted");
                let message = "the answer was interrupted when its client disconnected";
                (
                    MessageStatus::Interrupted,
                    failure(message, "answer_interrupted", true),
                )
            }
            Ending::Stopped(StopCause::Shutdown) => {
                let mut shutdown = StreamFailure::new(
                    "the server is shutting down; reconnect to continue",
                    "server_shutting_down",
                    true,
                );
                shutdown.last_event_id = Some(terminal_id - 1);
                (MessageStatus::Interrupted, EventKind::Error(shutdown))
            }
            Ending::Stopped(StopCause::Deleted) => (
                MessageStatus::Interrupted,
                failure("the chat was deleted", "chat_deleted", false),
            ),
            // The shared log stayed away longer than its writer waits: what was delivered is
            // kept, and the user may ask again.
            Ending::Undeliverable => (
                MessageStatus::Interrupted,
                failure(
                    "the answer was interrupted: its stream could not be kept; ask again",
                    "answer_interrupted",
                    true,
                ),
            ),
            Ending::Lost => (
                MessageStatus::Error,
                failure("the answer could not be delivered", "internal_error", true),
            ),
            Ending::Failed(err) => {
                tracing::error!(
                    chat_id = %self.chat_id,
                    code = err.kind.code(),
                    detail = err.detail(),
                    "SSE stream error: {err}"
                );
                let event = failure(&err.message, err.kind.code(), err.kind.retryable());
                (MessageStatus::Error, event)
            }
        }
    }
}
