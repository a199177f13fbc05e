//! The producer of one answer: calls the provider, hands each event to the client's stream as it
//! arrives, and stores the outcome whatever happens to the client.
//!
//! It runs as a tracked task, not inside the HTTP response, because its last duty (storing the
//! partial answer as interrupted) must happen exactly when the response is gone.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::events::{DoneEvent, EventKind, StreamEvent, StreamFailure};
use crate::domain::TokenUsage;
use crate::providers::{ModelRequest, Provider, ProviderError, ProviderEvent};
use crate::store::{ChatStore, FinishedTurn, MessageStatus};

pub(super) struct Turn {
    pub chat_id: String,
    pub assistant_message_id: String,
    pub last_event_id: i64,
    pub provider: Arc<Provider>,
    pub request: ModelRequest,
    pub store: Arc<dyn ChatStore>,
    pub events: mpsc::Sender<StreamEvent>,
    /// Cancelled when the client's response is dropped.
    pub client_gone: CancellationToken,
    /// Cancelled when the chat is deleted while the answer is generated.
    pub deleted: CancellationToken,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
}

/// How generation ended, before anything is stored.
enum Ending {
    Complete,
    /// Nobody is listening any more: stop paying for tokens.
    ClientGone,
    ShuttingDown,
    ChatDeleted,
    Failed(ProviderError),
}

/// Assigns ids and forwards events; remembers whether the client is still there.
struct Emitter {
    tx: mpsc::Sender<StreamEvent>,
    last_id: i64,
}

impl Emitter {
    /// False when the client's stream is gone.
    async fn send(&mut self, kind: EventKind) -> bool {
        self.last_id += 1;
        self.tx
            .send(StreamEvent {
                id: self.last_id,
                kind,
            })
            .await
            .is_ok()
    }
}

impl Turn {
    pub(super) async fn run(self) {
        let mut emitter = Emitter {
            tx: self.events.clone(),
            last_id: self.last_event_id,
        };
        let start = EventKind::Start {
            chat_id: self.chat_id.clone(),
            message_id: self.assistant_message_id.clone(),
        };
        let mut content = String::new();
        let mut usage = None;
        let ending = if emitter.send(start).await {
            self.generate(&mut emitter, &mut content, &mut usage).await
        } else {
            Ending::ClientGone
        };
        self.finish(emitter, ending, content, usage).await;
    }

    async fn generate(
        &self,
        emitter: &mut Emitter,
        content: &mut String,
        usage: &mut Option<TokenUsage>,
    ) -> Ending {
        let opened = tokio::select! {
            biased;
            _ = self.client_gone.cancelled() => return Ending::ClientGone,
            _ = self.shutdown.cancelled() => return Ending::ShuttingDown,
            _ = self.deleted.cancelled() => return Ending::ChatDeleted,
            opened = self.provider.stream(self.request.clone()) => opened,
        };
        let mut upstream = match opened {
            Ok(upstream) => upstream,
            Err(e) => return Ending::Failed(e),
        };
        // Dropping `upstream` on any return below closes the provider connection, which is what
        // cancels the request upstream.
        loop {
            let item = tokio::select! {
                biased;
                _ = self.client_gone.cancelled() => return Ending::ClientGone,
                _ = self.shutdown.cancelled() => return Ending::ShuttingDown,
                _ = self.deleted.cancelled() => return Ending::ChatDeleted,
                item = upstream.next() => item,
            };
            match item {
                Some(Ok(ProviderEvent::TextDelta(text))) => {
                    content.push_str(&text);
                    if !emitter.send(EventKind::Content(text)).await {
                        return Ending::ClientGone;
                    }
                }
                Some(Ok(ProviderEvent::Usage(u))) => *usage = Some(u),
                Some(Err(e)) => return Ending::Failed(e),
                None => return Ending::Complete,
            }
        }
    }

    /// Stores the outcome first and only then sends the terminal event, so a client that sees
    /// `done` and reloads the chat finds the answer there.
    async fn finish(
        &self,
        mut emitter: Emitter,
        ending: Ending,
        content: String,
        usage: Option<TokenUsage>,
    ) {
        let (status, terminal) = self.conclude(ending, usage);
        let error_code = match &terminal {
            Some(EventKind::Error(failure)) => Some(failure.code.to_owned()),
            _ => None,
        };
        let record = FinishedTurn {
            chat_id: self.chat_id.clone(),
            assistant_message_id: self.assistant_message_id.clone(),
            content,
            status,
            error_code,
            usage,
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
            Ending::Complete => {
                let done = DoneEvent {
                    chat_id: self.chat_id.clone(),
                    message_id: self.assistant_message_id.clone(),
                    usage: usage.unwrap_or_default(),
                    provider: self.provider.name(),
                    model: self.request.model.clone(),
                };
                (MessageStatus::Complete, Some(EventKind::Done(done)))
            }
            Ending::ClientGone => {
                tracing::info!(chat_id = %self.chat_id, "client went away; answer stored as interrupted");
                (MessageStatus::Interrupted, None)
            }
            Ending::ShuttingDown => {
                let message = "the server is shutting down; reconnect to continue";
                (
                    MessageStatus::Interrupted,
                    Some(failure(message, "server_shutting_down", true)),
                )
            }
            Ending::ChatDeleted => {
                let message = "the chat was deleted";
                (
                    MessageStatus::Interrupted,
                    Some(failure(message, "chat_deleted", false)),
                )
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
