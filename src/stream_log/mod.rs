//! The stream log: every event of an answer being generated, kept until the answer is stored,
//! so that any number of listeners — the client that asked, a client that reconnects with
//! `Last-Event-ID`, a second tab — read the same events with the same ids, each at its own pace.
//!
//! The producer appends; listeners follow from any id. Nothing here waits for a listener: a slow
//! or stuck client never holds the producer back, and memory per answer is the answer itself
//! (bounded by the bot's `max_tokens`). Finished answers are replayed from storage instead.
//!
//! [`EventLog`] is the seam for a shared implementation (Redis Streams) serving several instances;
//! [`memory::MemoryLog`] is the in-process one.

pub mod memory;

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

/// Where the events of live answers are kept, by chat. Fallible throughout: a shared
/// implementation lives across a network.
#[async_trait::async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Starts the log of a new answer in `chat_id`, replacing any finished one.
    async fn open(&self, chat_id: &str) -> Result<(), LogError>;

    async fn append(&self, chat_id: &str, event: StreamEvent) -> Result<(), LogError>;

    /// The answer is stored: listeners finish with what they have; new ones go to storage.
    async fn close(&self, chat_id: &str) -> Result<(), LogError>;

    /// The events after `after_id` of the chat's live answer, then the rest as it is appended,
    /// ending after the terminal event. `None` when no answer is live.
    async fn follow(
        &self,
        chat_id: &str,
        after_id: i64,
    ) -> Result<Option<BoxStream<'static, StreamEvent>>, LogError>;
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
