//! The outermost layer: works out who is asking (client address behind trusted proxies, request
//! id), opens the request's log span — every line logged while serving it carries its
//! `request_id`, and its `user_id` once authenticated — echoes `X-Request-Id`, and writes one
//! access line per request when the response body is finished or dropped, so a stream's line
//! carries its whole duration and is written even when the client walks away. Only the path is
//! logged, never the query string: it may hold a `token`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};

/// Longest path written to a log line; the rest is cut (an unauthenticated request may send a
/// path of many kilobytes, and every byte of it would be written to disk).
const MAX_LOGGED_PATH: usize = 256;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use super::body_end::{BodyEnd, OnBodyEnd};
use super::client_address::{RequestContext, TrustedProxies, request_id};
use crate::metrics::{HttpLabels, Metrics};

/// Set on a response by [`remember_route`]: the route template that matched.
#[derive(Clone)]
struct MatchedRoute(String);

/// Runs inside routing, where the matched route is known, and hands it out on the response.
pub async fn remember_route(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(MatchedRoute(route));
    }
    response
}

pub async fn access_log(
    State(shared): State<Arc<(TrustedProxies, Arc<Metrics>)>>,
    mut request: Request,
    next: Next,
) -> Response {
    let (proxies, metrics) = (&shared.0, &shared.1);
    let started = Instant::now();
    let method = method_label(request.method());
    let path = loggable_path(request.uri().path());
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(Ipv4Addr::UNSPECIFIED.into(), |ConnectInfo(addr)| addr.ip());
    let client_ip = proxies.client_ip(peer, request.headers());
    let request_id = request_id(proxies.trusts(peer), request.headers());
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        user_id = tracing::field::Empty,
    );
    request.extensions_mut().insert(RequestContext {
        request_id: request_id.clone(),
        client_ip,
    });
    let mut response = next.run(request).instrument(span.clone()).await;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let status = response.status();
    let route = response
        .extensions()
        .get::<MatchedRoute>()
        .map_or_else(|| "unmatched".to_owned(), |r| r.0.clone());
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method: method.to_owned(),
            route,
            status: status.as_u16(),
        })
        .inc();
    let line = AccessLine {
        method,
        path,
        status,
        client: client_ip.to_string(),
        started,
        span,
    };
    response.map(|body| BodyEnd::wrap(body, line))
}

/// The request method as a label of bounded cardinality: the standard methods by name, anything
/// else — hyper accepts any token as an extension method, of any length — as `other`. Metrics
/// keep every label set forever, so a raw method would let any client grow them without end.
pub fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// The path as logged: at most [`MAX_LOGGED_PATH`] bytes, cut at a character boundary.
fn loggable_path(path: &str) -> String {
    if path.len() <= MAX_LOGGED_PATH {
        return path.to_owned();
    }
    let mut end = MAX_LOGGED_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

struct AccessLine {
    method: &'static str,
    path: String,
    status: StatusCode,
    client: String,
    started: Instant,
    span: tracing::Span,
}

impl OnBodyEnd for AccessLine {
    fn body_ended(self, completed: bool) {
        let _in_request = self.span.enter();
        tracing::info!(
            target: "mangoo::access",
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            client = %self.client,
            completed,
            "{} {} {}",
            self.method,
            self.path,
            self.status.as_u16(),
        );
    }
}
