//! The Vercel AI SDK's chat protocol: `POST /api/v1/ai-sdk/chat` takes what `useChat`'s
//! `DefaultChatTransport` sends and answers with the UI message stream; `GET
//! /api/v1/ai-sdk/chat/{chatId}/stream` is its `resume: true` (the running answer from its start,
//! or `204`). The chat is the client's `id`, stored by Mangoo: the answer survives a reload,
//! resumes on any instance and stops from anywhere (`POST /api/v1/chats/{chatId}/stop`).
//!
//! `useChat` sends the whole conversation every time. A chat Mangoo does not hold yet starts
//! with it; a chat it holds takes the last message as its next question, after rewinding to
//! where the client's copy ends when that is shorter (an edited question, a regenerated answer).

mod wire;

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::chat_stream::stream_slot;
use super::extract::{AuthUser, ChatIdParam, JsonBody};
use super::sse::framed_response;
use crate::chat::{ChatError, EventStream, TurnRequest, split_conversation};
use crate::http::error::{ApiError, ErrorBody};
use crate::store::MessageStatus;
use wire::{ChatRequest, UiMessageFraming};

const PROTOCOL_HEADER: HeaderName = HeaderName::from_static("x-vercel-ai-ui-message-stream");

const STREAM_DESCRIPTION: &str = "The AI SDK's UI message stream (protocol v1): `data:` parts \
    `start`, `text-start`, `text-delta`, `text-end`, then `finish` or `error`, then \
    `data: [DONE]`.";

#[utoipa::path(post, path = "/api/v1/ai-sdk/chat", tag = "ai-sdk",
    request_body(content = ChatRequest, content_type = "application/json"),
    responses(
        (status = 200, description = STREAM_DESCRIPTION, content_type = "text/event-stream", body = String,
            headers(("x-vercel-ai-ui-message-stream" = String, description = "`v1`"))),
        (status = 400, description = "Malformed body, bad id, trigger or message", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A storage quota is used up", body = ErrorBody),
        (status = 404, description = "Unknown bot, or a chat id another user's chat has", body = ErrorBody),
        (status = 409, description = "The chat already has an answer in progress", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 429, description = "Rate limited, or too many streams open", body = ErrorBody),
        (status = 503, description = "Draining, or the model busy or missing", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn post_chat(
    State(state): State<AppState>,
    version: Version,
    AuthUser(user): AuthUser,
    JsonBody(request): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    let chat_id = request.chat_id()?;
    let regenerate = request.regenerates()?;
    let conversation = request.conversation()?;
    let before_question = conversation.messages.len().saturating_sub(1);
    let (earlier, question) = split_conversation(conversation.messages).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_request",
            "messages must end with a user message that has text",
        )
    })?;
    let stored = match state.chat.latest_answer(&user, &chat_id).await {
        Ok((chat, _)) => Some(chat),
        Err(ChatError::ChatNotFound) => None,
        Err(e) => return Err(e.into()),
    };
    let bot_id = match (&request.bot_id, &stored) {
        (Some(bot), _) => bot.clone(),
        (None, Some(chat)) => chat.bot_id.clone(),
        (None, None) => first_bot(&state)?,
    };
    let mut turn = TurnRequest::new(bot_id, question, Some(chat_id.clone()));
    match stored {
        Some(_) => {
            state
                .chat
                .rewind_to(&user, &chat_id, before_question, regenerate)
                .await?;
        }
        None => {
            turn.create_chat = true;
            turn.earlier = earlier;
        }
    }
    turn.options.instructions = conversation.instructions;
    let slot = stream_slot(&state, &user).await?;
    let started = state.chat.start_turn(&user, turn, slot).await?;
    Ok(ui_message_stream(
        &state,
        version,
        started.events,
        started.max_tokens,
        None,
    ))
}

#[utoipa::path(get, path = "/api/v1/ai-sdk/chat/{chat_id}/stream", tag = "ai-sdk",
    params(("chat_id" = String, Path, description = "The chat's id (`useChat({ id })`)")),
    responses(
        (status = 200, description = STREAM_DESCRIPTION, content_type = "text/event-stream", body = String),
        (status = 204, description = "No answer is running in this chat (or no such chat of the caller's)"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "Rate limited, or too many streams open", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn resume_chat(
    State(state): State<AppState>,
    version: Version,
    AuthUser(user): AuthUser,
    ChatIdParam(chat_id): ChatIdParam,
) -> Result<Response, ApiError> {
    // `useChat({ resume: true })` asks on every mount, new chats included: a chat that is not
    // the caller's has nothing running, as far as they can tell.
    let latest = match state.chat.latest_answer(&user, &chat_id).await {
        Ok((chat, latest)) => latest.map(|answer| (chat, answer)),
        Err(ChatError::ChatNotFound) => None,
        Err(e) => return Err(e.into()),
    };
    let Some((chat, _answer)) = latest.filter(|(_, a)| a.status == MessageStatus::Streaming) else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let slot = stream_slot(&state, &user).await?;
    let Some(events) = state.chat.resume(&user, &chat_id, None).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let max_tokens = state.chat.max_tokens_of(&chat.bot_id).unwrap_or(u32::MAX);
    Ok(ui_message_stream(
        &state,
        version,
        events,
        max_tokens,
        Some(slot),
    ))
}

fn ui_message_stream(
    state: &AppState,
    version: Version,
    events: EventStream,
    max_tokens: u32,
    slot: Option<crate::rate_limit::StreamPlace>,
) -> Response {
    let framing = UiMessageFraming::new(max_tokens);
    let mut response = framed_response(events, version, state.sse.clone(), slot, framing);
    response
        .headers_mut()
        .insert(PROTOCOL_HEADER, HeaderValue::from_static("v1"));
    response
}

fn first_bot(state: &AppState) -> Result<String, ApiError> {
    state
        .chat
        .bots()
        .into_iter()
        .next()
        .map(|bot| bot.id)
        .ok_or_else(|| ChatError::BotNotFound(String::new()).into())
}
