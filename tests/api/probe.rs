//! `mangoo probe` run as users run it — the binary, against a real Mangoo — directly (every
//! check ok, exit 0) and through paths that break streams the classic ways: Debian's nginx
//! buffering or compressing, a proxy that cuts idle connections, a wrong origin, a refused token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::process::{Child, Command};

use super::helpers::{SECRET, TestApp, spawn_app_with};
use super::idle_proxy::IdleProxy;
use super::nginx::start_nginx;

const ORIGIN: &str = "https://app.example.com";

async fn app() -> TestApp {
    spawn_app_with(|c| {
        c.server.heartbeat_secs = 1;
        c.cors.allowed_origins = vec![ORIGIN.to_owned()];
    })
    .await
}

struct Probed {
    code: i32,
    report: Value,
}

impl Probed {
    fn check(&self, name: &str) -> &Value {
        self.report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {}", self.report))
    }

    fn problems(&self) -> Vec<&str> {
        self.report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == "problem")
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }
}

async fn probe(url: &str, token: &str, extra: &[&str]) -> Probed {
    let idle: &[&str] = match extra.contains(&"--idle") {
        true => &[],
        false => &["--idle", "2"],
    };
    let output = Command::new(env!("CARGO_BIN_EXE_mangoo"))
        .args(["probe", url, "--token", token, "--json"])
        .args(idle)
        .args(extra)
        .env_remove("MANGOO_TOKEN")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "probe printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    Probed {
        code: output.status.code().unwrap(),
        report,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directly_every_check_passes_and_the_exit_code_is_zero() {
    let app = app().await;
    let probed = probe(
        &app.url("/"),
        &app.token("probe"),
        &["--origin", ORIGIN, "--ticket", "--without-heartbeats"],
    )
    .await;

    assert_eq!(probed.problems(), Vec::<&str>::new(), "{}", probed.report);
    assert_eq!(probed.code, 0);
    assert_eq!(probed.report["healthy"], true);
    for name in [
        "reachable",
        "tls",
        "ready",
        "auth",
        "eventsource",
        "headers",
        "buffering",
        "idle",
        "idle-raw",
        "resume",
        "cors",
    ] {
        assert_eq!(
            probed.check(name)["status"],
            "ok",
            "{name}: {}",
            probed.report
        );
    }
    assert!(app.fake.requests().is_empty(), "no model was called");

    // The text report: one line per check, and the same verdict.
    let text = Command::new(env!("CARGO_BIN_EXE_mangoo"))
        .args([
            "probe",
            &app.url("/"),
            "--token",
            &app.token("probe"),
            "--idle",
            "1",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("ok       buffering"), "{text}");
    assert!(text.ends_with("healthy: every check passed\n"), "{text}");
}

/// Debian's nginx in front of `app`: `proxy_pass` and `directives` in its one location.
async fn nginx(app: &TestApp, directives: &str) -> (Child, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let location = format!(
        "location / {{\n      proxy_pass http://{upstream};\n      {directives}\n    }}",
        upstream = app.addr
    );
    let (nginx, base) = start_nginx(dir.path(), "", &location).await;
    (nginx, format!("{base}/"), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffering_nginx_is_reported_with_how_long_it_held_events() {
    let app = app().await;
    let (_nginx, base, _dir) = nginx(
        &app,
        // nginx's defaults (HTTP/1.0 to the upstream, buffering on), and Mangoo's
        // X-Accel-Buffering: no ignored: the response is held until it ends.
        "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;",
    )
    .await;

    let probed = probe(&base, &app.token("probe"), &[]).await;

    assert_eq!(probed.code, 1, "{}", probed.report);
    assert_eq!(probed.report["healthy"], false);
    let buffering = probed.check("buffering");
    assert_eq!(buffering["status"], "problem", "{}", probed.report);
    assert!(
        buffering["detail"]
            .as_str()
            .unwrap()
            .contains("held back up to"),
        "{buffering}"
    );
    assert!(
        buffering["fix"]
            .as_str()
            .unwrap()
            .contains("proxy_buffering off")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nginx_compressing_event_streams_is_reported() {
    let app = app().await;
    let (_nginx, base, _dir) = nginx(
        &app,
        "proxy_http_version 1.1; proxy_buffering off; \
         gzip on; gzip_min_length 1; gzip_types text/event-stream;",
    )
    .await;

    let probed = probe(&base, &app.token("probe"), &[]).await;

    assert_eq!(probed.code, 1);
    assert_eq!(
        probed.problems(),
        ["headers"],
        "measured uncompressed after: {}",
        probed.report
    );
    let headers = probed.check("headers");
    assert!(
        headers["detail"]
            .as_str()
            .unwrap()
            .contains("Content-Encoding: gzip"),
        "{headers}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cutting_idle_connections_is_reported_with_when_it_cut() {
    // Mangoo's heartbeat (15 s, the default) is longer than the proxy's 1 s idle limit.
    let app = spawn_app_with(|_| {}).await;
    let proxy = IdleProxy::start(app.addr, Duration::from_secs(1)).await;

    let probed = probe(&proxy.url("/"), &app.token("probe"), &["--idle", "3"]).await;

    assert_eq!(probed.code, 1);
    assert_eq!(probed.problems(), ["idle"], "{}", probed.report);
    let idle = probed.check("idle");
    let detail = idle["detail"].as_str().unwrap();
    assert!(detail.starts_with("the stream was cut after"), "{detail}");
    let cut_after: f64 = detail
        .trim_start_matches("the stream was cut after ")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cut_after < 3.0, "cut before the silence ended: {detail}");
    assert!(idle["fix"].as_str().unwrap().contains("heartbeat"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_origin_and_refused_tokens_are_reported_with_why() {
    let app = app().await;
    let probed = probe(
        &app.url("/"),
        &app.token("probe"),
        &["--origin", "https://evil.example"],
    )
    .await;
    assert_eq!(probed.code, 1);
    assert_eq!(probed.problems(), ["cors"], "{}", probed.report);
    assert!(
        probed.check("cors")["fix"]
            .as_str()
            .unwrap()
            .contains("cors.allowed_origins")
    );

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "probe", "exp": now - 60}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let probed = probe(&app.url("/"), &expired, &[]).await;
    assert_eq!(probed.code, 1);
    let auth = probed.check("auth");
    assert_eq!(auth["status"], "problem");
    assert!(auth["detail"].as_str().unwrap().contains("401"), "{auth}");
    assert!(auth["fix"].as_str().unwrap().contains("expired"), "{auth}");
    assert_eq!(probed.check("buffering")["status"], "skipped");

    let probed = probe(&app.url("/"), "not-a-token", &[]).await;
    assert_eq!(probed.code, 1);
    assert!(
        probed.check("auth")["fix"]
            .as_str()
            .unwrap()
            .contains("not valid")
    );
}
