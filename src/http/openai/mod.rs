//! The OpenAI-compatible API: `POST /v1/chat/completions`, `GET /v1/models` and the resume of
//! a completion, for the clients that take a `base_url` (the official SDKs, LangChain, Open
//! WebUI, …). Underneath it is the same chat service as Mangoo's own routes: a request is one
//! turn of a stored chat, its answer survives the client's connection, can be resumed on any
//! instance with `Last-Event-ID` and stopped from anywhere.
//!
//! A request without `X-Mangoo-Chat-Id` starts a new chat holding the conversation it brings;
//! with it, it is the next turn of that chat. Every response names the chat in
//! `X-Mangoo-Chat-Id` (and the answer in `X-Mangoo-Message-Id`).

mod errors;
mod wire;

pub use errors::openai_errors;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Serialize;

use super::AppState;
use super::chat_stream::{last_event_id, stream_slot};
use super::extract::{AuthUser, ChatIdParam, JsonBody, query_param};
use super::sse::framed_response;
use crate::chat::{EventStream, StartedTurn};
use crate::events::EventKind;
use crate::http::error::ApiError;
use crate::store::now_ms;
use errors::{OpenAiError, failure_body};
use wire::{Completion, CompletionBody, CompletionFraming, CompletionRequest};

const CHAT_ID_HEADER: HeaderName = HeaderName::from_static("x-mangoo-chat-id");
const MESSAGE_ID_HEADER: HeaderName = HeaderName::from_static("x-mangoo-message-id");

const CHUNKS_DESCRIPTION: &str = "`stream: true`: Server-Sent Events as OpenAI sends them, each \
    `data:` a `chat.completion.chunk` (a role chunk, content deltas, a chunk with \
    `finish_reason`, the usage chunk with `stream_options.include_usage`), then `data: [DONE]`. \
    Each chunk's `id:` is the Mangoo event it carries, for `Last-Event-ID`.";

const ANSWER_DESCRIPTION: &str = "`stream: false`: the whole answer (`chat.completion`). \
    `stream: true`: Server-Sent Events as OpenAI sends them, each `data:` a \
    `chat.completion.chunk`, then `data: [DONE]`.";

#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body(content = CompletionRequest, content_type = "application/json"),
    params(("x-mangoo-chat-id" = Option<String>, Header, description = "Continue this stored chat instead of starting a new one")),
    responses(
        (status = 200, description = ANSWER_DESCRIPTION,
            content((CompletionBody = "application/json"), (String = "text/event-stream")),
            headers(("x-mangoo-chat-id" = String, description = "The chat this turn is stored in"))),
        (status = 400, description = "Bad request", body = OpenAiError),
        (status = 401, description = "No valid token", body = OpenAiError),
        (status = 403, description = "A storage quota is used up", body = OpenAiError),
        (status = 404, description = "Unknown model (bot), or no such chat of the caller's", body = OpenAiError),
        (status = 409, description = "The chat already has an answer in progress", body = OpenAiError),
        (status = 413, description = "Body too large", body = OpenAiError),
        (status = 415, description = "Body not JSON", body = OpenAiError),
        (status = 429, description = "Rate limited, or too many streams open", body = OpenAiError),
        (status = 502, description = "The model failed (unstreamed request)", body = OpenAiError),
        (status = 503, description = "Draining, or the model busy or missing", body = OpenAiError),
        (status = 504, description = "The model did not answer in time (unstreamed request)", body = OpenAiError),
    ),
    security(("bearer" = [])))]
pub async fn chat_completions(
    State(state): State<AppState>,
    version: Version,
    headers: HeaderMap,
    AuthUser(user): AuthUser,
    JsonBody(request): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let chat_id = chat_id_header(&headers)?;
    let requested = request.into_turn(chat_id)?;
    let model = requested.turn.bot_id.clone();
    let slot = stream_slot(&state, &user).await?;
    let started = state.chat.start_turn(&user, requested.turn, slot).await?;
    let StartedTurn {
        chat_id,
        message_id,
        max_tokens,
        events,
    } = started;
    let completion = Completion::new(&message_id, now_ms(), model, max_tokens);
    let mut response = match requested.stream {
        true => {
            let framing = CompletionFraming {
                completion,
                include_usage: requested.include_usage,
            };
            framed_response(events, version, state.sse.clone(), None, framing)
        }
        false => whole_answer(completion, events).await,
    };
    name_the_answer(&mut response, &chat_id, &message_id);
    Ok(response)
}

/// `stream: false`: waits for the answer's end and answers with all of it, or with the error it
/// ended in (the text streamed before it is stored with the chat either way).
async fn whole_answer(completion: Completion, mut events: EventStream) -> Response {
    let mut text = String::new();
    while let Some(event) = events.next().await {
        match event.kind {
            EventKind::Content(piece) => text.push_str(&piece),
            EventKind::Done(done) => return Json(completion.body(text, &done)).into_response(),
            EventKind::Error(failure) => {
                let (status, body) = failure_body(&failure);
                return (status, Json(body)).into_response();
            }
            EventKind::Start { .. } => {}
        }
    }
    ApiError::Internal("an answer's events ended without a terminal event".into()).into_response()
}

/// Picks a completion up again after a dropped connection: the chunks after `Last-Event-ID`
/// (header, or `?last_event_id=`), live while the answer is generated, from storage after.
/// `204` when there is nothing left to send.
#[utoipa::path(get, path = "/v1/chats/{chat_id}/completions/stream", tag = "openai",
    params(
        ("chat_id" = String, Path),
        ("last_event_id" = Option<i64>, Query, description = "Instead of the Last-Event-ID header"),
        ("include_usage" = Option<bool>, Query, description = "End with the usage chunk, as `stream_options.include_usage` does"),
        ("last-event-id" = Option<String>, Header, description = "The id of the last chunk the client saw"),
    ),
    responses(
        (status = 200, description = CHUNKS_DESCRIPTION, content_type = "text/event-stream", body = String),
        (status = 204, description = "Nothing left to send"),
        (status = 400, description = "Last-Event-ID is not an event id", body = OpenAiError),
        (status = 401, description = "No valid token", body = OpenAiError),
        (status = 404, description = "No such chat of the caller's", body = OpenAiError),
        (status = 429, description = "Rate limited, or too many streams open", body = OpenAiError),
    ),
    security(("bearer" = [])))]
pub async fn resume_completion(
    State(state): State<AppState>,
    version: Version,
    AuthUser(user): AuthUser,
    ChatIdParam(chat_id): ChatIdParam,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let after = last_event_id(&headers, query.as_deref())?;
    let include_usage = query_param(query.as_deref(), "include_usage").as_deref() == Some("true");
    let (chat, answer) = state.chat.latest_answer(&user, &chat_id).await?;
    let Some(answer) = answer else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let slot = stream_slot(&state, &user).await?;
    let Some(events) = state.chat.resume(&user, &chat_id, after).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let max_tokens = state.chat.max_tokens_of(&chat.bot_id).unwrap_or(u32::MAX);
    let completion = Completion::new(&answer.id, answer.created_at_ms, chat.bot_id, max_tokens);
    let framing = CompletionFraming {
        completion,
        include_usage,
    };
    let mut response = framed_response(events, version, state.sse.clone(), Some(slot), framing);
    name_the_answer(&mut response, &chat_id, &answer.id);
    Ok(response)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelList {
    object: &'static str,
    data: Vec<Model>,
}

/// A bot, as OpenAI lists a model.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Model {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: String,
}

fn models(state: &AppState) -> impl Iterator<Item = Model> {
    state.chat.bots().into_iter().map(|bot| Model {
        id: bot.id,
        object: "model",
        created: 0,
        owned_by: bot.provider,
    })
}

/// The bots the caller may talk to, as models.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses(
        (status = 200, description = "The bots, as models", body = ModelList),
        (status = 401, description = "No valid token", body = OpenAiError),
        (status = 429, description = "Rate limited", body = OpenAiError),
    ),
    security(("bearer" = [])))]
pub async fn list_models(
    State(state): State<AppState>,
    AuthUser(_user): AuthUser,
) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: models(&state).collect(),
    })
}

#[utoipa::path(get, path = "/v1/models/{model}", tag = "openai",
    params(("model" = String, Path, description = "A bot id")),
    responses(
        (status = 200, description = "The bot, as a model", body = Model),
        (status = 401, description = "No valid token", body = OpenAiError),
        (status = 404, description = "No such bot", body = OpenAiError),
        (status = 429, description = "Rate limited", body = OpenAiError),
    ),
    security(("bearer" = [])))]
pub async fn get_model(
    State(state): State<AppState>,
    AuthUser(_user): AuthUser,
    ChatIdParam(model): ChatIdParam,
) -> Result<Json<Model>, ApiError> {
    models(&state)
        .find(|m| m.id == model)
        .map(Json)
        .ok_or_else(|| ApiError::from(crate::chat::ChatError::BotNotFound(model)))
}

/// `X-Mangoo-Chat-Id`: the stored chat to continue.
fn chat_id_header(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(&CHAT_ID_HEADER) else {
        return Ok(None);
    };
    let id = value.to_str().map(str::trim).unwrap_or_default();
    if id.is_empty() || id.len() > 128 {
        return Err(ApiError::bad_request(
            "invalid_request",
            "X-Mangoo-Chat-Id must be a chat id of 1 to 128 characters",
        ));
    }
    Ok(Some(id.to_owned()))
}

fn name_the_answer(response: &mut Response, chat_id: &str, message_id: &str) {
    let headers = response.headers_mut();
    for (name, value) in [(CHAT_ID_HEADER, chat_id), (MESSAGE_ID_HEADER, message_id)] {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
}
