//! `POST /api/v1/chat/stream` (JSON body) and `GET /api/v1/chat/stream` (query string, for the
//! browser's EventSource): the same answer stream.

use axum::extract::{RawQuery, State};
use axum::http::Version;
use axum::response::Response;
use serde::Deserialize;

use super::AppState;
use super::extract::{AuthUser, JsonBody};
use super::sse::stream_response;
use crate::chat::TurnRequest;
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
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
        Ok(TurnRequest {
            bot_id: self.bot_id,
            message: self.message,
            chat_id,
        })
    }
}

pub async fn post_stream(
    State(state): State<AppState>,
    version: Version,
    AuthUser(user): AuthUser,
    JsonBody(request): JsonBody<StreamRequest>,
) -> Result<Response, ApiError> {
    let turn = state.chat.start_turn(&user, request.into_turn()?).await?;
    Ok(stream_response(turn, version, state.sse))
}

pub async fn get_stream(
    State(state): State<AppState>,
    version: Version,
    AuthUser(user): AuthUser,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let request: StreamRequest = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_request("invalid_request", format!("invalid query: {e}")))?;
    let turn = state.chat.start_turn(&user, request.into_turn()?).await?;
    Ok(stream_response(turn, version, state.sse))
}
