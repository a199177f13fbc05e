//! The web chat page end to end in a real headless Chromium: `e2e/chat.test.mjs` (node's test
//! runner + playwright-core) drives the page served by a real Mangoo, through a proxy that can
//! cut connections, against the test upstream, which the script controls over HTTP.
//! Screenshots land in `target/e2e-artifacts/`.

use std::path::PathBuf;
use std::time::Duration;

use mangoo::config::DisconnectPolicy;
use tokio::process::Command;

use super::helpers::spawn_app_with;
use super::idle_proxy::IdleProxy;

#[tokio::test]
async fn the_chat_page_works_in_a_real_browser() {
    // The dropped-connection test expects the answer to go on while the page reconnects.
    let app = spawn_app_with(|c| c.streams.on_disconnect = DisconnectPolicy::Continue).await;
    let proxy = IdleProxy::cuttable(app.addr, Duration::from_secs(3600), app.fake.cuts()).await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let artifacts = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("e2e-artifacts");

    let output = Command::new("node")
        .args(["--test", "--test-reporter=spec", "chat.test.mjs"])
        .current_dir(root.join("e2e"))
        .env("APP_URL", proxy.url("/"))
        .env("TOKEN", app.token("alice"))
        .env("CONTROL_URL", app.fake.url())
        .env("ARTIFACTS", &artifacts)
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs (scripts/test.sh installs it, with playwright-core and chromium)");

    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "browser tests failed:\n{report}");
    assert!(artifacts.join("2-streaming.png").is_file());
}
