//! The load generator keeps working: a brief run against the stand-in directly and through a real
//! Mangoo, every stream verified token by token. (Numbers live in docs/benchmarks.md, not here.)

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::helpers::{HANG_GUARD, bot, spawn_app_with};

async fn load(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_mangoo-bench"))
        .arg("load")
        .args(args)
        .args(["--streams", "8", "--tokens", "12", "--rate", "0"])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    assert!(output.status.success(), "{report}");
    report
}

#[tokio::test]
async fn the_load_generator_measures_a_direct_baseline_and_mangoo() {
    let mut upstream = Command::new(env!("CARGO_BIN_EXE_mangoo-bench"))
        .args(["upstream", "--bind", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(upstream.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(HANG_GUARD, async {
        loop {
            let line = lines.next_line().await.unwrap().unwrap();
            if let Some(url) = line.strip_prefix("stand-in listening on ") {
                return url.trim().to_owned();
            }
        }
    })
    .await
    .unwrap();
    let base_url = format!("{url}/v1");
    let app = spawn_app_with(move |c| {
        c.providers.openai.as_mut().unwrap().base_url = base_url;
        c.bots = vec![bot("bench", "openai", "bench")];
    })
    .await;

    let (mangoo_url, token) = (format!("http://{}", app.addr), app.token("bench"));
    let through_mangoo = [
        "--target",
        "mangoo",
        "--url",
        &mangoo_url,
        "--token",
        &token,
    ];
    let direct = load(&["--target", "direct", "--url", &url]).await;
    let relayed = load(&through_mangoo).await;

    for report in [&direct, &relayed] {
        assert_eq!(report["errors"], 0, "{report}");
        assert_eq!(report["tokens_relayed"], 8 * 12, "{report}");
        assert!(report["token_latency_us"]["p99"].as_f64().unwrap() > 0.0);
        assert!(report["first_byte_us"]["p50"].as_f64().unwrap() > 0.0);
    }

    // Steady state: each of the 8 workers starts a new stream when its last one ends, for a
    // while; every stream is still verified.
    let steady = load(&[&through_mangoo[..], &["--duration-secs", "0.3"]].concat()).await;
    let runs = steady["streams_run"].as_u64().unwrap();
    assert!(runs >= 8, "{steady}");
    assert_eq!(steady["errors"], 0, "{steady}");
    assert_eq!(
        steady["tokens_relayed"].as_u64(),
        Some(runs * 12),
        "{steady}"
    );
}
