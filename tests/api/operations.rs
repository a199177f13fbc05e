//! Operations: request ids, trusted proxies and structured logs.

use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::binary::mangoo;
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
    let mut child = mangoo()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = tokio::time::timeout(HANG_GUARD, async {
        loop {
            let line = lines.next_line().await.unwrap().unwrap();
            if let Some(url) = line.strip_prefix("Mangoo listening on ") {
                return url.trim().to_owned();
            }
        }
    })
    .await
    .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let token = mangoo::auth::Authenticator::hs256(SECRET.as_bytes())
        .issue("alice", Duration::from_secs(60));
    let response = client
        .get(format!("{base}/api/v1/chats?token={token}"))
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
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    tokio::time::timeout(HANG_GUARD, child.wait())
        .await
        .unwrap()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
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
