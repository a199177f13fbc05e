//! The producer of one answer: calls the bot's targets in order until one starts answering,
//! hands each event to the client's stream as it arrives, and stores the outcome whatever happens
//! to the client.
//!
//! It runs as a tracked task, not inside the HTTP response, because its last duty (storing the
//! partial answer as interrupted) must happen exactly when the response is gone.
//!
//! Fallback rule: a target that fails before its first token (refused, throttled, 5xx, no first
//! token in time) is skipped for the next. Once a token has streamed there is no switch: a
//! failure is an `error` event, so the client never sees text twice.

use std::sync::Arc;
use tokio::time::Instant;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::StreamTimeouts;
use super::events::{DoneEvent, EventKind, StreamEvent, StreamFailure};
use crate::domain::TokenUsage;
use crate::providers::{
    Admission, ModelRequest, ProviderError, ProviderErrorKind, ProviderEvent, ProviderStream,
    Target,
};
use crate::store::{ChatStore, FinishedTurn, MessageStatus};

pub(super) struct Turn {
    pub chat_id: String,
    pub assistant_message_id: String,
    pub last_event_id: i64,
    pub targets: Vec<Target>,
    /// The first target to try, and the place it already granted.
    pub start: usize,
    pub admission: Admission,
    /// The conversation; `model` is filled in per target.
    pub request: ModelRequest,
    pub timeouts: StreamTimeouts,
    pub store: Arc<dyn ChatStore>,
    pub events: mpsc::Sender<StreamEvent>,
    /// Cancelled when the client's response is dropped.
    pub client_gone: CancellationToken,
    /// Cancelled when the chat is deleted while the answer is generated.
    pub deleted: CancellationToken,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
    /// When the whole answer must be over; set when the producer starts.
    pub deadline: Instant,
}

/// How generation ended, before anything is stored.
enum Ending {
    /// The answer is complete; `usize` is the target that gave it.
    Complete(usize),
    /// Nobody is listening any more: stop paying for tokens.
    ClientGone,
    ShuttingDown,
    ChatDeleted,
    Failed(ProviderError),
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

/// Assigns ids and forwards events; remembers the text and usage sent so far.
struct Emitter {
    tx: mpsc::Sender<StreamEvent>,
    last_id: i64,
    content: String,
    usage: Option<TokenUsage>,
}

impl Emitter {
    /// False when the client's stream is gone.
    async fn send(&mut self, kind: EventKind) -> bool {
        self.last_id += 1;
        let event = StreamEvent {
            id: self.last_id,
            kind,
        };
        self.tx.send(event).await.is_ok()
    }

    async fn send_text(&mut self, text: String) -> bool {
        self.content.push_str(&text);
        self.send(EventKind::Content(text)).await
    }
}

impl Turn {
    pub(super) async fn run(mut self) {
        self.deadline = Instant::now() + self.timeouts.total;
        let mut emitter = Emitter {
            tx: self.events.clone(),
            last_id: self.last_event_id,
            content: String::new(),
            usage: None,
        };
        let start = EventKind::Start {
            chat_id: self.chat_id.clone(),
            message_id: self.assistant_message_id.clone(),
        };
        let admission = std::mem::take(&mut self.admission);
        let ending = if emitter.send(start).await {
            self.generate(&mut emitter, admission).await
        } else {
            Ending::ClientGone
        };
        self.finish(emitter, ending).await;
    }

    async fn generate(&self, emitter: &mut Emitter, admission: Admission) -> Ending {
        let mut admission = Some(admission);
        let mut last_error = None;
        for index in self.start..self.targets.len() {
            let target = &self.targets[index];
            let granted = match admission.take() {
                Some(granted) => Ok(granted),
                None => target.provider.admit(),
            };
            let opening = match granted {
                Ok(granted) => self.open(target, granted, emitter).await,
                Err(e) => Opening::Failed(e),
            };
            match opening {
                Opening::Answering(upstream, first) => {
                    if !emitter.send_text(first).await {
                        return Ending::ClientGone;
                    }
                    return self.relay(upstream, emitter, index).await;
                }
                Opening::Empty => return Ending::Complete(index),
                Opening::Stopped(ending) => return ending,
                Opening::Failed(e) => {
                    if index + 1 < self.targets.len() {
                        tracing::warn!(
                            chat_id = %self.chat_id,
                            provider = target.provider.name(),
                            model = %target.model,
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
        let first_text = async {
            let mut upstream = target.provider.stream(request, admission).await?;
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
            Ok(Ok(Some((upstream, text)))) => Opening::Answering(upstream, text),
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
        index: usize,
    ) -> Ending {
        loop {
            let item = tokio::select! {
                biased;
                ending = self.stopped() => return ending,
                item = tokio::time::timeout(self.timeouts.idle, upstream.next()) => item,
            };
            let Ok(item) = item else {
                let idle = self.timeouts.idle.as_secs();
                return Ending::Failed(ProviderError::new(
                    ProviderErrorKind::IdleTimeout,
                    format!("the provider sent nothing for {idle} s in the middle of the answer"),
                ));
            };
            match item {
                Some(Ok(ProviderEvent::TextDelta(text))) => {
                    if !emitter.send_text(text).await {
                        return Ending::ClientGone;
                    }
                }
                Some(Ok(ProviderEvent::Usage(usage))) => emitter.usage = Some(usage),
                Some(Err(e)) => return Ending::Failed(e),
                None => return Ending::Complete(index),
            }
        }
    }

    /// Resolves when something other than the provider ends the answer.
    async fn stopped(&self) -> Ending {
        tokio::select! {
            biased;
            _ = self.client_gone.cancelled() => Ending::ClientGone,
            _ = self.shutdown.cancelled() => Ending::ShuttingDown,
            _ = self.deleted.cancelled() => Ending::ChatDeleted,
            _ = tokio::time::sleep_until(self.deadline) => {
                let total = self.timeouts.total.as_secs();
                Ending::Failed(ProviderError::new(
                    ProviderErrorKind::StreamTooLong,
                    format!("the answer took longer than the {total} s a stream may last"),
                ))
            }
        }
    }

    /// Stores the outcome first and only then sends the terminal event, so a client that sees
    /// `done` and reloads the chat finds the answer there.
    async fn finish(&self, mut emitter: Emitter, ending: Ending) {
        let (status, terminal) = self.conclude(ending, emitter.usage);
        let error_code = match &terminal {
            Some(EventKind::Error(failure)) => Some(failure.code.to_owned()),
            _ => None,
        };
        let record = FinishedTurn {
            chat_id: self.chat_id.clone(),
            assistant_message_id: self.assistant_message_id.clone(),
            content: std::mem::take(&mut emitter.content),
            status,
            error_code,
            usage: emitter.usage,
            last_event_id: emitter.last_id + i64::from(terminal.is_some()),
        };
        let terminal = match self.store.finish_turn(&record).await {
            Ok(()) => terminal,
            Err(e) => {
                tracing::error!(chat_id = %self.chat_id, "SSE stream error: could not store the answer: {e}");
                Some(failure(
                    "the answer could not be saved",
                    "internal_error",
                    true,
                ))
            }
        };
        if let Some(kind) = terminal {
            emitter.send(kind).await;
        }
    }

    /// The stored status and the terminal event (none when nobody is listening) of an ending.
    fn conclude(
        &self,
        ending: Ending,
        usage: Option<TokenUsage>,
    ) -> (MessageStatus, Option<EventKind>) {
        match ending {
            Ending::Complete(index) => {
                let target = &self.targets[index];
                let done = DoneEvent {
                    chat_id: self.chat_id.clone(),
                    message_id: self.assistant_message_id.clone(),
                    usage: usage.unwrap_or_default(),
                    provider: target.provider.name(),
                    model: target.model.clone(),
                };
                (MessageStatus::Complete, Some(EventKind::Done(done)))
            }
            Ending::ClientGone => {
                tracing::info!(chat_id = %self.chat_id, "client went away; answer stored as interrupted");
                (MessageStatus::Interrupted, None)
            }
            Ending::ShuttingDown => {
                let message = "the server is shutting down; reconnect to continue";
                let event = failure(message, "server_shutting_down", true);
                (MessageStatus::Interrupted, Some(event))
            }
            Ending::ChatDeleted => {
                let event = failure("the chat was deleted", "chat_deleted", false);
                (MessageStatus::Interrupted, Some(event))
            }
            Ending::Failed(err) => {
                tracing::error!(chat_id = %self.chat_id, code = err.kind.code(), "SSE stream error: {err}");
                let event = EventKind::Error(StreamFailure {
                    code: err.kind.code(),
                    retryable: err.kind.retryable(),
                    message: err.message,
                });
                (MessageStatus::Error, Some(event))
            }
        }
    }
}

fn failure(message: &str, code: &'static str, retryable: bool) -> EventKind {
    EventKind::Error(StreamFailure {
        message: message.to_owned(),
        code,
        retryable,
    })
}
