//! The SSE encoder: [`StreamEvent`]s in, the contract's wire format out, one frame per event and
//! nothing held back. Frames are written by hand rather than through `axum::response::Sse` so the
//! bytes, headers and field order are exactly the public contract's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Version, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::time::{Instant, Sleep};

use crate::domain::TokenUsage;
use crate::events::{EventKind, StreamEvent};
use crate::metrics::Metrics;
use crate::rate_limit::StreamPlace;

/// How streams are written: the heartbeat interval and the reconnection hint.
#[derive(Clone)]
pub struct SseSettings {
    /// `None`: no heartbeats.
    pub heartbeat: Option<Duration>,
    pub retry_ms: u64,
    pub metrics: Arc<Metrics>,
}

const HEARTBEAT: &[u8] = b": ping\n\n";
/// Ready events written together, up to about this many bytes.
const COALESCE_BYTES: usize = 16 * 1024;
/// A frame's bytes besides its text: field names, id, JSON keys.
const FRAME_OVERHEAD: usize = 96;

/// How events become bytes on the wire: the contract's frames here, or another protocol's (the
/// OpenAI API's chunks, the AI SDK's parts). Everything else about a stream — heartbeats,
/// coalescing ready events into one write, the stream's place — is the same for all of them.
pub trait Framing: Send + Unpin + 'static {
    /// Appends `event`'s frames to `out`; `retry_ms` is set on the stream's first event.
    fn encode(&mut self, out: &mut Vec<u8>, event: &StreamEvent, retry_ms: Option<u64>);
}

/// The public contract's frames: `start`, `message`, `done`, `error`, each with its id.
pub struct ContractFraming;

impl Framing for ContractFraming {
    fn encode(&mut self, out: &mut Vec<u8>, event: &StreamEvent, retry_ms: Option<u64>) {
        encode_into(out, event, retry_ms);
    }
}

/// One SSE event as the other protocols frame it: an `id:` line when it carries one of the
/// answer's events, then a single `data:` line of JSON.
pub fn write_data(out: &mut Vec<u8>, id: Option<i64>, data: &impl Serialize) {
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut *out, data).expect("serialising plain structs cannot fail");
    out.extend_from_slice(b"\n\n");
}

/// The OpenAI and AI SDK streams' last event.
pub const DATA_DONE: &[u8] = b"data: [DONE]\n\n";

/// Streams events in the contract's frames (see [`framed_response`]).
pub fn stream_response(
    events: impl Stream<Item = StreamEvent> + Send + 'static,
    version: Version,
    settings: SseSettings,
    slot: Option<StreamPlace>,
) -> Response {
    framed_response(events, version, settings, slot, ContractFraming)
}

/// Streams events. The body has no length, so HTTP/1.1 sends it chunked and each event leaves as
/// soon as it is produced; a quiet stream gets a heartbeat comment so no proxy or load balancer
/// between here and the browser takes it for dead.
pub fn framed_response(
    events: impl Stream<Item = StreamEvent> + Send + 'static,
    version: Version,
    settings: SseSettings,
    slot: Option<StreamPlace>,
    framing: impl Framing,
) -> Response {
    settings.metrics.streams_open.inc();
    let body = Body::from_stream(SseBody {
        framing,
        metrics: settings.metrics.clone(),
        _slot: slot,
        // Fused: the coalescing loop may see the end before the body does.
        events: Box::pin(events.fuse()),
        heartbeat: settings
            .heartbeat
            .map(|every| (every, Box::pin(tokio::time::sleep(every)))),
        retry_ms: Some(settings.retry_ms),
        held: None,
        ended: false,
    });
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

/// Encodes events and interleaves heartbeats whenever nothing was written for the interval.
struct SseBody<F> {
    framing: F,
    metrics: Arc<Metrics>,
    /// The caller's place among their concurrent streams, given back when the body is dropped.
    /// A resumed stream's place among the user's streams (a new answer's is its producer's).
    _slot: Option<StreamPlace>,
    events: Pin<Box<dyn Stream<Item = StreamEvent> + Send>>,
    heartbeat: Option<(Duration, Pin<Box<Sleep>>)>,
    /// Sent once, on the first event.
    retry_ms: Option<u64>,
    /// Frames encoded but not yet handed to the connection (see `poll_next`).
    held: Option<Vec<u8>>,
    /// The terminal event has been encoded.
    ended: bool,
}

impl<F: Framing> Stream for SseBody<F> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(mut frames) = this.held.take() {
            // Back after letting the runtime's other ready tasks go first: whatever the producer
            // appended meanwhile leaves in this same write. (Waiting further rounds while each
            // brings more was measured: it costs more polls than the writes it saves.)
            this.gather(&mut frames, cx);
            return Poll::Ready(Some(Ok(Bytes::from(frames))));
        }
        match this.events.as_mut().poll_next(cx) {
            Poll::Ready(Some(event)) => {
                if let Some((every, timer)) = &mut this.heartbeat {
                    timer.as_mut().reset(Instant::now() + *every);
                }
                let mut frames = Vec::with_capacity(FRAME_OVERHEAD + event.kind.text_len());
                this.framing
                    .encode(&mut frames, &event, this.retry_ms.take());
                this.ended = event.kind.is_terminal();
                this.gather(&mut frames, cx);
                if this.ended || frames.len() >= COALESCE_BYTES {
                    return Poll::Ready(Some(Ok(Bytes::from(frames))));
                }
                // Not written yet: this task goes to the back of the run queue once, behind the
                // upstream connection and the producer if they have more ready (a provider often
                // sends several tokens in one packet). They run first, so their events share this
                // write instead of costing a syscall each; when nothing else is ready the task is
                // polled again at once, so an event waits for no timer, only for work already due.
                this.held = Some(frames);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        if let Some((every, timer)) = &mut this.heartbeat
            && timer.as_mut().poll(cx).is_ready()
        {
            timer.as_mut().reset(Instant::now() + *every);
            this.metrics.heartbeats.inc();
            return Poll::Ready(Some(Ok(Bytes::from_static(HEARTBEAT))));
        }
        Poll::Pending
    }
}

impl<F: Framing> SseBody<F> {
    /// Appends the events already waiting, up to the coalescing limit or the terminal event.
    fn gather(&mut self, frames: &mut Vec<u8>, cx: &mut Context<'_>) {
        while !self.ended && frames.len() < COALESCE_BYTES {
            let Poll::Ready(Some(next)) = self.events.as_mut().poll_next(cx) else {
                break;
            };
            self.framing.encode(frames, &next, None);
            self.ended = next.kind.is_terminal();
        }
    }
}

impl<F> Drop for SseBody<F> {
    fn drop(&mut self) {
        self.metrics.streams_open.dec();
    }
}

/// One event as framed on the wire, for the OpenAPI description (OpenAPI 3.1 documents the
/// schema of each event of a `text/event-stream`). The answer's events are never built from this.
#[derive(utoipa::ToSchema)]
#[expect(
    dead_code,
    reason = "describes the wire format for the OpenAPI document only"
)]
pub struct SseEvent {
    /// `start`, `message`, `done` or `error`.
    #[schema(pattern = "^(start|message|done|error)$")]
    event: String,
    /// Unique within the chat and increasing across its turns: what Last-Event-ID names.
    #[schema(pattern = "^[0-9]+$")]
    id: String,
    /// Reconnection delay in milliseconds; on the first event only.
    retry: Option<u64>,
    /// JSON: StartData, ContentData, DoneData or ErrorData, by `event`.
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// `event: start`: the first event of every stream.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StartData<'a> {
    chat_id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    message_id: &'a str,
}

/// `event: message`: one piece of the answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ContentData<'a> {
    content: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UsageData {
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

/// `event: done`: the answer is complete and stored.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DoneData<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    chat_id: &'a str,
    usage: UsageData,
    message_id: &'a str,
    provider: &'a str,
    model: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stopped: bool,
}

/// `event: error`: the answer failed or was cut short; nothing follows.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorData<'a> {
    error: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'a str,
    retryable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_event_id: Option<i64>,
}

/// Appends one SSE frame to `frame`: `retry` (first event only), `id`, `event`, a single `data`
/// line (JSON escapes every newline) and the blank line that ends the event. This runs once per
/// token per listener, so it writes the fields directly instead of formatting strings.
fn encode_into(frame: &mut Vec<u8>, event: &StreamEvent, retry_ms: Option<u64>) {
    let mut number = itoa::Buffer::new();
    if let Some(ms) = retry_ms {
        frame.extend_from_slice(b"retry: ");
        frame.extend_from_slice(number.format(ms).as_bytes());
        frame.push(b'\n');
    }
    let name: &[u8] = match &event.kind {
        EventKind::Start { .. } => b"start",
        EventKind::Content(_) => b"message",
        EventKind::Done(_) => b"done",
        EventKind::Error(_) => b"error",
    };
    frame.extend_from_slice(b"id: ");
    frame.extend_from_slice(number.format(event.id).as_bytes());
    frame.extend_from_slice(b"\nevent: ");
    frame.extend_from_slice(name);
    frame.extend_from_slice(b"\ndata: ");
    let written = match &event.kind {
        EventKind::Start {
            chat_id,
            message_id,
        } => serde_json::to_writer(
            &mut *frame,
            &StartData {
                chat_id,
                kind: "start",
                message_id,
            },
        ),
        EventKind::Content(text) => serde_json::to_writer(
            &mut *frame,
            &ContentData {
                content: text,
                kind: "content",
            },
        ),
        EventKind::Done(done) => serde_json::to_writer(
            &mut *frame,
            &DoneData {
                kind: "done",
                chat_id: &done.chat_id,
                usage: done.usage.into(),
                message_id: &done.message_id,
                provider: &done.provider,
                model: &done.model,
                stopped: done.stopped,
            },
        ),
        EventKind::Error(failure) => serde_json::to_writer(
            &mut *frame,
            &ErrorData {
                error: &failure.message,
                kind: "error",
                code: &failure.code,
                retryable: failure.retryable,
                last_event_id: failure.last_event_id,
            },
        ),
    };
    written.expect("serialising plain structs into a Vec cannot fail");
    frame.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::StreamFailure;

    fn encode(event: &StreamEvent, retry_ms: Option<u64>) -> Bytes {
        let mut frame = Vec::new();
        encode_into(&mut frame, event, retry_ms);
        Bytes::from(frame)
    }

    #[test]
    fn content_frames_match_the_contract() {
        let frame = encode(
            &StreamEvent {
                id: 2,
                kind: EventKind::Content("line\nnext".into()),
            },
            None,
        );
        assert_eq!(
            frame,
            "id: 2\nevent: message\ndata: {\"content\":\"line\\nnext\",\"type\":\"content\"}\n\n"
        );
    }

    #[test]
    fn error_frames_match_the_contract() {
        let frame = encode(
            &StreamEvent {
                id: 9,
                kind: EventKind::Error(StreamFailure::new("slow down", "upstream_throttled", true)),
            },
            Some(2000),
        );
        assert_eq!(
            frame,
            "retry: 2000\nid: 9\nevent: error\ndata: {\"error\":\"slow down\",\"type\":\"error\",\
             \"code\":\"upstream_throttled\",\"retryable\":true}\n\n"
        );
    }
}
