//! The Vercel AI SDK's UI message stream: byte for byte over HTTP here, and with the real `ai`
//! npm package in `e2e/ai_sdk.test.mjs` (its `AbstractChat` and `DefaultChatTransport`, run by
//! node) through a proxy that cuts connections.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use super::fake_upstream::Script;
use super::helpers::{SseEvent, SseReader, TestApp, run_client, spawn_app_with};
use super::idle_proxy::IdleProxy;

async fn post_chat(app: &TestApp, user: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/ai-sdk/chat"))
        .bearer_auth(app.token(user))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn ui_message(id: &str, role: &str, text: &str) -> Value {
    json!({"id": id, "role": role, "parts": [{"type": "text", "text": text}]})
}

fn parts_of(events: &[SseEvent]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(SseEvent::json)
        .collect()
}

#[tokio::test]
async fn the_ui_message_stream_is_the_sdks_protocol_v1_and_the_chat_is_the_clients_id() {
    let app = spawn_app_with(|_| {}).await;
    let response = post_chat(
        &app,
        "alice",
        json!({"id": "chat-from-the-client", "trigger": "submit-message", "messages": [
            ui_message("u0", "user", "Say hi"),
            ui_message("a0", "assistant", "Hi!"),
            ui_message("u1", "user", "Say hello"),
        ]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-vercel-ai-ui-message-stream"], "v1");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = SseReader::new(response).collect().await;
    let parts = parts_of(&events);
    let kinds: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "start",
            "text-start",
            "text-delta",
            "text-delta",
            "text-delta",
            "text-delta",
            "text-end",
            "finish"
        ]
    );
    let message_id = parts[0]["messageId"].as_str().unwrap();
    let text: String = parts.iter().filter_map(|p| p["delta"].as_str()).collect();
    assert_eq!(text, "Hello, world!");
    assert!(
        parts[1..7].iter().all(|p| p["id"] == parts[1]["id"]),
        "one text part"
    );
    assert_eq!(parts[7]["finishReason"], "stop");
    assert_eq!(events.last().unwrap().data, "[DONE]");

    let stored = app.settled_messages("alice", "chat-from-the-client").await;
    let texts: Vec<&str> = stored
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["Say hi", "Hi!", "Say hello", "Hello, world!"]);
    assert_eq!(stored[3]["id"], message_id);

    // Another user's request on that id is refused, and learns nothing.
    let mallory = post_chat(
        &app,
        "mallory",
        json!({"id": "chat-from-the-client", "messages": [ui_message("u", "user", "mine?")]}),
    )
    .await;
    assert_eq!(mallory.status(), 404);
    let resume = app
        .client
        .get(app.url("/api/v1/ai-sdk/chat/chat-from-the-client/stream"))
        .bearer_auth(app.token("mallory"))
        .send()
        .await
        .unwrap();
    assert_eq!(resume.status(), 204);

    // A failing answer ends with the SDK's error part.
    app.fake
        .push(Script::http_error(400, "ValidationException"));
    let failing = post_chat(
        &app,
        "alice",
        json!({"id": "chat-that-fails", "messages": [ui_message("u", "user", "hi")]}),
    )
    .await;
    let events = SseReader::new(failing).collect().await;
    let last = parts_of(&events).pop().unwrap();
    assert_eq!(last["type"], "error");
    assert!(last["errorText"].as_str().is_some_and(|t| !t.is_empty()));

    for bad in [
        json!({"id": "x", "messages": []}),
        json!({"id": "bad id!", "messages": [ui_message("u", "user", "hi")]}),
        json!({"id": "x", "trigger": "dance", "messages": [ui_message("u", "user", "hi")]}),
        json!({"id": "x", "messages": [{"id": "u", "role": "user", "parts": [{"type": "file", "url": "data:,"}]}]}),
    ] {
        let response = post_chat(&app, "alice", bad.clone()).await;
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], "error", "the contract's error shape");
    }
}

#[tokio::test]
async fn the_ai_npm_package_sends_streams_regenerates_resumes_after_a_cut_and_stops() {
    let app = spawn_app_with(|c| c.streams.disconnect_grace_secs = 30).await;
    let proxy = IdleProxy::cuttable(app.addr, Duration::from_secs(3600), app.fake.cuts()).await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let report = run_client(
        tokio::process::Command::new("node")
            .args([
                "--test",
                "--test-reporter=spec",
                "--test-concurrency=1",
                "ai_sdk.test.mjs",
            ])
            .current_dir(root.join("e2e"))
            .env("APP_URL", proxy.url("/"))
            .env("TOKEN", app.token("sdk-user"))
            .env("CONTROL_URL", app.fake.url()),
        "scripts/test.sh installs node's e2e packages",
        "the ai SDK checks failed",
    )
    .await;
    assert!(
        report.contains("✔ stop ends the answer"),
        "every test ran:\n{report}"
    );
}
