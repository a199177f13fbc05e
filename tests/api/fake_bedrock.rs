//! A Bedrock ConverseStream endpoint for the test suite. It speaks the real wire protocol: AWS
//! event-stream binary frames (prelude, headers, payload, CRCs) for events and exceptions, and
//! restJson errors with `x-amzn-errortype` before the stream. The real AWS SDK inside mangoo is
//! pointed at it through `endpoint_url`.
//!
//! Each request takes the next queued [`Script`] (or the default one): how many tokens, how they
//! are paced, and how it fails. The endpoint records every request body and whether each answer
//! stream ran to its end or was dropped early by the client (the cancellation mangoo must cause).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

use super::helpers::HANG_GUARD;

/// How one answer behaves.
#[derive(Debug, Clone)]
pub struct Script {
    pub tokens: Vec<String>,
    /// Each token waits for [`FakeBedrock::release`]: lets a test prove events are not buffered.
    pub gated: bool,
    /// Send an exception frame of this type instead of token number `.0`.
    pub exception_at: Option<(usize, &'static str)>,
    /// Abort the connection instead of sending token number `n`.
    pub drop_at: Option<usize>,
    /// Refuse before streaming: HTTP status and `x-amzn-errortype`.
    pub http_error: Option<(u16, &'static str)>,
    pub usage: (u32, u32),
}

impl Default for Script {
    fn default() -> Self {
        Self::tokens(&["Hello", ",", " world", "!"])
    }
}

impl Script {
    pub fn tokens(tokens: &[&str]) -> Self {
        Self {
            tokens: tokens.iter().map(|t| (*t).to_owned()).collect(),
            gated: false,
            exception_at: None,
            drop_at: None,
            http_error: None,
            usage: (12, tokens.len() as u32),
        }
    }

    pub fn gated(mut self) -> Self {
        self.gated = true;
        self
    }

    pub fn exception_at(mut self, index: usize, kind: &'static str) -> Self {
        self.exception_at = Some((index, kind));
        self
    }

    pub fn drop_at(mut self, index: usize) -> Self {
        self.drop_at = Some(index);
        self
    }

    pub fn http_error(status: u16, error_type: &'static str) -> Self {
        Self {
            http_error: Some((status, error_type)),
            ..Self::tokens(&[])
        }
    }
}

/// How an answer stream on the fake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every frame was sent.
    Completed,
    /// The client dropped the stream before the end.
    Cancelled,
    /// The script failed it on purpose (exception frame or aborted connection).
    Failed,
}

#[derive(Clone)]
pub struct FakeBedrock {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
}

struct Inner {
    scripts: Mutex<VecDeque<Script>>,
    requests: Mutex<Vec<(String, Value)>>,
    outcomes: watch::Sender<Vec<Outcome>>,
    gate: Semaphore,
}

impl FakeBedrock {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner {
            scripts: Mutex::default(),
            requests: Mutex::default(),
            outcomes: watch::Sender::new(Vec::new()),
            gate: Semaphore::new(0),
        });
        let app = Router::new()
            .route("/model/{model}/converse-stream", post(converse_stream))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { inner, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next request follows this script (then the default one).
    pub fn push(&self, script: Script) {
        self.inner.scripts.lock().unwrap().push_back(script);
    }

    /// Lets `n` more gated tokens go.
    pub fn release(&self, n: usize) {
        self.inner.gate.add_permits(n);
    }

    /// Every request so far: the percent-decoded model id and the JSON body.
    pub fn requests(&self) -> Vec<(String, Value)> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// Waits until the `index`-th answer stream (0-based) has ended and says how.
    pub async fn outcome(&self, index: usize) -> Outcome {
        let mut rx = self.inner.outcomes.subscribe();
        let outcomes = tokio::time::timeout(HANG_GUARD, rx.wait_for(|o| o.len() > index))
            .await
            .expect("the fake Bedrock stream never ended")
            .unwrap();
        outcomes[index]
    }
}

/// Records how a stream ended when it is dropped: dropped before `finish` means cancelled.
struct Probe {
    inner: Arc<Inner>,
    outcome: Option<Outcome>,
}

impl Probe {
    fn finish(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::Cancelled);
        self.inner.outcomes.send_modify(|o| o.push(outcome));
    }
}

async fn converse_stream(
    State(inner): State<Arc<Inner>>,
    Path(model): Path<String>,
    body: Bytes,
) -> Response {
    let request: Value = serde_json::from_slice(&body).expect("the SDK sends JSON");
    inner.requests.lock().unwrap().push((model, request));
    let script = inner
        .scripts
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_default();
    if let Some((status, error_type)) = script.http_error {
        let status = StatusCode::from_u16(status).unwrap();
        let body = json!({"message": format!("{error_type} from the test endpoint")});
        return (
            status,
            [
                ("x-amzn-errortype", error_type),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
            .into_response();
    }
    let frames = answer_frames(inner, script);
    Response::builder()
        .header("content-type", "application/vnd.amazon.eventstream")
        .body(Body::from_stream(frames))
        .unwrap()
}

fn answer_frames(
    inner: Arc<Inner>,
    script: Script,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    async_stream::stream! {
        let mut probe = Probe { inner: inner.clone(), outcome: None };
        yield Ok(event("messageStart", json!({"role": "assistant"})));
        for (i, token) in script.tokens.iter().enumerate() {
            if script.gated {
                inner.gate.acquire().await.unwrap().forget();
            }
            // Hand control back so each frame is flushed on its own, as a real server's are.
            tokio::task::yield_now().await;
            if let Some((at, kind)) = script.exception_at
                && at == i
            {
                probe.finish(Outcome::Failed);
                yield Ok(exception(kind, "the model stream failed"));
                return;
            }
            if script.drop_at == Some(i) {
                probe.finish(Outcome::Failed);
                yield Err(std::io::Error::other("connection dropped by the test"));
                return;
            }
            yield Ok(event(
                "contentBlockDelta",
                json!({"contentBlockIndex": 0, "delta": {"text": token}}),
            ));
        }
        yield Ok(event("contentBlockStop", json!({"contentBlockIndex": 0})));
        yield Ok(event("messageStop", json!({"stopReason": "end_turn"})));
        let (input, output) = script.usage;
        probe.finish(Outcome::Completed);
        yield Ok(event(
            "metadata",
            json!({
                "usage": {"inputTokens": input, "outputTokens": output, "totalTokens": input + output},
                "metrics": {"latencyMs": 5}
            }),
        ));
    }
}

fn frame(message_type: &str, type_header: &'static str, kind: &str, payload: Value) -> Bytes {
    let message = Message::new(serde_json::to_vec(&payload).unwrap())
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String(message_type.to_owned().into()),
        ))
        .add_header(Header::new(
            type_header,
            HeaderValue::String(kind.to_owned().into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/json".into()),
        ));
    let mut buf = Vec::new();
    write_message_to(&message, &mut buf).unwrap();
    buf.into()
}

fn event(kind: &str, payload: Value) -> Bytes {
    frame("event", ":event-type", kind, payload)
}

fn exception(kind: &str, message: &str) -> Bytes {
    frame(
        "exception",
        ":exception-type",
        kind,
        json!({"message": message}),
    )
}
