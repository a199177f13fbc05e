//! The one place where failures become HTTP responses.
//!
//! Every error a client can see before a stream starts is an [`ApiError`], answered as the
//! contract's JSON body `{"error": ..., "type": "error", "code": ...}`. Server-side failures are
//! opaque to the client and logged here with their cause.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::chat::ChatError;
use crate::store::QuotaKind;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// `retryable` decides whether `Retry-After` goes out: a model that is not downloaded will
    /// not be there in five seconds either.
    #[error("{message}")]
    Unavailable {
        code: &'static str,
        message: String,
        retryable: bool,
    },
    #[error("{message}")]
    TooManyRequests {
        code: &'static str,
        message: String,
        retry_after: std::time::Duration,
        limit: Option<crate::rate_limit::Decision>,
        policy: u32,
    },
    /// Logged in full, answered as a bare 500.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The contract's error body.
/// The body of every error answered before a stream starts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: &'a str,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden { code, .. } => (StatusCode::FORBIDDEN, code),
            ApiError::NotFound { code, .. } => (StatusCode::NOT_FOUND, code),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "chat_busy"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Unavailable { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, code),
            ApiError::TooManyRequests { code, .. } => (StatusCode::TOO_MANY_REQUESTS, code),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(error.cause = %cause, "request failed");
                "internal server error".to_owned()
            }
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: &message,
            kind: "error",
            code,
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::TooManyRequests {
            retry_after,
            limit,
            policy,
            ..
        } = &self
        {
            let headers = response.headers_mut();
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            if let Some(decision) = limit {
                crate::http::limits::rate_limit_headers(headers, decision, *policy);
            }
            return response;
        }
        match &self {
            ApiError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Unavailable {
                retryable: true, ..
            } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        response
    }
}

/// A shared dependency (Redis) that could not answer: the request may succeed in a moment.
fn dependency_unavailable(what: &str, cause: &dyn std::fmt::Display) -> ApiError {
    tracing::warn!("{what} unavailable: {cause}");
    ApiError::Unavailable {
        code: "service_unavailable",
        message: format!("{what} is unavailable; retry shortly"),
        retryable: true,
    }
}

impl From<crate::auth::tickets::TicketError> for ApiError {
    fn from(err: crate::auth::tickets::TicketError) -> Self {
        dependency_unavailable("the ticket store", &err)
    }
}

impl From<crate::rate_limit::LimitError> for ApiError {
    fn from(err: crate::rate_limit::LimitError) -> Self {
        dependency_unavailable("the stream limiter", &err)
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        // The client gets the plain reason; which check failed is for the operator.
        if matches!(err, AuthError::Invalid(_)) {
            tracing::info!(reason = err.detail(), "token refused");
        }
        ApiError::Unauthorized(err.to_string())
    }
}

/// A handler that panicked: the connection stays up and the client gets the contract's 500 body;
/// the panic's message goes to the log (with the request's id, from the span it ran in).
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    ApiError::Internal(format!("handler panicked: {message}")).into_response()
}

impl From<ChatError> for ApiError {
    fn from(err: ChatError) -> Self {
        let message = err.to_string();
        match err {
            ChatError::BotNotFound(_) => ApiError::NotFound {
                code: "bot_not_found",
                message,
            },
            ChatError::ChatNotFound => ApiError::NotFound {
                code: "chat_not_found",
                message,
            },
            ChatError::MessageNotFound => ApiError::NotFound {
                code: "message_not_found",
                message,
            },
            ChatError::InvalidTitle { .. } => ApiError::bad_request("invalid_title", message),
            ChatError::InvalidSearch(_) => ApiError::bad_request("invalid_request", message),
            ChatError::ChatBusy => ApiError::Conflict(message),
            ChatError::EmptyMessage => ApiError::bad_request("empty_message", message),
            ChatError::MessageTooLong { .. } => ApiError::bad_request("message_too_long", message),
            ChatError::NotOperator => ApiError::Forbidden {
                code: "forbidden",
                message,
            },
            ChatError::ShuttingDown => ApiError::Unavailable {
                code: "server_shutting_down",
                message,
                retryable: true,
            },
            ChatError::Refused(err) => {
                tracing::warn!(
                    code = err.kind.code(),
                    detail = err.detail(),
                    "request refused: {err}"
                );
                ApiError::Unavailable {
                    code: err.kind.code(),
                    message,
                    retryable: err.kind.retryable(),
                }
            }
            ChatError::QuotaExceeded(kind) => ApiError::Forbidden {
                code: match kind {
                    QuotaKind::Chats => "chat_limit_reached",
                    QuotaKind::Bytes => "storage_limit_reached",
                    QuotaKind::Turns => "turn_limit_reached",
                },
                message,
            },
            ChatError::Log(e) => {
                tracing::error!("stream log: {e}");
                ApiError::Unavailable {
                    code: "service_unavailable",
                    message: "streaming is unavailable; retry shortly".into(),
                    retryable: true,
                }
            }
            ChatError::Store(crate::store::StoreError::Unavailable(cause)) => {
                dependency_unavailable("the database", &cause)
            }
            ChatError::ProviderMissing(_) | ChatError::Store(_) => ApiError::Internal(message),
        }
    }
}
