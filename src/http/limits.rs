//! Rate limits at the edge: every API request is counted against its user (when it carries a
//! valid token) or its client address (when it does not), and answered 429 past the limit, with
//! `Retry-After` and the draft IETF `RateLimit-*` headers on every counted response.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::client_address::RequestContext;
use super::extract::token_in;
use crate::http::error::ApiError;
use crate::metrics::ReasonLabels;
use crate::rate_limit::Decision;

/// The user a rate-limit check already verified, so the handler's extractor need not again.
#[derive(Clone)]
pub struct VerifiedUser(pub crate::auth::UserId);

pub async fn rate_limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let token = token_in(&parts).ok().flatten();
    let request = Request::from_parts(parts, body);
    let user = match token {
        Some(token) => state.auth.verify(&token).await.ok(),
        None => None,
    };
    let key = match &user {
        Some(user) => format!("user:{}", user.as_str()),
        None => match request.extensions().get::<RequestContext>() {
            Some(context) => format!("ip:{}", context.client_ip),
            None => "ip:unknown".to_owned(),
        },
    };
    let policy = state.limiter.limit();
    let decision = match state.limiter.check(&key).await {
        Ok(decision) => decision,
        // Fail open: an outage of the limiter's store must not take the whole API down with it.
        Err(e) => {
            tracing::warn!("rate limit not checked: {e}");
            return next.run(with_user(request, user)).await;
        }
    };
    if !decision.allowed {
        state
            .metrics
            .rate_limited
            .get_or_create(&ReasonLabels {
                reason: "requests".into(),
            })
            .inc();
        tracing::info!(key = %key.split(':').next().unwrap_or(""), "rate limited");
        return ApiError::TooManyRequests {
            code: "rate_limited",
            message: "too many requests; slow down".into(),
            retry_after: decision.retry_after,
            limit: Some(decision),
            policy,
        }
        .into_response();
    }
    let mut response = next.run(with_user(request, user)).await;
    rate_limit_headers(response.headers_mut(), &decision, policy);
    response
}

/// The request, carrying the user the check verified (if any) for the handler's extractor.
fn with_user(mut request: Request, user: Option<crate::auth::UserId>) -> Request {
    if let Some(user) = user {
        request.extensions_mut().insert(VerifiedUser(user));
    }
    request
}

/// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (whole seconds, rounded up).
pub fn rate_limit_headers(headers: &mut HeaderMap, decision: &Decision, limit: u32) {
    headers.insert("ratelimit-limit", HeaderValue::from(limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
    headers.insert(
        "ratelimit-reset",
        HeaderValue::from(ceil_secs(decision.reset_after)),
    );
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}
