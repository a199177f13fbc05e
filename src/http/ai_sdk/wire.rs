//! The Vercel AI SDK's UI message stream, protocol v1 (`x-vercel-ai-ui-message-stream: v1`), as
//! the `ai` package's `DefaultChatTransport` sends and parses it: the request body of `useChat`
//! (`id`, `messages` as UI messages, `trigger`, `messageId`) and the answer's parts (`start`,
//! `text-start`, `text-delta`, `text-end`, `finish` or `error`, then `data: [DONE]`).

use serde::{Deserialize, Serialize};

use crate::domain::Role;
use crate::events::{EventKind, StreamEvent};
use crate::http::error::ApiError;
use crate::http::sse::{DATA_DONE, Framing, write_data};

/// `POST /api/v1/ai-sdk/chat`: what `DefaultChatTransport` posts. Extra fields a client adds with
/// the transport's `body` option are ignored, except the bot to ask.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ChatRequest {
    /// The chat's id, chosen by the client (`useChat({ id })`): the chat Mangoo stores it as.
    pub id: String,
    pub messages: Vec<UiMessage>,
    /// `submit-message` (the default) or `regenerate-message` (the replaced answer is kept as
    /// an earlier version).
    #[serde(default)]
    pub trigger: Option<String>,
    // `messageId` (the answer `regenerate-message` replaces, or the question an edit replaces)
    // is not read: the SDK leaves everything from there on out of `messages`, and where the
    // client's copy of the conversation ends is what the chat is rewound to.
    /// The bot to ask (the transport's `body: { bot_id }`); the first configured bot by default.
    #[serde(default, alias = "botId")]
    pub bot_id: Option<String>,
}

/// A UI message; only its text parts reach the model.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct UiMessage {
    /// `system`, `user` or `assistant`.
    role: String,
    #[serde(default)]
    parts: Vec<UiPart>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct UiPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// The request's conversation, as the chat service takes it.
pub struct Conversation {
    pub instructions: Option<String>,
    /// User and assistant messages in order.
    pub messages: Vec<(Role, String)>,
}

impl ChatRequest {
    pub fn regenerates(&self) -> Result<bool, ApiError> {
        match self.trigger.as_deref() {
            None | Some("submit-message") => Ok(false),
            Some("regenerate-message") => Ok(true),
            Some(other) => Err(invalid(format!(
                "trigger '{other}' is not one of submit-message, regenerate-message"
            ))),
        }
    }

    /// The chat id, checked: it names a stored chat and appears in URLs.
    pub fn chat_id(&self) -> Result<String, ApiError> {
        let id = &self.id;
        let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if id.is_empty() || id.len() > 128 || !id.chars().all(allowed) {
            return Err(invalid(
                "id must be 1 to 128 letters, digits, '-' or '_' (the chat's id)",
            ));
        }
        Ok(id.clone())
    }

    pub fn conversation(&self) -> Result<Conversation, ApiError> {
        let mut instructions = Vec::new();
        let mut messages = Vec::new();
        for message in &self.messages {
            let role = match message.role.as_str() {
                "system" => None,
                "user" => Some(Role::User),
                "assistant" => Some(Role::Assistant),
                other => return Err(invalid(format!("messages: unknown role '{other}'"))),
            };
            let text = message.text(role == Some(Role::User))?;
            match role {
                Some(role) => messages.push((role, text)),
                None => instructions.push(text),
            }
        }
        Ok(Conversation {
            instructions: Some(instructions.join("\n\n")).filter(|i| !i.trim().is_empty()),
            messages,
        })
    }
}

impl UiMessage {
    /// Its text. A user's file is refused (the models here read text only); an answer's other
    /// parts (reasoning, steps, sources, tools) are what the UI showed, not what was said.
    fn text(&self, from_user: bool) -> Result<String, ApiError> {
        let mut text = String::new();
        for part in &self.parts {
            match (part.kind.as_str(), &part.text) {
                ("text", Some(piece)) => text.push_str(piece),
                ("file", _) if from_user => {
                    return Err(invalid(
                        "messages: file parts are not supported (text only)",
                    ));
                }
                _ => {}
            }
        }
        Ok(text)
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message)
}

/// One part of the stream, as the SDK's `uiMessageChunkSchema` has it.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum Part<'a> {
    Start {
        #[serde(rename = "messageId")]
        message_id: &'a str,
    },
    TextStart {
        id: &'a str,
    },
    TextDelta {
        id: &'a str,
        delta: &'a str,
    },
    TextEnd {
        id: &'a str,
    },
    Finish {
        #[serde(rename = "finishReason")]
        finish_reason: &'static str,
    },
    Error {
        #[serde(rename = "errorText")]
        error_text: &'a str,
    },
}

/// The answer's events as UI message parts. Each part that carries a Mangoo event has its id in
/// `id:` (the SDK ignores it; it names the event in logs and proxies). One text part holds the
/// whole answer: it opens with the first piece and closes before the end.
pub struct UiMessageFraming {
    /// The answer's message id: the UI message's id, and its text part's.
    text_id: String,
    text_open: bool,
    /// An answer that used them all ended for `length`.
    max_tokens: u32,
}

impl UiMessageFraming {
    pub fn new(max_tokens: u32) -> Self {
        Self {
            text_id: String::new(),
            text_open: false,
            max_tokens,
        }
    }

    fn close_text(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.text_open) {
            write_data(out, None, &Part::TextEnd { id: &self.text_id });
        }
    }
}

impl Framing for UiMessageFraming {
    fn encode(&mut self, out: &mut Vec<u8>, event: &StreamEvent, _retry_ms: Option<u64>) {
        // No `retry:`: the SDK reconnects through `resumeStream`, not EventSource.
        let id = Some(event.id);
        match &event.kind {
            EventKind::Start { message_id, .. } => {
                self.text_id = format!("text-{message_id}");
                write_data(out, id, &Part::Start { message_id });
            }
            EventKind::Content(text) => {
                if !std::mem::replace(&mut self.text_open, true) {
                    write_data(out, None, &Part::TextStart { id: &self.text_id });
                }
                let delta = Part::TextDelta {
                    id: &self.text_id,
                    delta: text,
                };
                write_data(out, id, &delta);
            }
            EventKind::Done(done) => {
                self.close_text(out);
                let finish_reason = match done.ran_out_of_tokens(self.max_tokens) {
                    true => "length",
                    false => "stop",
                };
                write_data(out, id, &Part::Finish { finish_reason });
                out.extend_from_slice(DATA_DONE);
            }
            EventKind::Error(failure) => {
                self.close_text(out);
                let error_text = &failure.message;
                write_data(out, id, &Part::Error { error_text });
                out.extend_from_slice(DATA_DONE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TokenUsage;
    use crate::events::DoneEvent;

    fn frames(events: Vec<EventKind>) -> String {
        let mut framing = UiMessageFraming::new(100);
        let mut out = Vec::new();
        for (id, kind) in (1..).zip(events) {
            framing.encode(&mut out, &StreamEvent { id, kind }, None);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn an_answer_is_one_text_part_between_start_and_finish() {
        let done = DoneEvent {
            chat_id: "c".into(),
            message_id: "m".into(),
            usage: TokenUsage::default(),
            provider: "p".into(),
            model: "x".into(),
            stopped: false,
        };
        let wire = frames(vec![
            EventKind::Start {
                chat_id: "c".into(),
                message_id: "m".into(),
            },
            EventKind::Content("Hi".into()),
            EventKind::Content("!".into()),
            EventKind::Done(done),
        ]);
        assert_eq!(
            wire,
            "id: 1\ndata: {\"type\":\"start\",\"messageId\":\"m\"}\n\n\
             data: {\"type\":\"text-start\",\"id\":\"text-m\"}\n\n\
             id: 2\ndata: {\"type\":\"text-delta\",\"id\":\"text-m\",\"delta\":\"Hi\"}\n\n\
             id: 3\ndata: {\"type\":\"text-delta\",\"id\":\"text-m\",\"delta\":\"!\"}\n\n\
             data: {\"type\":\"text-end\",\"id\":\"text-m\"}\n\n\
             id: 4\ndata: {\"type\":\"finish\",\"finishReason\":\"stop\"}\n\n\
             data: [DONE]\n\n"
        );
    }

    #[test]
    fn the_request_body_of_use_chat_is_read() {
        let request: ChatRequest = serde_json::from_value(serde_json::json!({
            "id": "abc123", "trigger": "submit-message", "messageId": null,
            "messages": [
                {"id": "s", "role": "system", "parts": [{"type": "text", "text": "Be brief."}]},
                {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]},
                {"id": "a1", "role": "assistant", "parts": [
                    {"type": "step-start"}, {"type": "text", "text": "hello", "state": "done"}
                ]},
                {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "again"}]}
            ]
        }))
        .unwrap();
        assert_eq!(request.chat_id().unwrap(), "abc123");
        assert!(!request.regenerates().unwrap());
        let conversation = request.conversation().unwrap();
        assert_eq!(conversation.instructions.as_deref(), Some("Be brief."));
        let texts: Vec<&str> = conversation
            .messages
            .iter()
            .map(|(_, t)| t.as_str())
            .collect();
        assert_eq!(texts, ["hi", "hello", "again"]);
    }
}
