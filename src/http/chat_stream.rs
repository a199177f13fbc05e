//! `POST /api/v1/chat/stream` (JSON body) and `GET /api/v1/chat/stream` (query string, for the
//! browser's EventSource): the same answer stream. `GET /api/v1/chats/{chat_id}/stream` picks an
//! answer up again after a dropped connection, and `POST /api/v1/chats/{chat_id}/stop` ends one.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::extract::{AuthUser, ChatIdParam, JsonBody, parse_query, query_param};
use super::sse::{SseEvent, stream_response};
use crate::auth::UserId;
use crate::chat::TurnRequest;
use crate::http::error::{ApiError, ErrorBody};
use crate::rate_limit::StreamPlace;

/// A message for a bot: a new chat, or the next turn of `chat_id`.
/// The answer's events, in the public contract's shape (schemas: StartData, ContentData,
/// DoneData, ErrorData).
const STREAM_DESCRIPTION: &str = "Server-Sent Events, each with an `id:` line: `start` (StartData), \
    then `message` (ContentData) per piece of text, then exactly one terminal event: `done` \
    (DoneData) or `error` (ErrorData). Quiet streams get `: ping` comments; the first event \
    carries `retry:`.";

#[derive(Debug, Deserialize, utoipa::ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamRequest {
    bot_id: String,
    message: String,
    #[serde(default)]
    chat_id: Option<String>,
}

impl StreamRequest {
    fn into_turn(self) -> Result<TurnRequest, ApiError> {
        if self.bot_id.trim().is_empty() {
            return Err(ApiError::bad_request(
                "invalid_request",
                "bot_id must not be empty",
            ));
        }
        // An empty chat_id (a form or URL built with a blank field) means a new chat.
        let chat_id = match self.chat_id.filter(|id| !id.is_empty()) {
            Some(id) if id.len() > 128 => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "chat_id must be at most 128 characters",
                ));
            }
            other => other,
        };
        Ok(TurnRequest::new(self.bot_id, self.message, chat_id))
    }
}

#[utoipa::path(post, path = "/api/v1/chat/stream", tag = "chat",
    request_body(content = StreamRequest, content_type = "application/json"),
    params(("last-event-id" = Option<String>, Header, description = "A reconnection: resume the answer this request started")),
    responses(
        (status = 200, description = STREAM_DESCRIPTION, content_type = "text/event-stream", body = SseEvent),
        (status = 204, description = "Reconnection with nothing left to send"),
        (status = 400, description = "Malformed body, bad field, empty or too long message", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "Unknown bot, or no such chat of the caller's", body = ErrorBody),
        (status = 409, description = "The chat already has an answer in progress", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 429, description = "Rate limited, or too many streams open", body = ErrorBody),
        (status = 503, description = "Draining, or the local model busy or missing", body = ErrorBody),
    ),
    security(("bearer" = []), ("token" = [])))]
pub async fn post_stream(
    State(state): State<AppState>,
    version: Version,
    headers: HeaderMap,
    AuthUser(user): AuthUser,
    JsonBody(request): JsonBody<StreamRequest>,
) -> Result<Response, ApiError> {
    answer(&state, version, &headers, &user, request.into_turn()?).await
}

#[utoipa::path(get, path = "/api/v1/chat/stream", tag = "chat",
    params(
        StreamRequest,
        ("ticket" = Option<String>, Query, description = "A stream ticket instead of a token"),
        ("last-event-id" = Option<String>, Header, description = "A reconnection: resume the answer this request started"),
    ),
    responses(
        (status = 200, description = STREAM_DESCRIPTION, content_type = "text/event-stream", body = SseEvent),
        (status = 204, description = "Reconnection with nothing left to send"),
        (status = 400, description = "Missing or bad parameter, empty or too long message", body = ErrorBody),
        (status = 401, description = "No valid token or ticket", body = ErrorBody),
        (status = 404, description = "Unknown bot, or no such chat of the caller's", body = ErrorBody),
        (status = 409, description = "The chat already has an answer in progress", body = ErrorBody),
        (status = 429, description = "Rate limited, or too many streams open", body = ErrorBody),
        (status = 503, description = "Draining, or the local model busy or missing", body = ErrorBody),
    ),
    security(("bearer" = []), ("token" = [])))]
pub async fn get_stream(
    State(state): State<AppState>,
    version: Version,
    headers: HeaderMap,
    AuthUser(user): AuthUser,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let request: StreamRequest = parse_query(query.as_deref())?;
    answer(&state, version, &headers, &user, request.into_turn()?).await
}

/// A new answer, or — when the request carries Last-Event-ID, as EventSource's automatic
/// reconnection does — the rest of the answer it started.
async fn answer(
    state: &AppState,
    version: Version,
    headers: &HeaderMap,
    user: &UserId,
    request: TurnRequest,
) -> Result<Response, ApiError> {
    let slot = stream_slot(state, user).await?;
    // A new answer's place is held by its producer for as long as it generates — under the
    // "continue" policy that outlasts the client's connection — so the cap counts generations.
    let (events, body_slot) = match last_event_id(headers, None)? {
        Some(after) => match state.chat.reconnect(user, &request, after).await? {
            Some(events) => (events, Some(slot)),
            None => return Ok(StatusCode::NO_CONTENT.into_response()),
        },
        None => (
            state.chat.start_turn(user, request, slot).await?.events,
            None,
        ),
    };
    Ok(stream_response(
        events,
        version,
        state.sse.clone(),
        body_slot,
    ))
}

/// One of the caller's concurrent-stream places, taken before anything starts (a refused
/// request leaves no trace).
pub(super) async fn stream_slot(state: &AppState, user: &UserId) -> Result<StreamPlace, ApiError> {
    state.streams.take(user.as_str()).await?.ok_or_else(|| {
        let reason = crate::metrics::ReasonLabels {
            reason: "streams".into(),
        };
        state.metrics.rate_limited.get_or_create(&reason).inc();
        ApiError::TooManyRequests {
            code: "too_many_streams",
            message: "too many streams open at once; close one first".into(),
            retry_after: std::time::Duration::from_secs(1),
            limit: None,
            policy: 0,
        }
    })
}

/// The `Last-Event-ID` header, else the `last_event_id` query parameter. Ids are positive, so a
/// negative one names nothing sent yet: it resumes from the start, like `0`, on either log.
pub(super) fn last_event_id(
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Option<i64>, ApiError> {
    headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .or_else(|| query_param(query, "last_event_id"))
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            v.trim().parse::<i64>().map(|id| id.max(0)).map_err(|_| {
                ApiError::bad_request("invalid_request", "Last-Event-ID must be an event id")
            })
        })
        .transpose()
}

/// Replays the chat's latest answer after `Last-Event-ID` (header, or `?last_event_id=`), then
/// follows it live if it is still being generated. `204 No Content` when the client already has
/// everything, which also tells EventSource to stop reconnecting.
#[utoipa::path(get, path = "/api/v1/chats/{chat_id}/stream", tag = "chat",
    params(
        ("chat_id" = String, Path),
        ("last_event_id" = Option<i64>, Query, description = "Instead of the Last-Event-ID header"),
        ("ticket" = Option<String>, Query, description = "A stream ticket instead of a token"),
        ("last-event-id" = Option<String>, Header, description = "The last event id the client saw"),
    ),
    responses(
        (status = 200, description = STREAM_DESCRIPTION, content_type = "text/event-stream", body = SseEvent),
        (status = 204, description = "Nothing left to send"),
        (status = 400, description = "Last-Event-ID is not an event id", body = ErrorBody),
        (status = 401, description = "No valid token or ticket", body = ErrorBody),
        (status = 404, description = "No such chat of the caller's", body = ErrorBody),
        (status = 429, description = "Rate limited, or too many streams open", body = ErrorBody),
    ),
    security(("bearer" = []), ("token" = [])))]
pub async fn resume_stream(
    State(state): State<AppState>,
    version: Version,
    AuthUser(user): AuthUser,
    ChatIdParam(chat_id): ChatIdParam,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let after = last_event_id(&headers, query.as_deref())?;
    let slot = stream_slot(&state, &user).await?;
    match state.chat.resume(&user, &chat_id, after).await? {
        Some(events) => Ok(stream_response(
            events,
            version,
            state.sse.clone(),
            Some(slot),
        )),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Stopped {
    chat_id: String,
    /// Whether an answer was running (and is now stopped).
    stopped: bool,
}

#[utoipa::path(post, path = "/api/v1/chats/{chat_id}/stop", tag = "chat",
    params(("chat_id" = String, Path)),
    responses(
        (status = 200, description = "Whether an answer was running (and is now stopped)", body = Stopped),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such chat of the caller's", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn stop(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ChatIdParam(chat_id): ChatIdParam,
) -> Result<Json<Stopped>, ApiError> {
    let stopped = state.chat.stop(&user, &chat_id).await?;
    Ok(Json(Stopped { chat_id, stopped }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Ticket {
    ticket: String,
    /// Seconds it stays valid (once).
    expires_in: u64,
}

/// `POST /api/v1/stream-tickets` (bearer auth): a single-use ticket, valid for 60 s, that the GET
/// stream endpoints take as `?ticket=` instead of a token in the URL.
#[utoipa::path(post, path = "/api/v1/stream-tickets", tag = "chat",
    responses(
        (status = 201, description = "A single-use ticket for one GET stream", body = Ticket),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Too many outstanding tickets", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn issue_ticket(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<(StatusCode, Json<Ticket>), ApiError> {
    let ticket = state
        .tickets
        .issue(&user)
        .await?
        .ok_or_else(|| ApiError::Unavailable {
            code: "service_unavailable",
            message: "too many outstanding tickets; retry shortly".into(),
            retryable: true,
        })?;
    let expires_in = crate::auth::tickets::TICKET_TTL.as_secs();
    Ok((StatusCode::CREATED, Json(Ticket { ticket, expires_in })))
}
