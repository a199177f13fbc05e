//! The web chat page end to end in a real headless Chromium: `e2e/chat.test.mjs` and
//! `e2e/daily.test.mjs` (node's test runner + playwright-core, one after the other) drive the
//! page served by a real Mangoo, through a proxy that can cut connections, against the test
//! upstream, which the scripts control over HTTP.
//!
//! Two servers: the main one with the default disconnect policy (cancel after a 30 s grace
//! period, long enough for any reload to come back), and one whose grace is 1 s, for the test
//! where nobody comes back. Screenshots land in `target/e2e-artifacts/`; the README's, taken at
//! 1280×800 and 375×700 in both themes, in `docs/screenshots/`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use tokio::process::Command;

use super::helpers::{SECRET, run_client, spawn_app_with};
use super::idle_proxy::IdleProxy;

fn signed(claims: serde_json::Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn the_chat_page_works_in_a_real_browser() {
    let app = spawn_app_with(|c| c.streams.disconnect_grace_secs = 30).await;
    let short_grace = spawn_app_with(|c| c.streams.disconnect_grace_secs = 1).await;
    let proxy = IdleProxy::cuttable(app.addr, Duration::from_secs(3600), app.fake.cuts()).await;
    let short_grace_proxy = IdleProxy::cuttable(
        short_grace.addr,
        Duration::from_secs(3600),
        short_grace.fake.cuts(),
    )
    .await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let artifacts = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("e2e-artifacts");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = signed(
        serde_json::json!({"sub": "alice", "exp": now - 3600}),
        SECRET.as_bytes(),
    );
    let forged = signed(
        serde_json::json!({"sub": "alice", "exp": now + 3600}),
        b"not the server's secret",
    );

    // E2E_ONLY=<pattern> runs the tests whose names match (and the sign-in they need).
    let mut args = vec![
        "--test".to_owned(),
        "--test-reporter=spec".to_owned(),
        "--test-concurrency=1".to_owned(),
    ];
    if let Ok(only) = std::env::var("E2E_ONLY") {
        args.push(format!("--test-name-pattern=printed link|{only}"));
    }
    args.extend(["chat.test.mjs".to_owned(), "daily.test.mjs".to_owned()]);
    let report = run_client(
        Command::new("node")
            .args(&args)
            .current_dir(root.join("e2e"))
            .env("APP_URL", proxy.url("/"))
            .env("TOKEN", app.token("alice"))
            .env("EXPIRED_TOKEN", expired)
            .env("FORGED_TOKEN", forged)
            // For tokens the script mints itself (one that expires while the page is open).
            .env("JWT_SECRET", SECRET)
            .env("JWT_LEEWAY_SECS", mangoo::auth::LEEWAY_SECS.to_string())
            .env("CONTROL_URL", app.fake.url())
            .env("SHORT_GRACE_URL", short_grace_proxy.url("/"))
            .env("SHORT_GRACE_TOKEN", short_grace.token("carol"))
            .env("SHORT_GRACE_CONTROL_URL", short_grace.fake.url())
            .env("ARTIFACTS", &artifacts)
            .env("SCREENSHOTS", root.join("docs").join("screenshots")),
        "scripts/test.sh installs node, playwright-core and chromium",
        "browser tests failed",
    )
    .await;
    if std::env::var_os("E2E_ONLY").is_some() {
        return;
    }
    // One test of each file passed: both ran.
    assert!(report.contains("✔ a 105-turn chat"), "{report}");
    assert!(report.contains("✔ the printed link signs in"), "{report}");
    assert!(artifacts.join("2-streaming.png").is_file());
    for shot in ["desktop-light", "desktop-dark", "phone-light", "phone-dark"] {
        let path = root.join(format!("docs/screenshots/{shot}.png"));
        assert!(path.is_file(), "{} was saved", path.display());
    }
}
