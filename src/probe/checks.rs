//! The probe's checks, in the order a request meets the path: can we reach it, is the token
//! taken, what headers arrive, does anything buffer, cut idle streams, break resume, or refuse
//! the browser's preflight.

use std::time::Duration;

use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode};
use tokio::time::Instant;

use super::{Check, ProbeOptions, Status};
use crate::sse_client::{self as sse, Reading};

/// Paced events for the buffering check, and how far apart the server sends them.
const PACED_EVENTS: u32 = 10;
const PACED_INTERVAL_MS: u64 = 200;
/// Events held back longer than this (beyond their pacing) mean something buffers.
const HELD_TOLERANCE: Duration = Duration::from_millis(150);
/// How long the probe waits for an answer that should come at once.
const QUICK: Duration = Duration::from_secs(15);

/// The probe's view of the target: its base URL and an HTTP client that behaves like a browser
/// where it matters (it asks for compression, so a proxy that compresses shows it).
struct Target {
    base: reqwest::Url,
    client: reqwest::Client,
    token: Option<String>,
}

impl Target {
    fn url(&self, path: &str) -> reqwest::Url {
        self.base.join(path).expect("relative API paths join")
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.get(self.url(path));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// A diagnostics stream, asked for as the probe reads it: uncompressed.
    fn diagnostics(&self, query: &str) -> reqwest::RequestBuilder {
        self.get(&format!("api/v1/diagnostics/stream?{query}"))
            .header(header::ACCEPT, "text/event-stream")
    }

    /// A diagnostics stream, asked for as a browser asks: compression welcome.
    fn diagnostics_as_browser(&self, query: &str) -> reqwest::RequestBuilder {
        self.diagnostics(query)
            .header(header::ACCEPT_ENCODING, "gzip, deflate, br")
    }
}

pub async fn all(options: &ProbeOptions) -> Vec<Check> {
    let base = match sse::api_base(&options.url) {
        Ok(base) => base,
        Err(problem) => {
            return vec![Check::problem(
                "url",
                problem,
                "give the URL clients use, e.g. https://chat.example.com",
            )];
        }
    };
    let client = sse::api_client();
    let target = Target {
        base,
        client,
        token: options.token.clone(),
    };
    let mut checks = reachability(&target).await;
    if checks
        .iter()
        .any(|c| c.status == Status::Problem && c.name == "reachable")
    {
        return checks;
    }
    let auth = authentication(&target).await;
    let authenticated = auth.status == Status::Ok;
    checks.push(auth);
    if !authenticated {
        for name in ["eventsource", "headers", "buffering", "idle", "resume"] {
            checks.push(Check::skipped(name, "needs a valid token"));
        }
    } else {
        checks.push(eventsource(&target, options.ticket).await);
        checks.extend(paced_stream(&target).await);
        let (with_heartbeats, heartbeat) = idle(&target, options.idle, true, None).await;
        checks.push(with_heartbeats);
        if options.without_heartbeats {
            checks.push(idle(&target, options.idle, false, heartbeat).await.0);
        }
        checks.push(resume(&target).await);
    }
    checks.push(cors(&target, options.origin.as_deref()).await);
    checks
}

async fn reachability(target: &Target) -> Vec<Check> {
    let started = Instant::now();
    let health = match target
        .client
        .get(target.url("healthz"))
        .timeout(QUICK)
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => {
            return vec![Check::problem(
                "reachable",
                format!("{}: {}", target.url("healthz"), error_chain(&e)),
                "check the URL, DNS, firewall and (for https) the certificate",
            )];
        }
    };
    let millis = started.elapsed().as_millis();
    let version = format!("{:?}", health.version());
    let mut checks = vec![match health.status() {
        StatusCode::OK => Check::ok(
            "reachable",
            format!("/healthz 200 in {millis} ms over {version}"),
        ),
        status => Check::problem(
            "reachable",
            format!("/healthz answered {status}"),
            "the URL must reach Mangoo itself (a path prefix must be stripped by the proxy)",
        ),
    }];
    checks.push(match target.base.scheme() {
        "https" => Check::ok("tls", "certificate accepted (the system's roots)"),
        _ => Check::ok(
            "tls",
            "plain http (fine on a private network; browsers need https elsewhere)",
        ),
    });
    let ready = target
        .client
        .get(target.url("readyz"))
        .timeout(QUICK)
        .send()
        .await;
    checks.push(match ready {
        Ok(r) if r.status() == StatusCode::OK => Check::ok("ready", "/readyz 200"),
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            Check::problem(
                "ready",
                format!("/readyz answered {status}: {}", body.trim()),
                "a dependency it names (database, redis, model) is unreachable",
            )
        }
        Err(e) => Check::problem("ready", error_chain(&e), "see the server's log"),
    });
    checks
}

async fn authentication(target: &Target) -> Check {
    if target.token.is_none() {
        return Check::problem(
            "auth",
            "no token given",
            "pass --token (e.g. from `mangoo token --sub probe`)",
        );
    }
    match target.get("api/v1/bots").timeout(QUICK).send().await {
        Ok(r) if r.status() == StatusCode::OK => Check::ok("auth", "the token is accepted"),
        Ok(r) if r.status() == StatusCode::UNAUTHORIZED => {
            let reason = error_message(r).await;
            let fix = if reason.contains("expired") {
                "the token has expired: get a new one"
            } else {
                "the token is not valid for this server: check its secret or identity provider \
                 (auth.jwt_secret / jwks_url, issuer, audience) and that the whole token was copied"
            };
            Check::problem("auth", format!("401: {reason}"), fix)
        }
        Ok(r) => Check::problem(
            "auth",
            format!("GET /api/v1/bots answered {}", r.status()),
            "see the server's log",
        ),
        Err(e) => Check::problem("auth", error_chain(&e), "see the server's log"),
    }
}

/// What a browser's EventSource needs: it cannot send an Authorization header.
async fn eventsource(target: &Target, ticket: bool) -> Check {
    let token = target.token.clone().unwrap_or_default();
    let (how, query) = if ticket {
        let issued = target
            .client
            .post(target.url("api/v1/stream-tickets"))
            .bearer_auth(&token)
            .timeout(QUICK)
            .send()
            .await;
        let ticket = match issued {
            Ok(r) if r.status() == StatusCode::CREATED => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["ticket"].as_str().map(str::to_owned)),
            _ => None,
        };
        let Some(ticket) = ticket else {
            return Check::problem(
                "eventsource",
                "POST /api/v1/stream-tickets gave no ticket",
                "see the server's log (with several instances, tickets need the shared Redis)",
            );
        };
        (
            "a stream ticket",
            format!("events=1&interval_ms=0&ticket={ticket}"),
        )
    } else {
        ("?token=", format!("events=1&interval_ms=0&token={token}"))
    };
    let url = target.url(&format!("api/v1/diagnostics/stream?{query}"));
    match target.client.get(url).timeout(QUICK).send().await {
        Ok(r) if r.status() == StatusCode::OK => Check::ok(
            "eventsource",
            format!("a stream opens with {how} in the URL"),
        ),
        Ok(r) => Check::problem(
            "eventsource",
            format!("a stream with {how} answered {}", r.status()),
            "a proxy may strip the query string or refuse it; EventSource cannot send headers",
        ),
        Err(e) => Check::problem("eventsource", error_chain(&e), "see the proxy's log"),
    }
}

/// Headers, from a stream asked for as a browser would; buffering, from a paced stream. A
/// compressed stream is reported, then measured again uncompressed: the probe reads plain SSE.
async fn paced_stream(target: &Target) -> Vec<Check> {
    let query = format!("events={PACED_EVENTS}&interval_ms={PACED_INTERVAL_MS}");
    let mut response = match target.diagnostics_as_browser(&query).send().await {
        Ok(r) if r.status() == StatusCode::OK => r,
        Ok(r) => {
            let problem = Check::problem(
                "headers",
                format!("the diagnostics stream answered {}", r.status()),
                "see the server's log",
            );
            return vec![problem, Check::skipped("buffering", "no stream")];
        }
        Err(e) => {
            let problem = Check::problem("headers", error_chain(&e), "see the proxy's log");
            return vec![problem, Check::skipped("buffering", "no stream")];
        }
    };
    let headers = headers_check(response.headers());
    if response.headers().contains_key(header::CONTENT_ENCODING) {
        drop(response);
        response = match target.diagnostics(&query).send().await {
            Ok(r) if r.status() == StatusCode::OK => r,
            _ => {
                return vec![
                    headers,
                    Check::skipped("buffering", "no uncompressed stream"),
                ];
            }
        };
    }
    let deadline = Duration::from_millis(PACED_INTERVAL_MS * u64::from(PACED_EVENTS)) + QUICK;
    let reading = sse::read(response, None, deadline).await;
    vec![headers, buffering_check(&reading)]
}

fn headers_check(headers: &HeaderMap) -> Check {
    let get = |name| header_text(headers, name);
    let mut found = Vec::new();
    let mut fixes = Vec::new();
    let content_type = get(header::CONTENT_TYPE).unwrap_or_default();
    if !content_type.starts_with("text/event-stream") {
        found.push(format!("Content-Type is {content_type:?}"));
        fixes.push("the proxy must pass Mangoo's Content-Type: text/event-stream through");
    }
    let cache = get(header::CACHE_CONTROL).unwrap_or_default();
    if !cache.contains("no-transform") {
        found.push(format!("Cache-Control is {cache:?}, without no-transform"));
        fixes.push("keep Mangoo's Cache-Control: no-cache, no-transform (a CDN may rewrite it)");
    }
    if let Some(encoding) = get(header::CONTENT_ENCODING) {
        found.push(format!(
            "Content-Encoding: {encoding} (compression batches events)"
        ));
        fixes.push(
            "turn compression off for text/event-stream (nginx: leave it out of gzip_types; \
             CDNs: exclude /api/v1/*/stream)",
        );
    }
    if let Some(length) = get(header::CONTENT_LENGTH) {
        found.push(format!(
            "Content-Length: {length} (the whole body was collected first)"
        ));
        fixes.push("something buffers the whole response: turn response buffering off for the API");
    }
    if found.is_empty() {
        Check::ok(
            "headers",
            "text/event-stream, no-transform, no Content-Encoding, no Content-Length",
        )
    } else {
        Check::problem("headers", found.join("; "), fixes.join("; "))
    }
}

/// Events the server sent apart that arrived together: how long the path held them.
fn buffering_check(reading: &Reading) -> Check {
    let stamped: Vec<(u64, Instant)> = reading
        .messages()
        .filter_map(|e| {
            let content: serde_json::Value = serde_json::from_str(&e.data).ok()?;
            let inner: serde_json::Value =
                serde_json::from_str(content["content"].as_str()?).ok()?;
            Some((inner["sent_at_ms"].as_u64()?, e.at))
        })
        .collect();
    if stamped.len() < 2 {
        return Check::problem(
            "buffering",
            format!(
                "{} of {PACED_EVENTS} paced events arrived ({})",
                stamped.len(),
                reading.cut.as_deref().unwrap_or("the stream ended early")
            ),
            "see the proxy's log",
        );
    }
    // Held back = how much later an event arrived than the last one, beyond how much later the
    // server sent it. Zero when nothing buffers; the whole stream's length when all is held.
    let (last_sent, last_arrived) = *stamped.last().expect("two or more");
    let held = stamped
        .iter()
        .map(|&(sent, arrived)| {
            let sent_gap = Duration::from_millis(last_sent - sent);
            sent_gap.saturating_sub(last_arrived - arrived)
        })
        .max()
        .unwrap_or_default();
    let together = stamped
        .windows(2)
        .filter(|w| w[1].1 - w[0].1 < Duration::from_millis(PACED_INTERVAL_MS / 4))
        .count();
    if held > HELD_TOLERANCE {
        Check::problem(
            "buffering",
            format!(
                "events sent {PACED_INTERVAL_MS} ms apart arrived together ({together} of {} \
                 gaps collapsed): held back up to {} ms",
                stamped.len() - 1,
                held.as_millis()
            ),
            "something between here and Mangoo buffers responses: nginx `proxy_http_version \
             1.1` and `proxy_buffering off` (and do not ignore X-Accel-Buffering; \
             deploy/nginx/mangoo.conf), HAProxy `option http-no-delay`, no compression; a CDN \
             must pass streams through",
        )
    } else {
        Check::ok(
            "buffering",
            format!(
                "{} events sent {PACED_INTERVAL_MS} ms apart arrived as sent (held at most {} ms)",
                stamped.len(),
                held.as_millis()
            ),
        )
    }
}

/// A stream silent for `silence` must live; with heartbeats off, how long the path lets it
/// (reported next to `heartbeat`, the interval measured with them on). Also returns the
/// heartbeat interval this stream showed.
async fn idle(
    target: &Target,
    silence: Duration,
    heartbeats: bool,
    heartbeat: Option<Duration>,
) -> (Check, Option<Duration>) {
    let name = if heartbeats { "idle" } else { "idle-raw" };
    let secs = silence.as_secs();
    let query = format!("events=1&interval_ms=0&silence_secs={secs}&heartbeats={heartbeats}");
    let started = Instant::now();
    let response = match target.diagnostics(&query).send().await {
        Ok(r) if r.status() == StatusCode::OK => r,
        Ok(r) => {
            let problem = Check::problem(name, format!("answered {}", r.status()), "see the log");
            return (problem, None);
        }
        Err(e) => {
            return (
                Check::problem(name, error_chain(&e), "see the proxy's log"),
                None,
            );
        }
    };
    let reading = sse::read(response, None, silence + QUICK).await;
    let measured = heartbeat_interval(&reading);
    let heartbeat = measured.or(heartbeat);
    let beats = match heartbeat {
        Some(every) => format!("Mangoo's heartbeat: every {} s", every.as_secs()),
        None => "Mangoo's heartbeat: none seen".to_owned(),
    };
    let check = match &reading.cut {
        None if reading.finished() => match heartbeats {
            true => Check::ok(
                name,
                format!("a stream silent for {secs} s lived ({beats})"),
            ),
            false => Check::ok(
                name,
                format!("a stream silent for {secs} s lived even without heartbeats"),
            ),
        },
        cut => {
            let after = reading.last_arrival().unwrap_or(started) - started;
            let lived = started.elapsed();
            let fix = if heartbeats {
                "something on the path closes streams that carry no events: raise its idle timeout \
                 above Mangoo's heartbeat interval (server.heartbeat_secs), or lower that \
                 interval below the path's timeout"
            } else {
                "without heartbeats the path's own idle timeout applies: keep Mangoo's heartbeats \
                 (server.heartbeat_secs) well below it"
            };
            Check::problem(
                name,
                format!(
                    "the stream was cut after {:.1} s ({:.1} s after the last data; {beats}): {}",
                    lived.as_secs_f64(),
                    (lived - after).as_secs_f64(),
                    cut.as_deref().unwrap_or("it ended without done")
                ),
                fix,
            )
        }
    };
    (check, measured)
}

fn heartbeat_interval(reading: &Reading) -> Option<Duration> {
    let beats = &reading.heartbeats;
    (beats.len() >= 2).then(|| (beats[beats.len() - 1] - beats[0]) / (beats.len() as u32 - 1))
}

/// Drops a stream after two events and resumes it: the rest must follow with no gap or repeat.
async fn resume(target: &Target) -> Check {
    let query = "events=6&interval_ms=50";
    let first = match target.diagnostics(query).send().await {
        Ok(r) if r.status() == StatusCode::OK => sse::read(r, Some(2), QUICK).await,
        Ok(r) => {
            return Check::problem("resume", format!("answered {}", r.status()), "see the log");
        }
        Err(e) => return Check::problem("resume", error_chain(&e), "see the proxy's log"),
    };
    let Some(last_seen) = first.events.last().and_then(|e| e.id) else {
        return Check::problem(
            "resume",
            "the first stream brought no event ids",
            "see the log",
        );
    };
    let rest = match target
        .diagnostics(query)
        .header("last-event-id", last_seen.to_string())
        .send()
        .await
    {
        Ok(r) if r.status() == StatusCode::OK => sse::read(r, None, QUICK).await,
        Ok(r) => {
            return Check::problem(
                "resume",
                format!("resuming with Last-Event-ID answered {}", r.status()),
                "the proxy must pass the Last-Event-ID header through",
            );
        }
        Err(e) => return Check::problem("resume", error_chain(&e), "see the proxy's log"),
    };
    let ids: Vec<i64> = first
        .events
        .iter()
        .chain(&rest.events)
        .filter_map(|e| e.id)
        .collect();
    let contiguous = ids.windows(2).all(|w| w[1] == w[0] + 1);
    if contiguous && rest.finished() && ids.first() == Some(&1) {
        Check::ok(
            "resume",
            format!(
                "dropped after event {last_seen}, resumed with {} more, no gap or repeat",
                rest.events.len()
            ),
        )
    } else {
        Check::problem(
            "resume",
            format!("event ids across the resume: {ids:?}"),
            "the proxy must pass Last-Event-ID and must not replay or cache streams",
        )
    }
}

/// The preflight a browser on `origin` sends before a stream with an Authorization header.
async fn cors(target: &Target, origin: Option<&str>) -> Check {
    let Some(origin) = origin else {
        return Check::skipped(
            "cors",
            "no --origin given (only needed when the page is elsewhere)",
        );
    };
    let preflight = target
        .client
        .request(Method::OPTIONS, target.url("api/v1/chat/stream"))
        .header(header::ORIGIN, origin)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            "authorization,content-type,last-event-id",
        )
        .timeout(QUICK)
        .send()
        .await;
    let response = match preflight {
        Ok(r) => r,
        Err(e) => return Check::problem("cors", error_chain(&e), "see the proxy's log"),
    };
    let headers = response.headers();
    let get = |name| {
        header_text(headers, name)
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let allowed_origin = get(header::ACCESS_CONTROL_ALLOW_ORIGIN);
    let allowed_headers = get(header::ACCESS_CONTROL_ALLOW_HEADERS);
    let mut missing = Vec::new();
    if allowed_origin != origin.to_ascii_lowercase() {
        missing.push(format!("Access-Control-Allow-Origin is {allowed_origin:?}"));
    }
    if get(header::ACCESS_CONTROL_ALLOW_CREDENTIALS) != "true" {
        missing.push("no Access-Control-Allow-Credentials: true".to_owned());
    }
    for needed in ["authorization", "last-event-id"] {
        if !allowed_headers.contains(needed) {
            missing.push(format!("{needed} is not an allowed header"));
        }
    }
    if missing.is_empty() {
        Check::ok(
            "cors",
            format!("a preflight from {origin} is allowed with credentials"),
        )
    } else {
        Check::problem(
            "cors",
            format!(
                "preflight from {origin} ({}): {}",
                response.status(),
                missing.join("; ")
            ),
            format!(
                "add {origin} to cors.allowed_origins (and let the proxy pass OPTIONS through)"
            ),
        )
    }
}

/// A header's value as text, if it has one that is.
fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn error_message(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    body["error"]
        .as_str()
        .unwrap_or("no reason given")
        .to_owned()
}

/// reqwest's error with its causes, which hold the useful part (refused, TLS, DNS).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse_client::Arrived;

    /// A reading of paced events sent `PACED_INTERVAL_MS` apart, arriving at `arrivals` (ms).
    fn reading(arrivals: &[u64]) -> Reading {
        let start = Instant::now();
        let events = arrivals
            .iter()
            .enumerate()
            .map(|(n, &at)| {
                let sent = 1_000_000 + n as u64 * PACED_INTERVAL_MS;
                let content = format!(r#"{{"seq":{},"sent_at_ms":{sent}}}"#, n + 1);
                Arrived {
                    id: Some(n as i64 + 2),
                    event: "message".into(),
                    data: serde_json::json!({ "content": content, "type": "content" }).to_string(),
                    at: start + Duration::from_millis(at),
                }
            })
            .collect();
        Reading {
            events,
            ..Reading::default()
        }
    }

    #[test]
    fn events_arriving_as_sent_pass_and_events_held_together_are_measured() {
        let as_sent: Vec<u64> = (0..10).map(|n| n * PACED_INTERVAL_MS + 3).collect();
        let check = buffering_check(&reading(&as_sent));
        assert_eq!(check.status, Status::Ok, "{}", check.detail);

        let all_at_the_end = [1800; 10];
        let check = buffering_check(&reading(&all_at_the_end));
        assert_eq!(check.status, Status::Problem);
        assert!(
            check.detail.contains("held back up to 1800 ms"),
            "{}",
            check.detail
        );
        assert!(
            check.detail.contains("9 of 9 gaps collapsed"),
            "{}",
            check.detail
        );

        // Flushed in two batches: the first five held until the sixth was sent.
        let two_batches = [1000, 1000, 1000, 1000, 1000, 1000, 1200, 1400, 1600, 1800];
        let check = buffering_check(&reading(&two_batches));
        assert_eq!(check.status, Status::Problem);
        assert!(
            check.detail.contains("held back up to 1000 ms"),
            "{}",
            check.detail
        );
    }
}
