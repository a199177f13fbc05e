//! Request extractors that turn every rejection into the contract's JSON error.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use serde::de::DeserializeOwned;

use super::AppState;
use crate::auth::{AuthError, UserId};
use crate::http::error::ApiError;

/// The caller, from `Authorization: Bearer <jwt>` or, for EventSource which cannot send headers,
/// the `token` query parameter.
pub struct AuthUser(pub UserId);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let user = match stream_ticket(parts) {
            Some(ticket) => state
                .tickets
                .redeem(&ticket)
                .await?
                .ok_or(AuthError::BadTicket)?,
            None => match parts.extensions.get::<super::limits::VerifiedUser>() {
                Some(verified) => verified.0.clone(),
                None => {
                    let token = token_in(parts)?.ok_or(AuthError::Missing)?;
                    state.auth.verify(&token).await?
                }
            },
        };
        tracing::Span::current().record("user_id", user.as_str());
        Ok(AuthUser(user))
    }
}

/// A `?ticket=` on a GET of a stream endpoint (the only place tickets are accepted).
fn stream_ticket(parts: &Parts) -> Option<String> {
    if parts.method != Method::GET || !is_stream_route(&parts.method, parts.uri.path()) {
        return None;
    }
    query_param(parts.uri.query(), "ticket")
}

/// The stream routes, the only ones where a credential may travel in the URL: EventSource cannot
/// send headers. Anywhere else a `?token=` would only end up in more proxy logs and browser
/// histories, so it is not read at all.
pub fn is_stream_route(method: &Method, path: &str) -> bool {
    if path == "/api/v1/chat/stream" {
        return *method == Method::GET || *method == Method::POST;
    }
    if path == "/api/v1/diagnostics/stream" {
        return *method == Method::GET;
    }
    *method == Method::GET
        && path
            .strip_prefix("/api/v1/chats/")
            .and_then(|rest| rest.strip_suffix("/stream"))
            .is_some_and(|chat_id| !chat_id.is_empty() && !chat_id.contains('/'))
}

/// The request's token, if it has one: the bearer header, else — on a stream route only — the
/// `token` query parameter.
pub fn token_in(parts: &Parts) -> Result<Option<String>, ApiError> {
    match parts.headers.get(AUTHORIZATION) {
        Some(value) => bearer_token(value.as_bytes()).map(Some),
        None if is_stream_route(&parts.method, parts.uri.path()) => {
            Ok(query_param(parts.uri.query(), "token"))
        }
        None => Ok(None),
    }
}

/// The bearer token of the `Authorization` header alone.
pub fn bearer_in(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get(AUTHORIZATION)
        .map(|value| bearer_token(value.as_bytes()))
        .transpose()
}

fn bearer_token(header: &[u8]) -> Result<String, ApiError> {
    let text = std::str::from_utf8(header)
        .map_err(|_| ApiError::Unauthorized("malformed Authorization header".into()))?;
    match text.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim().to_owned())
        }
        _ => Err(ApiError::Unauthorized(
            "Authorization header must be 'Bearer <token>'".into(),
        )),
    }
}

/// The whole query string as `T`; a bad one is the contract's 400 `invalid_request`.
pub fn parse_query<T: DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request("invalid_request", format!("invalid query: {e}")))
}

/// One decoded query parameter; the first occurrence wins.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query?).ok()?;
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// The `{chat_id}` of a route. axum's own `Path` answers a bad segment (not UTF-8, say) in
/// plain text; every rejection here is the contract's JSON error.
pub struct ChatIdParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ChatIdParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(chat_id) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|rejection| invalid_path("chat id", &rejection))?;
        Ok(ChatIdParam(chat_id))
    }
}

/// axum's path rejection, as the contract's JSON error.
fn invalid_path(what: &str, rejection: &axum::extract::rejection::PathRejection) -> ApiError {
    ApiError::bad_request(
        "invalid_request",
        format!("invalid {what} in the path: {}", rejection.body_text()),
    )
}

/// The `{chat_id}` and `{message_id}` of a route, rejected like [`ChatIdParam`].
pub struct MessageParams {
    pub chat_id: String,
    pub message_id: String,
}

impl<S: Send + Sync> FromRequestParts<S> for MessageParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path((chat_id, message_id)) =
            axum::extract::Path::<(String, String)>::from_request_parts(parts, state)
                .await
                .map_err(|rejection| invalid_path("id", &rejection))?;
        Ok(MessageParams {
            chat_id,
            message_id,
        })
    }
}

/// A JSON body: 415 without a JSON content type, 413 over the size limit, 400 when malformed or
/// when a field is missing or of the wrong type.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !is_json(
            req.headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
        ) {
            return Err(ApiError::UnsupportedMediaType(
                "Content-Type must be application/json".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.max_body_bytes,
                }
            } else {
                ApiError::bad_request("invalid_request", rejection.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| match e.classify() {
                serde_json::error::Category::Data => {
                    ApiError::bad_request("invalid_request", format!("invalid request body: {e}"))
                }
                _ => ApiError::bad_request("invalid_json", format!("malformed JSON: {e}")),
            })
    }
}

fn is_json(content_type: Option<&str>) -> bool {
    let Some(content_type) = content_type else {
        return false;
    };
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence
            .rsplit_once('+')
            .is_some_and(|(_, suffix)| suffix.eq_ignore_ascii_case("json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json(Some("application/json")));
        assert!(is_json(Some("Application/JSON; charset=utf-8")));
        assert!(is_json(Some("application/vnd.api+json")));
        assert!(!is_json(Some("text/plain")));
        assert!(!is_json(None));
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer_token(b"Bearer abc").unwrap(), "abc");
        assert_eq!(bearer_token(b"bearer abc").unwrap(), "abc");
        assert!(bearer_token(b"Basic abc").is_err());
        assert!(bearer_token(b"Bearer ").is_err());
    }

    #[test]
    fn only_stream_routes_take_credentials_in_the_url() {
        assert!(is_stream_route(&Method::GET, "/api/v1/chat/stream"));
        assert!(is_stream_route(&Method::POST, "/api/v1/chat/stream"));
        assert!(is_stream_route(&Method::GET, "/api/v1/chats/chat-1/stream"));
        assert!(!is_stream_route(&Method::HEAD, "/api/v1/chat/stream"));
        assert!(!is_stream_route(
            &Method::POST,
            "/api/v1/chats/chat-1/stream"
        ));
        assert!(!is_stream_route(&Method::GET, "/api/v1/chats"));
        assert!(!is_stream_route(&Method::GET, "/api/v1/chats/a/b/stream"));
        assert!(!is_stream_route(&Method::GET, "/api/v1/chats//stream"));
    }

    #[test]
    fn query_params_decode() {
        assert_eq!(
            query_param(Some("a=1&token=x%2By"), "token").as_deref(),
            Some("x+y")
        );
        assert_eq!(query_param(Some("a=1"), "token"), None);
        assert_eq!(query_param(None, "token"), None);
    }
}
