//! The events of one answer, in the order a client sees them. Every event carries an id unique
//! within its chat and larger than any id an earlier turn of that chat used, so a client can
//! always name the last one it saw.

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
    /// One piece of the answer's text, as the provider sent it.
    Content(String),
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
    pub provider: &'static str,
    pub model: String,
}

/// Why a stream ended badly, in the contract's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFailure {
    pub message: String,
    pub code: &'static str,
    pub retryable: bool,
}

impl EventKind {
    pub fn is_terminal(&self) -> bool {
        matches!(self, EventKind::Done(_) | EventKind::Error(_))
    }
}
