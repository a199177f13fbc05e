//! The official `openai` Python SDK (PyPI, installed by scripts/test.sh) against a running
//! Mangoo: `tests/clients/openai_sdk.py` streams with usage, asks unstreamed and carries the chat
//! on, gets the SDK's own exceptions for Mangoo's errors, lists the bots as models and resumes a
//! dropped stream through the SDK's stream parser.

use std::path::PathBuf;

use super::helpers::run_client;
use super::openai_api::{GPT, spawn_openai_app};

#[tokio::test]
async fn the_official_openai_python_sdk_streams_resumes_and_raises_its_own_errors() {
    let app = spawn_openai_app().await;
    let python = std::env::var("OPENAI_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/mangoo-venv/bin/python")
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_sdk.py");
    let report = run_client(
        tokio::process::Command::new(&python)
            .arg(&script)
            .env("BASE_URL", app.url("/v1"))
            .env("TOKEN", app.token("sdk-user"))
            .env("CONTROL_URL", app.fake.url())
            .env("MODEL", GPT),
        "scripts/test.sh installs python with the openai SDK",
        "the openai SDK checks failed",
    )
    .await;
    assert!(
        report.contains("ok a_dropped_stream_resumes_without_a_duplicate"),
        "every check ran:\n{report}"
    );
}
