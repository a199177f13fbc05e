//! The web chat page, compiled into the binary: no separate web server, no CDN, works offline.
//! Every response carries a strict Content-Security-Policy: scripts and styles only from this
//! origin, no inline code, so even a rendering bug cannot run what a model wrote.
//!
//! The page's own code is `ui/`; the libraries it renders Markdown with (marked, DOMPurify,
//! highlight.js) are vendored in `ui/vendor/` at pinned versions by `scripts/vendor-ui.sh`.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// `connect-src` allows other origins because the page may talk to a Mangoo elsewhere (the API
/// base URL setting); scripts, styles and everything else stay on this origin. `img-src` is
/// this origin only: an image a model writes into an answer is never fetched.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self' http: https:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

const JS: &str = "text/javascript; charset=utf-8";

/// Everything the page loads besides `/`, by path.
const ASSETS: &[(&str, &[u8], &str)] = &[
    ("app.js", include_bytes!("../../ui/app.js"), JS),
    ("chats.js", include_bytes!("../../ui/chats.js"), JS),
    ("messages.js", include_bytes!("../../ui/messages.js"), JS),
    ("stream.js", include_bytes!("../../ui/stream.js"), JS),
    ("markdown.js", include_bytes!("../../ui/markdown.js"), JS),
    (
        "style.css",
        include_bytes!("../../ui/style.css"),
        "text/css; charset=utf-8",
    ),
    (
        "favicon.svg",
        include_bytes!("../../ui/favicon.svg"),
        "image/svg+xml",
    ),
    (
        "favicon.ico",
        include_bytes!("../../ui/favicon.ico"),
        "image/x-icon",
    ),
    (
        "vendor/marked.js",
        include_bytes!("../../ui/vendor/marked.js"),
        JS,
    ),
    (
        "vendor/purify.js",
        include_bytes!("../../ui/vendor/purify.js"),
        JS,
    ),
    (
        "vendor/highlight.js",
        include_bytes!("../../ui/vendor/highlight.js"),
        JS,
    ),
];

const INDEX_HTML: &[u8] = include_bytes!("../../ui/index.html");

fn asset(body: &'static [u8], content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    // A new binary may change them: revalidate every time.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The page's routes: `/` and each of [`ASSETS`] at its path.
pub fn routes<S: Clone + Send + Sync + 'static>(mut router: Router<S>) -> Router<S> {
    router = router.route(
        "/",
        get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
    );
    for &(path, body, content_type) in ASSETS {
        router = router.route(
            &format!("/{path}"),
            get(move || async move { asset(body, content_type) }),
        );
    }
    router
}
