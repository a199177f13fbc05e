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
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

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
    /// any finished one. A shared log tells `audience` about listeners on other instances.
    async fn open(
        &self,
        chat_id: &str,
        claim: Claim,
        message_id: &str,
        first_id: i64,
        audience: &Arc<Audience>,
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

    /// The chat was deleted: whatever the log still keeps of it goes (an answer being stopped
    /// keeps its own until it closes).
    async fn forget(&self, _chat_id: &str) -> Result<(), LogError> {
        Ok(())
    }

    /// Whether several instances share it (answers outlive this process).
    fn is_shared(&self) -> bool {
        false
    }

    async fn ping(&self) -> Result<(), LogError> {
        Ok(())
    }
}

/// Who is listening to a live answer. Under the "cancel" disconnect policy an answer nobody has
/// listened to for the grace period is cancelled; a listener that comes back within it (a
/// reloaded page, a phone out of a tunnel) keeps it going — on this instance or, with shared
/// state, on any other (their presence reaches the producer through the shared log). Under
/// "continue", leaving changes nothing.
#[derive(Debug)]
pub struct Audience {
    heard: watch::Sender<Heard>,
    /// `None`: never cancelled for want of listeners.
    grace: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Heard {
    listeners: usize,
    /// Listeners on other instances, as last counted in the shared log.
    remote: usize,
    /// When the last listener left; `None` while someone listens (or nobody ever did: the
    /// asker's listener is attached before the producer starts).
    emptied_at: Option<Instant>,
}

impl Audience {
    pub fn new(grace: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            heard: watch::Sender::new(Heard::default()),
            grace,
        })
    }

    /// Resolves once nobody has listened for the grace period. State, not a timer: dropping
    /// this future and calling it again (each phase of the producer does) loses no time.
    pub async fn abandoned(&self) {
        let Some(grace) = self.grace else {
            return std::future::pending().await;
        };
        let mut heard = self.heard.subscribe();
        loop {
            let emptied = heard
                .wait_for(|h| h.emptied_at.is_some())
                .await
                .map(|h| h.emptied_at);
            let Ok(Some(emptied_at)) = emptied else {
                return std::future::pending().await;
            };
            if grace.is_zero() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(emptied_at + grace) => {
                    let still_empty = heard.borrow().emptied_at == Some(emptied_at);
                    if still_empty {
                        return;
                    }
                }
                _ = heard.changed() => {}
            }
        }
    }

    /// How many listeners other instances have now.
    pub fn hear_remote(&self, remote: usize) {
        self.heard.send_if_modified(|h| {
            if h.remote == remote {
                return false;
            }
            let before = h.listeners + h.remote;
            h.remote = remote;
            if h.listeners + remote > 0 {
                h.emptied_at = None;
            } else if before > 0 {
                h.emptied_at = Some(Instant::now());
            }
            true
        });
    }

    /// Wraps a listener's stream so that its end (or drop) is counted.
    pub fn listen(self: &Arc<Self>, events: BoxStream<'static, StreamEvent>) -> Listener {
        self.heard.send_modify(|h| {
            h.listeners += 1;
            h.emptied_at = None;
        });
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
        self.audience.heard.send_modify(|h| {
            h.listeners -= 1;
            if h.listeners == 0 && h.remote == 0 {
                h.emptied_at = Some(Instant::now());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{FutureExt, StreamExt, stream};

    fn listener(audience: &Arc<Audience>) -> Listener {
        audience.listen(stream::empty().boxed())
    }

    /// Whether `abandoned` resolves within `by` (the paused clock jumps to each timer).
    async fn abandoned_after(audience: &Arc<Audience>, by: Duration) -> bool {
        tokio::time::timeout(by, audience.abandoned()).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_abandoned_only_after_a_whole_grace_period_without_listeners() {
        let audience = Audience::new(Some(Duration::from_secs(30)));
        let first = listener(&audience);
        assert!(
            !abandoned_after(&audience, Duration::from_secs(60)).await,
            "heard"
        );

        drop(first);
        assert!(!abandoned_after(&audience, Duration::from_secs(20)).await);
        // Back within the grace period (a reload), then gone again: the period starts over.
        let back = listener(&audience);
        drop(back);
        assert!(!abandoned_after(&audience, Duration::from_secs(29)).await);
        assert!(abandoned_after(&audience, Duration::from_secs(2)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn listeners_elsewhere_keep_an_answer_heard() {
        let audience = Audience::new(Some(Duration::from_secs(30)));
        let asker = listener(&audience);
        audience.hear_remote(1); // the asker reconnected to another instance
        drop(asker);
        assert!(!abandoned_after(&audience, Duration::from_secs(120)).await);
        audience.hear_remote(0);
        assert!(!abandoned_after(&audience, Duration::from_secs(29)).await);
        assert!(abandoned_after(&audience, Duration::from_secs(2)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_grace_abandons_at_once_and_no_grace_never() {
        let at_once = Audience::new(Some(Duration::ZERO));
        drop(listener(&at_once));
        assert!(at_once.abandoned().now_or_never().is_some());

        let never = Audience::new(None);
        drop(listener(&never));
        assert!(!abandoned_after(&never, Duration::from_secs(86_400)).await);
    }
}
