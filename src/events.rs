//! The events of one answer, in the order a client sees them. Every event carries an id unique
//! within its chat and larger than any id an earlier turn of that chat used, so a client can
//! always name the last one it saw.

use std::sync::Arc;

use crate::domain::TokenUsage;

#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    pub id: i64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// First event of every stream: which chat and message the answer belongs to.
    Start { chat_id: String, message_id: String },
    /// One piece of the answer's text, as the provider sent it. Shared, not copied, between the
    /// log, every listener and the record of the answer: this is the event sent per token.
    Content(Arc<str>),
    /// The answer is complete and stored.
    Done(DoneEvent),
    /// The answer failed or was cut short; nothing follows.
    Error(StreamFailure),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DoneEvent {
    pub chat_id: String,
    pub message_id: String,
    pub usage: TokenUsage,
    pub provider: String,
    pub model: String,
    /// Ended by the stop endpoint rather than by the model.
    pub stopped: bool,
}

impl DoneEvent {
    /// The answer used every token it was allowed (`max_tokens`), so it was cut for length
    /// rather than finished: what the OpenAI and AI SDK protocols report as `length`. A stopped
    /// answer ended for the stop, whatever it used.
    pub fn ran_out_of_tokens(&self, max_tokens: u32) -> bool {
        !self.stopped && self.usage.output_tokens >= u64::from(max_tokens)
    }
}

/// Why a stream ended badly, in the contract's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFailure {
    pub message: String,
    pub code: String,
    pub retryable: bool,
    /// For a shutdown: the id of the last event before this one, to resume from elsewhere.
    pub last_event_id: Option<i64>,
}

impl StreamFailure {
    pub fn new(message: impl Into<String>, code: impl Into<String>, retryable: bool) -> Self {
        Self {
            message: message.into(),
            code: code.into(),
            retryable,
            last_event_id: None,
        }
    }
}

impl EventKind {
    /// The length of the text it carries, if any.
    pub fn text_len(&self) -> usize {
        match self {
            EventKind::Content(text) => text.len(),
            _ => 0,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, EventKind::Done(_) | EventKind::Error(_))
    }
}
