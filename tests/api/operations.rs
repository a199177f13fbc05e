//! Operations: request ids, trusted proxies and structured logs.

use std::time::Duration;

use serde_json::Value;

use super::binary::{serve_with_config, terminate};
use super::helpers::{HANG_GUARD, SECRET, spawn_app};

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = spawn_app().await;
    let response = app.client.get(app.url("/healthz")).send().await.unwrap();
    let id = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32, "{id}");
    // From an untrusted peer (no trusted_proxies), a client-chosen id is not believed.
    let response = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "chosen-by-client")
        .send()
        .await
        .unwrap();
    assert_ne!(response.headers()["x-request-id"], "chosen-by-client");
}

/// Runs the binary with `trusted_proxies`, JSON logs, one anonymous and one signed request
/// carrying forwarding headers; returns the response's request id and the log lines.
async fn logged_requests(trusted_proxies: &str) -> (String, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mangoo.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\ntrusted_proxies = {trusted_proxies}\n\
             [log]\nformat = \"json\"\n[auth]\njwt_secret = \"{SECRET}\"\n\
             [database]\nurl = \"sqlite://{}/m.db\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (child, base) = serve_with_config(&config).await;
    let client = crate::helpers::client_builder().no_proxy().build().unwrap();
    let token = mangoo::auth::Authenticator::hs256(SECRET.as_bytes())
        .issue("alice", Duration::from_secs(60))
        .unwrap();
    let response = client
        .get(format!("{base}/api/v1/chats"))
        .bearer_auth(&token)
        .header("x-forwarded-for", "198.51.100.1, 203.0.113.7")
        .header("x-request-id", "req-from-the-proxy")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let (_, stderr) = terminate(child).await;
    assert!(!stderr.contains(&token), "the token leaked into the logs");
    let lines = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (request_id, lines)
}

fn access_line(lines: &[Value]) -> &Value {
    lines
        .iter()
        .find(|l| l["target"] == "mangoo::access" && l["path"] == "/api/v1/chats")
        .expect("an access line")
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_and_request_id_are_used_and_logged_as_json() {
    let (request_id, lines) = logged_requests("[\"127.0.0.1\"]").await;

    assert_eq!(request_id, "req-from-the-proxy");
    let access = access_line(&lines);
    assert_eq!(access["client"], "203.0.113.7");
    assert_eq!(access["status"], 200);
    assert_eq!(access["span"]["request_id"], "req-from-the-proxy");
    assert_eq!(access["span"]["user_id"], "alice");
}

#[tokio::test]
async fn from_an_untrusted_peer_spoofed_forwarding_headers_change_nothing() {
    let (request_id, lines) = logged_requests("[]").await;

    assert_ne!(request_id, "req-from-the-proxy");
    let access = access_line(&lines);
    assert_eq!(access["client"], "127.0.0.1");
    assert_eq!(access["span"]["request_id"], request_id.as_str());
}

#[tokio::test]
async fn each_user_gets_a_burst_then_429_with_retry_after_and_ratelimit_headers() {
    let app = super::helpers::spawn_app_with(|c| {
        c.rate_limit.requests_per_second = 1.0;
        c.rate_limit.burst = 3;
    })
    .await;
    for remaining in [2, 1, 0] {
        let (status, _) = app.get_json("alice", "/api/v1/chats").await;
        assert_eq!(status, 200);
        let response = app
            .client
            .get(app.url("/api/v1/bots"))
            .bearer_auth(app.token("carol"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["ratelimit-limit"], "3");
        assert_eq!(
            response.headers()["ratelimit-remaining"],
            remaining.to_string().as_str()
        );
    }

    let refused = app
        .client
        .get(app.url("/api/v1/chats"))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();

    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["ratelimit-remaining"], "0");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["code"], "rate_limited");
    // Another user is not affected, and neither are health checks.
    assert_eq!(app.get_json("bob", "/api/v1/chats").await.0, 200);
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn unauthenticated_requests_are_limited_per_address_and_spoofing_does_not_help() {
    let app = super::helpers::spawn_app_with(|c| {
        c.rate_limit.requests_per_second = 1.0;
        c.rate_limit.burst = 2;
    })
    .await;
    let guess = |n: u32| {
        app.client
            .get(app.url("/api/v1/chats"))
            .bearer_auth(format!("guess-{n}"))
            .header("x-forwarded-for", format!("198.51.100.{n}"))
            .send()
    };
    assert_eq!(guess(1).await.unwrap().status(), 401);
    assert_eq!(guess(2).await.unwrap().status(), 401);
    // A new X-Forwarded-For from an untrusted peer is the same client: still limited.
    let limited = guess(3).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    // A real user's token has its own allowance.
    assert_eq!(app.get_json("alice", "/api/v1/chats").await.0, 200);
}

#[tokio::test]
async fn a_user_may_hold_only_so_many_streams_at_once() {
    use super::fake_upstream::Script;
    let app = super::helpers::spawn_app_with(|c| c.rate_limit.max_concurrent_streams = 2).await;
    app.fake.push(Script::tokens(&["a"]).gated());
    app.fake.push(Script::tokens(&["b"]).gated());
    let (first, _) = app.open_stream("alice", "one").await;
    let (_second, _) = app.open_stream("alice", "two").await;

    let third = app
        .post_stream(
            "alice",
            serde_json::json!({"bot_id": super::helpers::BOT, "message": "three"}),
        )
        .await;
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["code"], "too_many_streams");
    assert_eq!(
        app.get_json("alice", "/api/v1/chats").await.1["chats"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Another user is not affected; closing a stream gives its place back.
    let (_other, _) = app.open_stream("bob", "mine").await;
    drop(first);
    app.fake.release(3);
    let fourth = tokio::time::timeout(HANG_GUARD, async {
        loop {
            let response = app
                .post_stream(
                    "alice",
                    serde_json::json!({"bot_id": super::helpers::BOT, "message": "four"}),
                )
                .await;
            if response.status() == 200 {
                return response;
            }
            assert_eq!(response.status(), 429);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(fourth.status(), 200);
}

#[tokio::test]
async fn a_stream_ticket_opens_one_stream_once_instead_of_a_token_in_the_url() {
    let app = spawn_app().await;
    let issue = || {
        app.client
            .post(app.url("/api/v1/stream-tickets"))
            .bearer_auth(app.token("alice"))
            .send()
    };
    let response = issue().await.unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["expires_in"], 60);
    let ticket = body["ticket"].as_str().unwrap().to_owned();
    let stream = |ticket: String| {
        app.client
            .get(app.url("/api/v1/chat/stream"))
            .query(&[
                ("bot_id", super::helpers::BOT),
                ("message", "hi"),
                ("ticket", &ticket),
            ])
            .send()
    };

    let first = stream(ticket.clone()).await.unwrap();
    assert_eq!(first.status(), 200);
    let events = super::helpers::SseReader::new(first).collect().await;
    assert_eq!(events.last().unwrap().event, "done");
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.get_json("alice", "/api/v1/chats").await.1["chats"][0]["chat_id"],
        chat_id.as_str()
    );

    let again = stream(ticket).await.unwrap();
    assert_eq!(again.status(), 401, "a ticket works once");
    assert_eq!(stream("made-up".into()).await.unwrap().status(), 401);
    // Tickets are for the GET stream endpoints only, and issuing one needs a real token.
    let ticket = issue().await.unwrap().json::<Value>().await.unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    let listing = app
        .client
        .get(app.url(&format!("/api/v1/chats?ticket={ticket}")))
        .send()
        .await
        .unwrap();
    assert_eq!(listing.status(), 401);
    let resume = app
        .client
        .get(app.url(&format!("/api/v1/chats/{chat_id}/stream?ticket={ticket}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resume.status(), 200);
    let unauthenticated = app
        .client
        .post(app.url("/api/v1/stream-tickets"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
}

/// One sample of the Prometheus text format.
struct Sample {
    name: String,
    labels: std::collections::HashMap<String, String>,
    value: f64,
}

/// Scrapes `/metrics` and parses the Prometheus text format (label values may hold any
/// character, braces of route templates included, with `\\`, `\"` and `\n` escapes).
async fn scrape(app: &super::helpers::TestApp, url: &str) -> Vec<Sample> {
    let text = app
        .client
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line}"));
            let Some((name, labels)) = series.split_once('{') else {
                return Sample {
                    name: series.to_owned(),
                    labels: Default::default(),
                    value,
                };
            };
            let mut parsed = std::collections::HashMap::new();
            let mut chars = labels
                .strip_suffix('}')
                .expect("closing brace")
                .chars()
                .peekable();
            while chars.peek().is_some() {
                let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                assert_eq!(chars.next(), Some('"'), "{line}");
                let mut value = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some(other) => value.push(other),
                            None => panic!("{line}"),
                        },
                        '"' => break,
                        c => value.push(c),
                    }
                }
                parsed.insert(key.trim_start_matches(',').to_owned(), value);
                if chars.peek() == Some(&',') {
                    chars.next();
                }
            }
            Sample {
                name: name.to_owned(),
                labels: parsed,
                value,
            }
        })
        .collect()
}

/// The sum of matching samples; for a histogram name, its `_count`.
fn sample(scrape: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let count = format!("{name}_count");
    scrape
        .iter()
        .filter(|s| s.name == name || s.name == count)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum::<f64>()
        + 0.0
}

#[tokio::test]
async fn metrics_count_what_happened() {
    use super::fake_upstream::Script;
    use super::helpers::{BOT, MODEL};
    let app = spawn_app().await;
    let events = app
        .chat("alice", serde_json::json!({"bot_id": BOT, "message": "hi"}))
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();
    app.fake
        .push(Script::http_error(429, "ThrottlingException"));
    app.chat(
        "alice",
        serde_json::json!({"bot_id": BOT, "message": "again"}),
    )
    .await;
    let resumed = app
        .client
        .get(app.url(&format!("/api/v1/chats/{chat_id}/stream")))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    super::helpers::SseReader::new(resumed).collect().await;
    for _ in 0..3 {
        assert_eq!(app.get_json("alice", "/api/v1/chats").await.0, 200);
    }

    let metrics = scrape(&app, &app.url("/metrics")).await;

    let route = |path: &str, status: &str| {
        sample(
            &metrics,
            "mangoo_http_requests_total",
            &[("route", path), ("status", status)],
        )
    };
    assert_eq!(route("/api/v1/chats", "200"), 3.0);
    assert_eq!(route("/api/v1/chat/stream", "200"), 2.0);
    assert_eq!(route("/api/v1/chats/{chat_id}/stream", "200"), 1.0);
    assert_eq!(
        sample(&metrics, "mangoo_streams_total", &[("outcome", "done")]),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "mangoo_streams_total",
            &[("outcome", "upstream_throttled")]
        ),
        1.0
    );
    assert_eq!(sample(&metrics, "mangoo_streams_open", &[]), 0.0);
    assert_eq!(sample(&metrics, "mangoo_resumes_total", &[]), 1.0);
    let upstream = [("provider", "bedrock"), ("model", MODEL)];
    assert_eq!(
        sample(&metrics, "mangoo_time_to_first_token_seconds", &upstream),
        1.0
    );
    assert_eq!(
        sample(&metrics, "mangoo_inter_token_gap_seconds", &upstream),
        3.0
    );
    assert_eq!(
        sample(
            &metrics,
            "mangoo_upstream_errors_total",
            &[("code", "upstream_throttled")]
        ),
        1.0
    );
    let tokens = |direction| {
        sample(
            &metrics,
            "mangoo_tokens_total",
            &[("provider", "bedrock"), ("direction", direction)],
        )
    };
    assert_eq!(tokens("input"), 12.0);
    assert_eq!(tokens("output"), 4.0);
    assert_eq!(sample(&metrics, "mangoo_stream_duration_seconds", &[]), 2.0);
}

#[tokio::test]
async fn metrics_can_need_a_bearer_token_or_move_to_their_own_listener() {
    let app = super::helpers::spawn_app_with(|c| {
        c.metrics.bearer_token = Some(mangoo::config::Secret::new("scrape-me"));
    })
    .await;
    let open = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(open.status(), 401);
    let authorised = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth("scrape-me")
        .send()
        .await
        .unwrap();
    assert_eq!(authorised.status(), 200);
    assert!(
        authorised
            .text()
            .await
            .unwrap()
            .contains("mangoo_streams_open")
    );

    let app =
        super::helpers::spawn_app_with(|c| c.metrics.listen = Some("127.0.0.1:0".into())).await;
    let main = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(main.status(), 404, "not on the main listener any more");
    let elsewhere = format!("http://{}/metrics", app.metrics_addr.unwrap());
    let metrics = scrape(&app, &elsewhere).await;
    assert_eq!(sample(&metrics, "mangoo_streams_open", &[]), 0.0);
}

#[tokio::test]
async fn streams_work_over_cleartext_http2_beside_http1() {
    let app = spawn_app().await;
    let h2 = crate::helpers::client_builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();

    let response = h2
        .post(app.url("/api/v1/chat/stream"))
        .bearer_auth(app.token("alice"))
        .json(&serde_json::json!({"bot_id": super::helpers::BOT, "message": "over h2c"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(
        response.headers().get("connection").is_none(),
        "no connection header on h2"
    );
    let events = super::helpers::SseReader::new(response).collect().await;
    super::helpers::assert_well_formed(&events);
    assert_eq!(super::helpers::answer_text(&events), "Hello, world!");
    // The same port still speaks HTTP/1.1.
    let h1 = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(h1.version(), reqwest::Version::HTTP_11);
}

#[tokio::test]
async fn with_tls_browsers_get_http2_through_alpn() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, certified.cert.pem()).unwrap();
    std::fs::write(&key_file, certified.signing_key.serialize_pem()).unwrap();
    let app = super::helpers::spawn_app_with(|c| {
        c.server.tls = Some(mangoo::config::TlsConfig {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        });
    })
    .await;
    let client = crate::helpers::client_builder()
        .no_proxy()
        .add_root_certificate(
            reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap(),
        )
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/api/v1/chat/stream", app.addr.port());

    let response = client
        .post(&url)
        .bearer_auth(app.token("alice"))
        .json(&serde_json::json!({"bot_id": super::helpers::BOT, "message": "over TLS"}))
        .send()
        .await
        .unwrap();

    assert_eq!(
        response.version(),
        reqwest::Version::HTTP_2,
        "ALPN chose h2"
    );
    let events = super::helpers::SseReader::new(response).collect().await;
    super::helpers::assert_well_formed(&events);
    assert_eq!(super::helpers::answer_text(&events), "Hello, world!");
    let http1 = crate::helpers::client_builder()
        .no_proxy()
        .http1_only()
        .add_root_certificate(
            reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap(),
        )
        .build()
        .unwrap();
    let health = http1
        .get(format!("https://localhost:{}/healthz", app.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.version(), reqwest::Version::HTTP_11);
    assert_eq!(health.status(), 200);
    // Cleartext on a TLS port gets nowhere.
    assert!(app.client.get(app.url("/healthz")).send().await.is_err());
}

#[tokio::test]
async fn a_missing_tls_file_stops_the_start_and_names_the_key() {
    let mut config = mangoo::config::Config::default();
    config.server.bind = "127.0.0.1:0".into();
    config.database.url = "sqlite::memory:".into();
    config.server.tls = Some(mangoo::config::TlsConfig {
        cert_file: "/nonexistent/cert.pem".into(),
        key_file: "/nonexistent/key.pem".into(),
    });
    let err = mangoo::startup::Application::build(config)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("server.tls.cert_file"), "{err}");
}

/// `[metrics] log_gauges_secs`: the open streams and connections as a JSON log line (for
/// log-based metrics such as CloudWatch metric filters); the first at start.
#[tokio::test]
async fn gauges_can_be_logged_for_log_based_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mangoo.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n\
             [metrics]\nlog_gauges_secs = 60\n[auth]\njwt_secret = \"{SECRET}\"\n\
             [database]\nurl = \"sqlite://{}/m.db\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (child, _) = serve_with_config(&config).await;
    let (_, stderr) = terminate(child).await;
    let gauges: Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["target"] == "mangoo::gauges")
        .expect("a gauges line");
    assert_eq!(gauges["open_streams"], 0);
    assert!(gauges["open_connections"].is_number(), "{gauges}");
}
