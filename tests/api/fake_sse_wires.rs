//! The SSE-speaking halves of the fake upstream: Anthropic's Messages stream and OpenAI's chat
//! completion chunks, each with its own error shapes, plus the quirks real compatible servers
//! send (empty `finish_reason`, `usage: {}`, chunks without choices, pings).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::fake_upstream::{Inner, Recorded, Script, Wire, answer_body};

fn sse(event: Option<&str>, data: &Value) -> Bytes {
    match event {
        Some(name) => format!("event: {name}\ndata: {data}\n\n").into(),
        None => format!("data: {data}\n\n").into(),
    }
}

fn record(inner: &Inner, provider: &'static str, headers: HeaderMap, body: &Bytes) -> Script {
    let body: Value = serde_json::from_slice(body).expect("JSON request");
    inner.take(Recorded {
        provider,
        model: body["model"].as_str().unwrap_or_default().to_owned(),
        body,
        headers,
    })
}

fn stream_response(body: axum::body::Body) -> Response {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

pub struct AnthropicWire;

impl Wire for AnthropicWire {
    fn opening(&self) -> Vec<Bytes> {
        vec![
            sse(
                Some("message_start"),
                &json!({"type": "message_start", "message": {
                    "id": "msg_1", "type": "message", "role": "assistant", "content": [],
                    "model": "claude-test", "stop_reason": null,
                    "usage": {"input_tokens": 12, "output_tokens": 1}
                }}),
            ),
            sse(
                Some("content_block_start"),
                &json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
            ),
            sse(Some("ping"), &json!({"type": "ping"})),
        ]
    }

    fn token(&self, text: &str) -> Bytes {
        sse(
            Some("content_block_delta"),
            &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": text}}),
        )
    }

    fn exception(&self, kind: &str) -> Bytes {
        sse(
            Some("error"),
            &json!({"type": "error", "error": {"type": kind, "message": "Overloaded"}}),
        )
    }

    fn closing(&self, script: &Script) -> Vec<Bytes> {
        vec![
            sse(
                Some("content_block_stop"),
                &json!({"type": "content_block_stop", "index": 0}),
            ),
            sse(
                Some("message_delta"),
                &json!({"type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                        "usage": {"output_tokens": script.usage.1}}),
            ),
            sse(Some("message_stop"), &json!({"type": "message_stop"})),
        ]
    }
}

pub async fn anthropic(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let script = record(&inner, "anthropic", headers, &body);
    if let Some((status, kind)) = script.http_error {
        let body =
            json!({"type": "error", "error": {"type": kind, "message": "refused by the test"}});
        return (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    }
    stream_response(answer_body(inner, script, AnthropicWire))
}

pub struct OpenAiWire {
    omit_done: bool,
}

fn chunk(delta: Value, finish_reason: Value) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "test",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
}

impl Wire for OpenAiWire {
    fn opening(&self) -> Vec<Bytes> {
        // llama.cpp-style opening: the role, no content, and an empty (not null) finish_reason.
        vec![sse(
            None,
            &chunk(json!({"role": "assistant", "content": ""}), json!("")),
        )]
    }

    fn token(&self, text: &str) -> Bytes {
        sse(None, &chunk(json!({"content": text}), Value::Null))
    }

    fn exception(&self, kind: &str) -> Bytes {
        sse(
            None,
            &json!({"error": {"message": "the model crashed", "type": kind, "code": null}}),
        )
    }

    fn closing(&self, script: &Script) -> Vec<Bytes> {
        let (input, output) = script.usage;
        let mut frames = vec![
            sse(
                None,
                &json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {}}),
            ),
            sse(
                None,
                &json!({"choices": [], "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output}}),
            ),
        ];
        if !self.omit_done {
            frames.push("data: [DONE]\n\n".into());
        }
        frames
    }
}

pub async fn openai(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let script = record(&inner, "openai", headers, &body);
    if let Some((status, kind)) = script.http_error {
        let body = json!({"error": {"message": "refused by the test", "type": kind, "code": null}});
        return (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    }
    let wire = OpenAiWire {
        omit_done: script.omit_done,
    };
    stream_response(answer_body(inner, script, wire))
}
