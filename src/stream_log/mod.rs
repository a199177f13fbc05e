//! The stream log: every event of an answer being generated, kept until the answer is stored,
//! so that any number of listeners — the client that asked, a client that reconnects with
//! `Last-Event-ID`, a second tab — read the same events with the same ids, each at its own pace.
//!
//! The producer appends; listeners follow from any id. Nothing here waits for a listener: a slow
//! or stuck client never holds the producer back, and memory per answer is the answer itself
//! (bounded by the bot's `max_tokens`). Finished answers are replayed from storage instead.
//!
//! [`EventLog`] is the seam: [`memory::MemoryLog`] is the in-process log; [`redis::RedisLog`]
//! keeps every live answer's events in a Redis Stream that every instance reads, and with them
//! who owns each answer (a lease with a fencing token), so that an answer outlives the instance
//! generating it and any instance can resume, stop or conclude it.

pub mod codec;
pub mod memory;
pub mod redis;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures_util::Stream;
use futures_util::stream::BoxStream;
use tokio_util::sync::CancellationToken;

use crate::events::StreamEvent;

/// A stream log that could not do what was asked (a shared one: its server is unreachable).
#[derive(Debug, thiserror::Error)]
#[error("the stream log is unavailable: {0}")]
pub struct LogError(pub String);

/// The right to write one answer of a chat: every write carries its fence, and a write whose
/// fence is no longer the chat's current one is refused (the answer was taken over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub fence: u64,
}

impl Claim {
    /// In one process nothing else can write: there is nothing to fence.
    pub const LOCAL: Claim = Claim { fence: 0 };
}

/// Why a chat cannot be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("the chat has an answer in progress")]
    Busy,
    /// Its answer's producer is gone and nobody concluded it yet: conclude it, then claim.
    #[error("the chat's answer was abandoned by its producer")]
    Orphaned,
    #[error(transparent)]
    Log(#[from] LogError),
}

/// What the log says to an answer's producer from outside it.
#[derive(Debug, Clone, Default)]
pub struct AnswerSignals {
    /// A stop was asked for, maybe on another instance.
    pub stop: CancellationToken,
    /// The producer lost its claim (its lease lapsed and another instance took over): it must
    /// not write anything more, to the log or to storage.
    pub lost: CancellationToken,
    /// The log cannot take more events (its server failed): the producer ends the answer with
    /// what was delivered.
    pub failed: CancellationToken,
}

/// What a stop request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// A live answer was asked to stop; its producer ends it.
    Stopping,
    NotRunning,
    /// The answer's producer is gone: conclude it instead.
    Orphaned,
}

/// An answer whose producer is gone, taken over to be concluded: its events as logged.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub claim: Claim,
    pub message_id: String,
    /// The id of its `start` event.
    pub first_id: i64,
    pub events: Vec<StreamEvent>,
}

/// Where the events of live answers are kept, by chat. Fallible throughout: a shared
/// implementation lives across a network. The methods with defaults only do something where
/// several instances share the log.
#[async_trait::async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Claims the chat for a new answer, before anything is stored.
    async fn claim(&self, _chat_id: &str) -> Result<Claim, ClaimError> {
        Ok(Claim::LOCAL)
    }

    /// Gives back a claim that never became an answer.
    async fn release(&self, _chat_id: &str, _claim: Claim) {}

    /// Starts the log of the answer `message_id`, whose first event has id `first_id`, replacing
    /// any finished one.
    async fn open(
        &self,
        chat_id: &str,
        claim: Claim,
        message_id: &str,
        first_id: i64,
    ) -> Result<AnswerSignals, LogError>;

    async fn append(&self, chat_id: &str, event: StreamEvent) -> Result<(), LogError>;

    /// Waits until every event appended so far is delivered (or refused); returns the id of the
    /// last one delivered.
    async fn flush(&self, _chat_id: &str) -> Result<Option<i64>, LogError> {
        Ok(None)
    }

    /// The answer is stored: listeners finish with what they have; new ones go to storage.
    async fn close(&self, chat_id: &str) -> Result<(), LogError>;

    /// The events after `after_id` of the chat's live answer, then the rest as it is appended,
    /// ending after the terminal event. `None` when no answer is live.
    async fn follow(
        &self,
        chat_id: &str,
        after_id: i64,
    ) -> Result<Option<BoxStream<'static, StreamEvent>>, LogError>;

    /// Asks the chat's live answer, wherever it is generated, to stop.
    async fn request_stop(&self, _chat_id: &str) -> Result<StopOutcome, LogError> {
        Ok(StopOutcome::NotRunning)
    }

    /// Takes over the chat's answer if its producer's lease has lapsed; once only.
    async fn take_over(&self, _chat_id: &str) -> Result<Option<Orphan>, LogError> {
        Ok(None)
    }

    /// Ends a taken-over answer: appends `terminal` — `None` when the log already ends with its
    /// producer's own (the taker read the whole log, and nothing else can write to it since) —
    /// and closes it.
    async fn conclude(
        &self,
        _chat_id: &str,
        _claim: Claim,
        _terminal: Option<StreamEvent>,
    ) -> Result<(), LogError> {
        Ok(())
    }

    /// Chats whose answers' leases may have lapsed (for a periodic sweep).
    async fn lapsed(&self) -> Result<Vec<String>, LogError> {
        Ok(Vec::new())
    }

    /// Whether several instances share it (answers outlive this process).
    fn is_shared(&self) -> bool {
        false
    }

    async fn ping(&self) -> Result<(), LogError> {
        Ok(())
    }
}

/// Who is listening to a live answer. Under the "cancel" disconnect policy, the last listener to
/// leave cancels the answer; under "continue", leaving changes nothing.
#[derive(Debug)]
pub struct Audience {
    listeners: AtomicUsize,
    /// Cancelled when the last listener leaves (and the policy says so).
    all_gone: CancellationToken,
    cancel_when_empty: bool,
}

impl Audience {
    pub fn new(cancel_when_empty: bool) -> Arc<Self> {
        Arc::new(Self {
            listeners: AtomicUsize::new(0),
            all_gone: CancellationToken::new(),
            cancel_when_empty,
        })
    }

    pub fn all_gone(&self) -> CancellationToken {
        self.all_gone.clone()
    }

    /// Wraps a listener's stream so that its end (or drop) is counted.
    pub fn listen(self: &Arc<Self>, events: BoxStream<'static, StreamEvent>) -> Listener {
        self.listeners.fetch_add(1, Ordering::SeqCst);
        Listener {
            events,
            audience: self.clone(),
        }
    }
}

/// One client's view of an answer.
pub struct Listener {
    events: BoxStream<'static, StreamEvent>,
    audience: Arc<Audience>,
}

impl Stream for Listener {
    type Item = StreamEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<StreamEvent>> {
        self.events.as_mut().poll_next(cx)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let before = self.audience.listeners.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.audience.cancel_when_empty {
            self.audience.all_gone.cancel();
        }
    }
}
