//! `GET /api/v1/diagnostics/stream`: a stream in the answer format, paced by the server and
//! stamped with its send times, that never calls a model. `mangoo probe` times its events on
//! arrival to find what buffers or cuts streams between Mangoo and its clients: it goes through
//! the same encoder, headers, heartbeats, authentication (header, `?token=`, `?ticket=`), rate
//! limits and stream cap as an answer, so whatever the path does to one it does to the other.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;

use super::AppState;
use super::chat_stream::{last_event_id, stream_slot};
use super::extract::{AuthUser, parse_query};
use super::sse::{SseEvent, stream_response};
use crate::domain::TokenUsage;
use crate::events::{DoneEvent, EventKind, StreamEvent};
use crate::http::error::{ApiError, ErrorBody};

/// The chat and message ids diagnostics events carry: no chat is stored.
pub const DIAGNOSTICS_ID: &str = "diagnostics";
const MAX_EVENTS: u32 = 1000;
const MAX_INTERVAL_MS: u64 = 10_000;
const MAX_SILENCE_SECS: u64 = 900;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiagnosticsQuery {
    /// Paced `message` events to send, 1 to 1000 (default 10).
    events: Option<u32>,
    /// Milliseconds between two of them, 0 to 10000 (default 100).
    interval_ms: Option<u64>,
    /// Seconds of silence (heartbeats only) after them, before `done`: 0 to 900 (default 0).
    silence_secs: Option<u64>,
    /// `false` sends no heartbeats, to measure how long the path lets a silent stream live.
    heartbeats: Option<bool>,
}

/// What to send, checked.
struct Pacing {
    events: u32,
    interval: Duration,
    silence: Duration,
    heartbeats: bool,
}

impl DiagnosticsQuery {
    fn pacing(self) -> Result<Pacing, ApiError> {
        let events = self.events.unwrap_or(10);
        let interval_ms = self.interval_ms.unwrap_or(100);
        let silence_secs = self.silence_secs.unwrap_or(0);
        if !(1..=MAX_EVENTS).contains(&events)
            || interval_ms > MAX_INTERVAL_MS
            || silence_secs > MAX_SILENCE_SECS
        {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!(
                    "events must be 1 to {MAX_EVENTS}, interval_ms at most {MAX_INTERVAL_MS}, \
                     silence_secs at most {MAX_SILENCE_SECS}"
                ),
            ));
        }
        Ok(Pacing {
            events,
            interval: Duration::from_millis(interval_ms),
            silence: Duration::from_secs(silence_secs),
            heartbeats: self.heartbeats.unwrap_or(true),
        })
    }
}

/// Each `message` event's `content` is `{"seq":N,"sent_at_ms":T}`: its number from 1 and the
/// server's clock (Unix milliseconds) when it was handed to the connection.
#[utoipa::path(get, path = "/api/v1/diagnostics/stream", tag = "diagnostics",
    params(
        DiagnosticsQuery,
        ("ticket" = Option<String>, Query, description = "A stream ticket instead of a token"),
        ("last-event-id" = Option<String>, Header, description = "Resume after this event"),
    ),
    responses(
        (status = 200, description = "`start`, then `events` `message` events `interval_ms` apart whose `content` is `{\"seq\":N,\"sent_at_ms\":T}` (the server's send time), then `silence_secs` of heartbeats only, then `done`; ids 1, 2, 3… With Last-Event-ID, the events after it.", content_type = "text/event-stream", body = SseEvent),
        (status = 204, description = "Last-Event-ID is past the end: nothing left to send"),
        (status = 400, description = "A parameter out of range", body = ErrorBody),
        (status = 401, description = "No valid token or ticket", body = ErrorBody),
        (status = 429, description = "Rate limited, or too many streams open", body = ErrorBody),
    ),
    security(("bearer" = []), ("token" = [])))]
pub async fn diagnostics_stream(
    State(state): State<AppState>,
    version: Version,
    headers: HeaderMap,
    AuthUser(user): AuthUser,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let parsed: DiagnosticsQuery = parse_query(query.as_deref())?;
    let pacing = parsed.pacing()?;
    let after = last_event_id(&headers, query.as_deref())?.unwrap_or(0);
    if after > i64::from(pacing.events) + 1 {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let slot = stream_slot(&state, &user).await?;
    let mut settings = state.sse.clone();
    if !pacing.heartbeats {
        settings.heartbeat = None;
    }
    Ok(stream_response(
        paced(pacing, after),
        version,
        settings,
        Some(slot),
    ))
}

/// The events after `after`: the pacing restarts from the first one still to send.
fn paced(pacing: Pacing, after: i64) -> impl Stream<Item = StreamEvent> + Send + 'static {
    let last_message_id = i64::from(pacing.events) + 1;
    async_stream::stream! {
        if after < 1 {
            yield StreamEvent {
                id: 1,
                kind: EventKind::Start {
                    chat_id: DIAGNOSTICS_ID.into(),
                    message_id: DIAGNOSTICS_ID.into(),
                },
            };
        }
        let mut next = tokio::time::Instant::now();
        for id in (after + 1).max(2)..=last_message_id {
            tokio::time::sleep_until(next).await;
            next += pacing.interval;
            let content = format!(r#"{{"seq":{},"sent_at_ms":{}}}"#, id - 1, unix_ms());
            yield StreamEvent { id, kind: EventKind::Content(Arc::from(content)) };
        }
        if after <= last_message_id {
            tokio::time::sleep(pacing.silence).await;
        }
        yield StreamEvent {
            id: last_message_id + 1,
            kind: EventKind::Done(DoneEvent {
                chat_id: DIAGNOSTICS_ID.into(),
                message_id: DIAGNOSTICS_ID.into(),
                usage: TokenUsage::default(),
                provider: DIAGNOSTICS_ID.into(),
                model: DIAGNOSTICS_ID.into(),
                stopped: false,
            }),
        };
    }
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}
