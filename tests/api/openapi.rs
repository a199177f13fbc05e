//! The OpenAPI document: it describes every route, and schemathesis (from PyPI; scripts/test.sh
//! installs it into a venv) generates requests from it against the real server and finds no 5xx
//! and no response that breaks the schema.

use serde_json::Value;

use super::helpers::{run_client, spawn_app};

/// Every route the router serves under /api and for health, and the spec's paths, agree.
#[tokio::test]
async fn the_document_lists_every_api_route() {
    let app = spawn_app().await;
    let spec: Value = app
        .client
        .get(app.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    let mut paths: Vec<&str> = spec["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "/api/v1/admin/usage",
            "/api/v1/ai-sdk/chat",
            "/api/v1/ai-sdk/chat/{chat_id}/stream",
            "/api/v1/bots",
            "/api/v1/chat/stream",
            "/api/v1/chats",
            "/api/v1/chats/search",
            "/api/v1/chats/{chat_id}",
            "/api/v1/chats/{chat_id}/messages",
            "/api/v1/chats/{chat_id}/messages/{message_id}",
            "/api/v1/chats/{chat_id}/stop",
            "/api/v1/chats/{chat_id}/stream",
            "/api/v1/diagnostics/stream",
            "/api/v1/limits",
            "/api/v1/stream-tickets",
            "/api/v1/usage",
            "/healthz",
            "/readyz",
            "/v1/chat/completions",
            "/v1/chats/{chat_id}/completions/stream",
            "/v1/models",
            "/v1/models/{model}",
        ]
    );
    let schemas = spec["components"]["schemas"].as_object().unwrap();
    for schema in [
        "ErrorBody",
        "StartData",
        "ContentData",
        "DoneData",
        "ErrorData",
        "StreamRequest",
    ] {
        assert!(schemas.contains_key(schema), "{schema} is described");
    }
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let app = spawn_app().await;
    let schemathesis = std::env::var("SCHEMATHESIS").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/mangoo-venv/bin/schemathesis")
    });
    run_client(
        tokio::process::Command::new(&schemathesis)
            .args(["run", &app.url("/api/v1/openapi.json")])
            .args([
                "--header",
                &format!("Authorization: Bearer {}", app.token("fuzzer")),
            ])
            .args(["--checks", "not_a_server_error,response_schema_conformance"])
            // Paced by design (up to 1000 events 10 s apart): tests/api/diagnostics.rs covers it.
            .args(["--exclude-path", "/api/v1/diagnostics/stream"])
            .args([
                "--max-examples",
                "25",
                "--workers",
                "1",
                "--request-timeout",
                "20",
            ])
            .arg("--generation-deterministic")
            .env("NO_COLOR", "1")
            .env("SCHEMATHESIS_TELEMETRY", "false"),
        "scripts/test.sh installs schemathesis",
        "schemathesis found problems",
    )
    .await;
}
