//! How an event is written into a shared log entry: one field whose name says the kind. A piece
//! of text — the event sent per token — is its raw UTF-8 under `t`, with nothing to encode or
//! parse; the rare others are small JSON objects.

use serde_json::{Value, json};

use crate::domain::TokenUsage;
use crate::events::{DoneEvent, EventKind, StreamEvent, StreamFailure};

/// The entry's field name and value.
pub fn encode(kind: &EventKind) -> (&'static str, Vec<u8>) {
    match kind {
        EventKind::Content(text) => ("t", text.as_bytes().to_vec()),
        EventKind::Start {
            chat_id,
            message_id,
        } => (
            "s",
            json!({"chat_id": chat_id, "message_id": message_id})
                .to_string()
                .into_bytes(),
        ),
        EventKind::Done(done) => (
            "d",
            json!({
                "chat_id": done.chat_id,
                "message_id": done.message_id,
                "input_tokens": done.usage.input_tokens,
                "output_tokens": done.usage.output_tokens,
                "provider": done.provider,
                "model": done.model,
                "stopped": done.stopped,
            })
            .to_string()
            .into_bytes(),
        ),
        EventKind::Error(failure) => (
            "e",
            json!({
                "message": failure.message,
                "code": failure.code,
                "retryable": failure.retryable,
                "last_event_id": failure.last_event_id,
            })
            .to_string()
            .into_bytes(),
        ),
    }
}

/// The event an entry holds; `None` for an entry this build does not know.
pub fn decode(id: i64, field: &str, value: &[u8]) -> Option<StreamEvent> {
    let kind = match field {
        "t" => EventKind::Content(std::str::from_utf8(value).ok()?.into()),
        other => {
            let json: Value = serde_json::from_slice(value).ok()?;
            let text = |key: &str| json[key].as_str().unwrap_or_default().to_owned();
            match other {
                "s" => EventKind::Start {
                    chat_id: text("chat_id"),
                    message_id: text("message_id"),
                },
                "d" => EventKind::Done(DoneEvent {
                    chat_id: text("chat_id"),
                    message_id: text("message_id"),
                    usage: TokenUsage {
                        input_tokens: json["input_tokens"].as_u64().unwrap_or_default(),
                        output_tokens: json["output_tokens"].as_u64().unwrap_or_default(),
                    },
                    provider: text("provider"),
                    model: text("model"),
                    stopped: json["stopped"].as_bool().unwrap_or_default(),
                }),
                "e" => EventKind::Error(StreamFailure {
                    message: text("message"),
                    code: text("code"),
                    retryable: json["retryable"].as_bool().unwrap_or(true),
                    last_event_id: json["last_event_id"].as_i64(),
                }),
                _ => return None,
            }
        }
    };
    Some(StreamEvent { id, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_event_comes_back_as_it_went_in() {
        let mut failure = StreamFailure::new("gone", "answer_interrupted", true);
        failure.last_event_id = Some(7);
        let kinds = [
            EventKind::Start {
                chat_id: "c".into(),
                message_id: "m".into(),
            },
            EventKind::Content("héllo\n\"x\"".into()),
            EventKind::Done(DoneEvent {
                chat_id: "c".into(),
                message_id: "m".into(),
                usage: TokenUsage {
                    input_tokens: 3,
                    output_tokens: 4,
                },
                provider: "p".into(),
                model: "m".into(),
                stopped: true,
            }),
            EventKind::Error(failure),
        ];
        for (id, kind) in kinds.into_iter().enumerate() {
            let (field, value) = encode(&kind);
            let back = decode(id as i64, field, &value).unwrap();
            assert_eq!(
                back,
                StreamEvent {
                    id: id as i64,
                    kind
                }
            );
        }
        assert!(decode(1, "?", b"{}").is_none());
    }
}
