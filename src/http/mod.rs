//! The HTTP edge: routes, extractors, the SSE encoder and the layers around them. Handlers parse,
//! authenticate and call the chat service; they never talk to a provider or the database.
//!
//! Layers, outermost first:
//! 1. access log (one line per request, written when the body ends or is dropped);
//! 2. CORS (only when origins are configured; answers preflights before auth runs);
//! 3. body size limit (413 in the contract's JSON shape via [`extract::JsonBody`]);
//! 4. the handler, whose extractors authenticate first and parse the body second.
//!
//! Nothing compresses or buffers responses: an event leaves as soon as it is produced.

mod access_log;
mod ai_sdk;
pub mod body_end;
mod chat_stream;
mod chats;
pub mod client_address;
mod diagnostics;
pub mod error;
pub mod extract;
pub mod limits;
mod openai;
mod openapi;
pub mod sse;
mod ui;
mod usage;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::Authenticator;
use crate::chat::ChatService;
use crate::http::error::{ApiError, ErrorBody};

/// What every handler can reach. Cheap to clone: all shared parts are behind `Arc`s.
#[derive(Clone)]
pub struct AppState {
    pub chat: Arc<ChatService>,
    pub auth: Arc<Authenticator>,
    pub max_body_bytes: usize,
    pub sse: sse::SseSettings,
    pub limiter: Arc<dyn crate::rate_limit::RateLimiter>,
    pub streams: crate::rate_limit::StreamCap,
    pub tickets: Arc<dyn crate::auth::tickets::Tickets>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// `None`: `/metrics` is open (or served elsewhere).
    pub metrics_token: Option<crate::config::Secret>,
}

pub fn router(
    state: AppState,
    allowed_origins: &[String],
    proxies: client_address::TrustedProxies,
    metrics_on_main: bool,
) -> Router {
    // Every API route counts against its caller's rate limit; the page and health checks do not.
    let api = Router::new()
        .route(
            "/api/v1/chat/stream",
            post(chat_stream::post_stream)
                .get(chat_stream::get_stream)
                .head(head_starts_nothing),
        )
        .route("/api/v1/chats", get(chats::list_chats))
        .route("/api/v1/chats/search", get(chats::search_chats))
        .route(
            "/api/v1/chats/{chat_id}/messages",
            get(chats::list_messages),
        )
        .route(
            "/api/v1/chats/{chat_id}",
            axum::routing::delete(chats::delete_chat).patch(chats::update_chat),
        )
        .route(
            "/api/v1/chats/{chat_id}/messages/{message_id}",
            axum::routing::delete(chats::rewind_chat),
        )
        .route(
            "/api/v1/chats/{chat_id}/stream",
            get(chat_stream::resume_stream).head(head_starts_nothing),
        )
        .route("/api/v1/chats/{chat_id}/stop", post(chat_stream::stop))
        .route("/api/v1/ai-sdk/chat", post(ai_sdk::post_chat))
        .route(
            "/api/v1/ai-sdk/chat/{chat_id}/stream",
            get(ai_sdk::resume_chat).head(head_starts_nothing),
        )
        .route("/api/v1/bots", get(chats::list_bots))
        .route("/api/v1/limits", get(chats::limits))
        .route("/api/v1/usage", get(usage::my_usage))
        .route("/api/v1/admin/usage", get(usage::all_usage))
        .route("/api/v1/stream-tickets", post(chat_stream::issue_ticket))
        .route(
            "/api/v1/diagnostics/stream",
            get(diagnostics::diagnostics_stream).head(head_starts_nothing),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::rate_limit,
        ));
    // The OpenAI-compatible API: the same limits, its errors in OpenAI's shape.
    let openai = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route(
            "/v1/chats/{chat_id}/completions/stream",
            get(openai::resume_completion).head(head_starts_nothing),
        )
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{model}", get(openai::get_model))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::rate_limit,
        ))
        .route_layer(axum::middleware::from_fn(openai::openai_errors));
    let mut api = Router::new().merge(api).merge(openai);
    if metrics_on_main {
        api = api.route("/metrics", get(metrics));
    }
    let metrics_for_log = state.metrics.clone();
    let api = ui::routes(api)
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(axum::middleware::from_fn(access_log::remember_route))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state);
    let api = match cors_layer(allowed_origins) {
        Some((cors, origins)) => api.layer(cors).layer(axum::middleware::from_fn_with_state(
            Arc::new(origins),
            cors_only_for_listed_origins,
        )),
        None => api,
    };
    // Inside the access log, so a panic's 500 is logged with the request's id like any other.
    api.layer(tower_http::catch_panic::CatchPanicLayer::custom(
        crate::http::error::panic_response,
    ))
    .layer(axum::middleware::map_response(security_headers))
    .layer(axum::middleware::from_fn_with_state(
        Arc::new((proxies, metrics_for_log)),
        access_log::access_log,
    ))
}

/// Every response: `nosniff`, so a browser never runs a JSON or text answer as script or
/// markup. JSON answers: `no-store`, so no shared cache or browser disk keeps a user's chats.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A router with `/metrics` alone, for `[metrics] listen`.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Prometheus scrapes this; behind `[metrics] bearer_token` when one is set.
async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if let Some(expected) = &state.metrics_token {
        let given = extract::bearer_in(&headers).ok().flatten();
        let matches = given
            .as_deref()
            .is_some_and(|given| constant_time_eq(given.as_bytes(), expected.expose().as_bytes()));
        if !matches {
            return ApiError::Unauthorized("metrics need the configured bearer token".into())
                .into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Compares two secrets in time that depends only on their lengths, so a scraper cannot learn the
/// token byte by byte from how fast wrong guesses are refused.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// Credentials are allowed, so origins are an explicit list (validated at start: no wildcard).
fn cors_layer(allowed_origins: &[String]) -> Option<(CorsLayer, Vec<HeaderValue>)> {
    if allowed_origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let layer = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.clone()))
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("x-mangoo-chat-id"),
        ])
        .expose_headers([
            header::RETRY_AFTER,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("x-mangoo-chat-id"),
            HeaderName::from_static("x-mangoo-message-id"),
        ])
        .allow_credentials(true)
        .max_age(Duration::from_secs(600));
    Some((layer, origins))
}

/// tower-http adds some CORS headers (credentials, methods) whatever the origin; an origin not
/// on the list must learn nothing, so strip them all.
async fn cors_only_for_listed_origins(
    State(origins): State<Arc<Vec<HeaderValue>>>,
    request: Request,
    next: Next,
) -> Response {
    let listed = request
        .headers()
        .get(header::ORIGIN)
        .is_some_and(|origin| origins.contains(origin));
    let mut response = next.run(request).await;
    if !listed {
        let headers = response.headers_mut();
        let cors: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in cors {
            headers.remove(name);
        }
    }
    response
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Health {
    status: &'static str,
}

/// Alive.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is alive", body = Health)))]
async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Ready for traffic: the server is not draining and its dependencies answer — storage, and
/// the shared state (Redis) when configured. A 503 names what is unreachable.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Draining, or storage or Redis unreachable", body = ErrorBody),
    ))]
async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if state.chat.is_draining() {
        return Err(ApiError::Unavailable {
            code: "server_shutting_down",
            message: "the server is shutting down".into(),
            retryable: true,
        });
    }
    let unreachable = state.chat.unreachable_dependencies().await;
    if unreachable.is_empty() {
        return Ok((
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ready"})),
        ));
    }
    Err(ApiError::Unavailable {
        code: "service_unavailable",
        message: format!("unreachable: {}", unreachable.join(", ")),
        retryable: true,
    })
}

async fn not_found() -> ApiError {
    ApiError::NotFound {
        code: "not_found",
        message: "no such endpoint".into(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// axum answers HEAD with the GET handler minus its body; on a stream route that would ask the
/// model a question (and pay for it) to send nothing back.
async fn head_starts_nothing(request: Request) -> Response {
    let allow = if request.uri().path() == "/api/v1/chat/stream" {
        "GET, POST"
    } else {
        "GET"
    };
    let mut response = ApiError::MethodNotAllowed.into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}
