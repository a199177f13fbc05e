//! One test server that speaks three providers' real wire protocols:
//!
//! - Bedrock ConverseStream: AWS event-stream binary frames (prelude, headers, payload, CRCs) for
//!   events and exceptions, restJson errors with `x-amzn-errortype`; driven by the real AWS SDK
//!   inside mangoo through `endpoint_url`;
//! - Anthropic Messages (`/v1/messages`) and OpenAI chat completions (`/v1/chat/completions`)
//!   as SSE, with their error shapes (see `fake_sse_wires`).
//!
//! Each request takes the next queued [`Script`] (or the default one): which tokens, gated one by
//! one or not, and how it fails. The server records every request and whether each answer stream
//! ran to its end or was dropped early by the client (the cancellation mangoo must cause).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

use super::fake_sse_wires::{anthropic, openai};
use super::helpers::HANG_GUARD;

/// How one answer behaves.
#[derive(Debug, Clone)]
pub struct Script {
    pub tokens: Vec<String>,
    /// Each token waits for [`FakeUpstream::release`]: lets a test prove events are not buffered.
    pub gated: bool,
    /// Send the protocol's mid-stream error of this type instead of token number `.0`.
    pub exception_at: Option<(usize, &'static str)>,
    /// Abort the connection instead of sending token number `n`.
    pub drop_at: Option<usize>,
    /// Refuse before streaming: HTTP status and the protocol's error type.
    pub http_error: Option<(u16, &'static str)>,
    /// OpenAI only: end after the finish_reason without `data: [DONE]`, as some servers do.
    pub omit_done: bool,
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
            omit_done: false,
            usage: (12, tokens.len() as u32),
        }
    }

    /// `n` copies of one token.
    pub fn repeated(token: &str, n: usize) -> Self {
        Self {
            tokens: vec![token.to_owned(); n],
            usage: (12, n as u32),
            ..Self::tokens(&[])
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

    pub fn omit_done(mut self) -> Self {
        self.omit_done = true;
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
    /// The script failed it on purpose (exception or aborted connection).
    Failed,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// "bedrock", "anthropic" or "openai".
    pub provider: &'static str,
    /// Bedrock: the percent-decoded model id from the path; others: the body's `model`.
    pub model: String,
    pub body: Value,
    pub headers: HeaderMap,
}

#[derive(Clone)]
pub struct FakeUpstream {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
}

pub struct Inner {
    scripts: Mutex<VecDeque<Script>>,
    requests: Mutex<Vec<Recorded>>,
    outcomes: watch::Sender<Vec<Outcome>>,
    gate: Semaphore,
    /// Bumped by `/control/cut`: proxies watching it drop their connections.
    cuts: watch::Sender<u64>,
}

impl Inner {
    /// Records a request and hands out its script.
    pub fn take(&self, request: Recorded) -> Script {
        self.requests.lock().unwrap().push(request);
        self.scripts.lock().unwrap().pop_front().unwrap_or_default()
    }
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner {
            scripts: Mutex::default(),
            requests: Mutex::default(),
            outcomes: watch::Sender::new(Vec::new()),
            gate: Semaphore::new(0),
            cuts: watch::Sender::new(0),
        });
        let app = Router::new()
            .route("/model/{model}/converse-stream", post(converse_stream))
            .route("/v1/messages", post(anthropic))
            .route("/v1/chat/completions", post(openai))
            // For tests driven from outside this process (the browser tests).
            .route("/control/script", post(control_script))
            .route("/control/release", post(control_release))
            .route("/control/cut", post(control_cut))
            .route(
                "/control/outcome/{index}",
                axum::routing::get(control_outcome),
            )
            .route("/control/requests", axum::routing::get(control_requests))
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

    /// Bumped whenever a test asks connections to be cut.
    pub fn cuts(&self) -> watch::Receiver<u64> {
        self.inner.cuts.subscribe()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// Waits until the `index`-th answer stream (0-based) has ended and says how.
    pub async fn outcome(&self, index: usize) -> Outcome {
        let mut rx = self.inner.outcomes.subscribe();
        let outcomes = tokio::time::timeout(HANG_GUARD, rx.wait_for(|o| o.len() > index))
            .await
            .expect("the fake upstream stream never ended")
            .unwrap();
        outcomes[index]
    }
}

async fn control_script(State(inner): State<Arc<Inner>>, body: axum::Json<Value>) -> StatusCode {
    let tokens: Vec<String> = serde_json::from_value(body["tokens"].clone()).unwrap_or_default();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let mut script = Script::tokens(&refs);
    script.gated = body["gated"].as_bool().unwrap_or(false);
    if let Some(status) = body["http_error"].as_u64() {
        script.http_error = Some((status as u16, "ThrottlingException"));
    }
    inner.scripts.lock().unwrap().push_back(script);
    StatusCode::NO_CONTENT
}

async fn control_release(State(inner): State<Arc<Inner>>, body: axum::Json<Value>) -> StatusCode {
    inner
        .gate
        .add_permits(body["n"].as_u64().unwrap_or(1) as usize);
    StatusCode::NO_CONTENT
}

/// How many requests the fake has had: the index the next one's outcome will have, once every
/// earlier one has ended.
async fn control_requests(State(inner): State<Arc<Inner>>) -> axum::Json<Value> {
    axum::Json(json!({"count": inner.requests.lock().unwrap().len()}))
}

async fn control_cut(State(inner): State<Arc<Inner>>) -> StatusCode {
    inner.cuts.send_modify(|n| *n += 1);
    StatusCode::NO_CONTENT
}

/// Waits until the `index`-th answer stream (0-based) has ended: `{"outcome": "cancelled"}`.
async fn control_outcome(
    State(inner): State<Arc<Inner>>,
    axum::extract::Path(index): axum::extract::Path<usize>,
) -> axum::Json<Value> {
    let upstream = FakeUpstream {
        inner,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let outcome = upstream.outcome(index).await;
    axum::Json(serde_json::json!({ "outcome": format!("{outcome:?}").to_lowercase() }))
}

/// Records how a stream ended when it is dropped: dropped before `finish` means cancelled.
struct Probe {
    inner: Arc<Inner>,
    outcome: Option<Outcome>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::Cancelled);
        self.inner.outcomes.send_modify(|o| o.push(outcome));
    }
}

/// The frames of one protocol.
pub trait Wire: Send + 'static {
    fn opening(&self) -> Vec<Bytes>;
    fn token(&self, text: &str) -> Bytes;
    fn exception(&self, kind: &str) -> Bytes;
    fn closing(&self, script: &Script) -> Vec<Bytes>;
}

/// The body of a scripted answer, in any protocol.
pub fn answer_body(inner: Arc<Inner>, script: Script, wire: impl Wire) -> Body {
    let frames = async_stream::stream! {
        let mut probe = Probe { inner: inner.clone(), outcome: None };
        for frame in wire.opening() {
            yield Ok(frame);
        }
        for (i, token) in script.tokens.iter().enumerate() {
            if script.gated {
                inner.gate.acquire().await.unwrap().forget();
            }
            // Hand control back so each frame is flushed on its own, as a real server's are.
            tokio::task::yield_now().await;
            if let Some((at, kind)) = script.exception_at
                && at == i
            {
                probe.outcome = Some(Outcome::Failed);
                yield Ok(wire.exception(kind));
                return;
            }
            if script.drop_at == Some(i) {
                probe.outcome = Some(Outcome::Failed);
                yield Err(std::io::Error::other("connection dropped by the test"));
                return;
            }
            yield Ok(wire.token(token));
        }
        probe.outcome = Some(Outcome::Completed);
        for frame in wire.closing(&script) {
            yield Ok(frame);
        }
    };
    Body::from_stream(frames)
}

struct BedrockWire;

impl Wire for BedrockWire {
    fn opening(&self) -> Vec<Bytes> {
        vec![event("messageStart", json!({"role": "assistant"}))]
    }

    fn token(&self, text: &str) -> Bytes {
        event(
            "contentBlockDelta",
            json!({"contentBlockIndex": 0, "delta": {"text": text}}),
        )
    }

    fn exception(&self, kind: &str) -> Bytes {
        frame(
            "exception",
            ":exception-type",
            kind,
            json!({"message": "the model stream failed"}),
        )
    }

    fn closing(&self, script: &Script) -> Vec<Bytes> {
        let (input, output) = script.usage;
        vec![
            event("contentBlockStop", json!({"contentBlockIndex": 0})),
            event("messageStop", json!({"stopReason": "end_turn"})),
            event(
                "metadata",
                json!({
                    "usage": {"inputTokens": input, "outputTokens": output, "totalTokens": input + output},
                    "metrics": {"latencyMs": 5}
                }),
            ),
        ]
    }
}

async fn converse_stream(
    State(inner): State<Arc<Inner>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).expect("the SDK sends JSON");
    let script = inner.take(Recorded {
        provider: "bedrock",
        model,
        body,
        headers,
    });
    if let Some((status, error_type)) = script.http_error {
        let body = json!({"message": format!("{error_type} from the test endpoint")});
        return (
            StatusCode::from_u16(status).unwrap(),
            [
                ("x-amzn-errortype", error_type),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
            .into_response();
    }
    Response::builder()
        .header("content-type", "application/vnd.amazon.eventstream")
        .body(answer_body(inner, script, BedrockWire))
        .unwrap()
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
