//! The SSE encoder: [`StreamEvent`]s in, the contract's wire format out, one frame per event and
//! nothing held back. Frames are written by hand rather than through `axum::response::Sse` so the
//! bytes, headers and field order are exactly the public contract's.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Version, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Serialize;

use crate::chat::TurnStream;
use crate::chat::events::{EventKind, StreamEvent};
use crate::domain::TokenUsage;

/// Streams an answer. The body has no length, so HTTP/1.1 sends it chunked and each event leaves
/// as soon as it is produced.
pub fn stream_response(events: TurnStream, version: Version) -> Response {
    let body = Body::from_stream(events.map(|event| Ok::<_, Infallible>(encode(&event))));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    // nginx and its relatives buffer responses unless told not to.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // HTTP/2 forbids connection-specific headers; HTTP/1.1 proxies like to see it.
    if version == Version::HTTP_11 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    response
}

#[derive(Serialize)]
struct StartData<'a> {
    chat_id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    message_id: &'a str,
}

#[derive(Serialize)]
struct ContentData<'a> {
    content: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct UsageData {
    input_tokens: u64,
    output_tokens: u64,
}

impl From<TokenUsage> for UsageData {
    fn from(usage: TokenUsage) -> Self {
        Self {
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
        }
    }
}

#[derive(Serialize)]
struct DoneData<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    chat_id: &'a str,
    usage: UsageData,
    message_id: &'a str,
    provider: &'a str,
    model: &'a str,
}

#[derive(Serialize)]
struct ErrorData<'a> {
    error: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'a str,
    retryable: bool,
}

/// One SSE frame: `id`, `event`, a single `data` line (JSON escapes every newline) and the blank
/// line that ends the event.
pub fn encode(event: &StreamEvent) -> Bytes {
    let mut frame = Vec::with_capacity(96);
    let name = match &event.kind {
        EventKind::Start { .. } => "start",
        EventKind::Content(_) => "message",
        EventKind::Done(_) => "done",
        EventKind::Error(_) => "error",
    };
    frame.extend_from_slice(format!("id: {}\nevent: {name}\ndata: ", event.id).as_bytes());
    let written = match &event.kind {
        EventKind::Start {
            chat_id,
            message_id,
        } => serde_json::to_writer(
            &mut frame,
            &StartData {
                chat_id,
                kind: "start",
                message_id,
            },
        ),
        EventKind::Content(text) => serde_json::to_writer(
            &mut frame,
            &ContentData {
                content: text,
                kind: "content",
            },
        ),
        EventKind::Done(done) => serde_json::to_writer(
            &mut frame,
            &DoneData {
                kind: "done",
                chat_id: &done.chat_id,
                usage: done.usage.into(),
                message_id: &done.message_id,
                provider: done.provider,
                model: &done.model,
            },
        ),
        EventKind::Error(failure) => serde_json::to_writer(
            &mut frame,
            &ErrorData {
                error: &failure.message,
                kind: "error",
                code: failure.code,
                retryable: failure.retryable,
            },
        ),
    };
    written.expect("serialising plain structs into a Vec cannot fail");
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::events::StreamFailure;

    #[test]
    fn content_frames_match_the_contract() {
        let frame = encode(&StreamEvent {
            id: 2,
            kind: EventKind::Content("line\nnext".into()),
        });
        assert_eq!(
            frame,
            "id: 2\nevent: message\ndata: {\"content\":\"line\\nnext\",\"type\":\"content\"}\n\n"
        );
    }

    #[test]
    fn error_frames_match_the_contract() {
        let frame = encode(&StreamEvent {
            id: 9,
            kind: EventKind::Error(StreamFailure {
                message: "slow down".into(),
                code: "upstream_throttled",
                retryable: true,
            }),
        });
        assert_eq!(
            frame,
            "id: 9\nevent: error\ndata: {\"error\":\"slow down\",\"type\":\"error\",\
             \"code\":\"upstream_throttled\",\"retryable\":true}\n\n"
        );
    }
}
