//! What the providers spoken to over HTTP share: one reqwest client each, request errors and
//! statuses mapped onto [`ProviderErrorKind`], and their SSE bodies parsed into events with a
//! bound on event size (a broken upstream must not make us buffer without end).

use std::time::Duration;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};

use super::{ProviderError, ProviderErrorKind, ProviderEvent, ProviderStream};

/// How one vendor's SSE events read: the one part of an answer stream that differs between
/// Anthropic and OpenAI-compatible servers. [`answer_stream`] does the rest.
pub trait Dialect: Send + 'static {
    /// Reads one event, pushing what it means onto `out`; `Ok(true)` when it completes the answer.
    fn read(&mut self, event: &Event, out: &mut Vec<ProviderEvent>) -> Result<bool, ProviderError>;

    /// The body ended before any event completed the answer: a cut-off stream (the usual
    /// verdict), unless the dialect knows better.
    fn at_end(&self) -> Result<(), ProviderError>;
}

/// A stream that ended before its vendor said the answer was complete.
pub fn cut_short(provider: &str) -> ProviderError {
    ProviderError::new(
        ProviderErrorKind::Connection,
        format!("{provider} closed the stream before the answer was finished"),
    )
}

/// An answer's events from a streaming response: each upstream event read by `dialect`, the
/// result sent on at once, ending after the completing event or the first error.
pub fn answer_stream(
    provider: &'static str,
    response: reqwest::Response,
    mut dialect: impl Dialect,
) -> ProviderStream {
    Box::pin(async_stream::stream! {
        let mut upstream = std::pin::pin!(events(provider, response));
        // Reused for every event: one token usually makes one event.
        let mut out = Vec::with_capacity(2);
        while let Some(event) = upstream.next().await {
            let read = match event {
                Ok(event) => dialect.read(&event, &mut out),
                Err(e) => Err(e),
            };
            for event in out.drain(..) {
                yield Ok(event);
            }
            match read {
                Ok(false) => {}
                Ok(true) => return,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            }
        }
        if let Err(e) = dialect.at_end() {
            yield Err(e);
        }
    })
}

/// The most bytes accepted between two SSE event boundaries from a provider.
const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// A client for long streams: a connect timeout, but no total timeout (answers take minutes),
/// and no response compression (it would batch the stream).
///
/// HTTP/1.1 only, although HTTPS providers offer HTTP/2: over HTTP/2 every answer shares one
/// connection, every token is a small DATA frame, and the h2 crate (0.4.16+) treats a backlog of
/// small DATA frames not yet read as a flood — it sends GOAWAY `too_many_data_frames` and every
/// answer on that connection is cut at once. Our benchmark hit it whenever Mangoo's CPU was busy
/// (83 of 100 full-speed streams cut); reqwest does not expose the h2 budget. One connection per
/// answer costs descriptors and memory; a cut answer costs the product.
pub fn client(connect_timeout_secs: u64) -> reqwest::Client {
    crate::crypto::install_default_providers();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(connect_timeout_secs))
        .tcp_nodelay(true)
        .http1_only()
        .build()
        .expect("a reqwest client with static settings builds")
}

/// The configured key, else the vendor's usual environment variable; empty counts as none.
pub fn api_key(configured: Option<&crate::config::Secret>, env_var: &str) -> Option<String> {
    configured
        .map(|k| k.expose().to_owned())
        .or_else(|| std::env::var(env_var).ok())
        .filter(|k| !k.is_empty())
}

pub fn request_error(provider: &str, err: &reqwest::Error) -> ProviderError {
    let kind = if err.is_connect() && err.is_timeout() {
        ProviderErrorKind::ConnectTimeout
    } else if err.is_timeout() {
        ProviderErrorKind::Timeout
    } else {
        ProviderErrorKind::Connection
    };
    tracing::warn!(provider, "request failed: {err:?}");
    ProviderError::from_upstream(kind, provider, err.to_string())
}

/// Sends a streaming request; a non-2xx answer becomes the provider's error.
pub async fn open_stream(
    provider: &'static str,
    call: reqwest::RequestBuilder,
) -> Result<reqwest::Response, ProviderError> {
    let response = call
        .header("accept", "text/event-stream")
        .send()
        .await
        .map_err(|e| request_error(provider, &e))?;
    if !response.status().is_success() {
        return Err(status_error(provider, response).await);
    }
    Ok(response)
}

/// The most of an error body read for the log: enough for any provider's error object.
const MAX_ERROR_BODY_BYTES: usize = 16 * 1024;

/// Turns a non-2xx response into an error: the status decides the kind; the provider's own
/// message goes to the log only.
pub async fn status_error(provider: &str, mut response: reqwest::Response) -> ProviderError {
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY_BYTES);
    let body = String::from_utf8_lossy(&body);
    let detail = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let error = v.get("error")?;
            error
                .get("message")
                .and_then(|m| m.as_str())
                .or_else(|| error.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| body.chars().take(200).collect());
    ProviderError::from_upstream(
        ProviderErrorKind::from_status(status),
        provider,
        format!("HTTP {status}: {detail}"),
    )
}

/// The SSE events of a response body; a transport error or an oversized event ends the stream
/// with an error. The size is checked on the raw bytes, before the parser buffers them.
pub fn events(
    provider: &'static str,
    response: reqwest::Response,
) -> impl Stream<Item = Result<Event, ProviderError>> + Send {
    let mut since_boundary = 0usize;
    let bytes = response.bytes_stream().map(move |chunk| {
        let chunk = chunk?;
        since_boundary = match last_boundary(&chunk) {
            Some(end) => chunk.len() - end,
            None => since_boundary + chunk.len(),
        };
        Ok::<_, reqwest::Error>((chunk, since_boundary > MAX_EVENT_BYTES))
    });
    let mut oversized = false;
    let bytes = bytes
        .take_while(move |item| {
            let keep = !oversized;
            oversized = matches!(item, Ok((_, true)));
            std::future::ready(keep)
        })
        .map(|item| item.map(|(chunk, _)| chunk));
    // An oversized event leaves its bytes unterminated: the parser then ends without it, and the
    // provider module reports the stream as cut short.
    bytes.eventsource().map(move |item| match item {
        Ok(event) => Ok(event),
        Err(EventStreamError::Transport(e)) => Err(request_error(provider, &e)),
        Err(e) => Err(ProviderError::new(
            ProviderErrorKind::Upstream,
            format!("{provider} sent a malformed stream"),
        )
        .with_detail(e.to_string())),
    })
}

/// Where the last event boundary (a blank line: `\n\n`, `\r\r` or `\n\r\n`) in `chunk` ends.
fn last_boundary(chunk: &[u8]) -> Option<usize> {
    (1..chunk.len()).rev().find_map(|i| {
        let blank = match (chunk[i - 1], chunk[i]) {
            (b'\n', b'\n') | (b'\r', b'\r') => true,
            (b'\r', b'\n') => i >= 2 && chunk[i - 2] == b'\n',
            _ => false,
        };
        blank.then_some(i + 1)
    })
}

#[cfg(test)]
mod tests {
    use super::last_boundary;

    #[test]
    fn boundaries_in_every_line_ending() {
        assert_eq!(last_boundary(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(last_boundary(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(last_boundary(b"data: a\r\rx"), Some(9));
        assert_eq!(last_boundary(b"data: a\n"), None);
    }
}
