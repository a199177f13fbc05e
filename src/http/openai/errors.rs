//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
//! OpenAI's own servers use, so the SDKs raise the exception a caller expects (`NotFoundError`,
//! `RateLimitError`, …) and retry what they would retry.
//!
//! Every refusal on the `/v1` routes is made by the same code as anywhere else (auth, the rate
//! limit, the chat service) in the contract's shape; [`openai_errors`] rewrites it on the way
//! out, so there is one place that decides errors and one that translates them.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::events::StreamFailure;

/// An error as OpenAI sends it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OpenAiError {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OpenAiErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'static str>,
    /// Mangoo's code for it (as in its own contract), OpenAI's where one exists.
    pub code: String,
}

/// The contract's error body, as the rest of the server writes it.
#[derive(Deserialize)]
struct ContractError {
    error: String,
    code: String,
}

/// The most bytes an error body has; anything larger is not one of ours and passes unchanged.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Rewrites the contract's JSON errors into OpenAI's shape; headers (`Retry-After`, the
/// `RateLimit` fields) stay as they were.
pub async fn openai_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !response.status().is_client_error() && !response.status().is_server_error() || !is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_ERROR_BODY).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let Ok(contract) = serde_json::from_slice::<ContractError>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let body = error_body(parts.status, &contract.code, contract.error);
    parts.headers.remove(header::CONTENT_LENGTH);
    let json = serde_json::to_vec(&body).expect("plain structs serialise");
    Response::from_parts(parts, Body::from(json))
}

/// OpenAI's error for a status and one of the contract's codes.
pub fn error_body(status: StatusCode, code: &str, message: String) -> OpenAiError {
    // OpenAI's own: every refusal of the request is an `invalid_request_error` (a bad key and
    // an unknown model too, told apart by status and code), a rate limit is `requests`.
    let kind = match status.as_u16() {
        429 => "requests",
        500.. => "server_error",
        _ => "invalid_request_error",
    };
    let (code, param) = match code {
        "bot_not_found" => ("model_not_found", Some("model")),
        "unauthorized" => ("invalid_api_key", None),
        "empty_message" | "message_too_long" => (code, Some("messages")),
        other => (other, None),
    };
    OpenAiError {
        error: OpenAiErrorDetail {
            message,
            kind,
            param,
            code: code.to_owned(),
        },
    }
}

/// An answer that failed: the status an unstreamed request answers with, and the error (also
/// what a stream sends as its last chunk before `[DONE]`).
pub fn failure_body(failure: &StreamFailure) -> (StatusCode, OpenAiError) {
    let status = match failure.code.as_str() {
        "upstream_throttled" => StatusCode::TOO_MANY_REQUESTS,
        "upstream_invalid_request" => StatusCode::BAD_REQUEST,
        "upstream_timeout"
        | "upstream_connect_timeout"
        | "upstream_first_token_timeout"
        | "upstream_idle_timeout" => StatusCode::GATEWAY_TIMEOUT,
        "overloaded"
        | "upstream_unavailable"
        | "model_unavailable"
        | "server_shutting_down"
        | "service_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "internal_error" | "storage_error" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_GATEWAY,
    };
    let body = error_body(status, &failure.code, failure.message.clone());
    (status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_codes_map_to_openai_types_and_codes() {
        let body = error_body(StatusCode::NOT_FOUND, "bot_not_found", "no".into());
        assert_eq!(body.error.kind, "invalid_request_error");
        assert_eq!(body.error.code, "model_not_found");
        assert_eq!(body.error.param, Some("model"));
        let body = error_body(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow".into());
        assert_eq!(
            (body.error.kind, body.error.code.as_str()),
            ("requests", "rate_limited")
        );
        let failure = StreamFailure::new("late", "upstream_first_token_timeout", true);
        assert_eq!(failure_body(&failure).0, StatusCode::GATEWAY_TIMEOUT);
    }
}
