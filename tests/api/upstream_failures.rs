//! Upstream failures never hang and never end in `done`: before the first token they become a
//! start followed by an error event, after it an error event after the tokens already sent.

use serde_json::json;

use super::fake_upstream::Script;
use super::helpers::{BOT, SseReader, answer_text, assert_well_formed, spawn_app, spawn_app_with};

/// Streams one answer under `script` and returns its events and the stored assistant message.
async fn answer_with(script: Script) -> (Vec<super::helpers::SseEvent>, serde_json::Value) {
    let app = spawn_app().await;
    app.fake.push(script);
    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "hi"}))
        .await;
    assert_well_formed(&events);
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();
    let messages = app.settled_messages("alice", &chat_id).await;
    (events, messages[1].clone())
}

fn assert_error_end(events: &[super::helpers::SseEvent], code: &str, retryable: bool) {
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:?}");
    let data = last.json();
    assert_eq!(data["type"], "error");
    assert_eq!(data["code"], code, "{data}");
    assert_eq!(data["retryable"], retryable, "{data}");
    assert!(!data["error"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn throttling_before_the_first_token_is_a_retryable_error() {
    let (events, stored) = answer_with(Script::http_error(429, "ThrottlingException")).await;
    assert_eq!(events.len(), 2, "start, then the error: {events:?}");
    assert_error_end(&events, "upstream_throttled", true);
    // Our own words: the upstream's message (an AccessDenied names account and role ARNs)
    // stays in the log.
    let said = events[1].json()["error"].as_str().unwrap().to_owned();
    assert_eq!(said, "Bedrock is limiting requests; retry shortly");
    assert_eq!(stored["status"], "error");
    assert_eq!(stored["error_code"], "upstream_throttled");
}

#[tokio::test]
async fn a_rejected_request_is_not_retryable() {
    let (events, _) = answer_with(Script::http_error(400, "ValidationException")).await;
    assert_error_end(&events, "upstream_invalid_request", false);
    let (events, _) = answer_with(Script::http_error(403, "AccessDeniedException")).await;
    assert_error_end(&events, "upstream_access_denied", false);
    let said = events.last().unwrap().json()["error"].to_string();
    assert!(!said.contains("from the test endpoint"), "{said}");
    assert!(!said.contains("AccessDeniedException"), "{said}");
}

#[tokio::test]
async fn an_unavailable_service_is_retryable() {
    let (events, _) = answer_with(Script::http_error(503, "ServiceUnavailableException")).await;
    assert_error_end(&events, "upstream_unavailable", true);
    let (events, _) = answer_with(Script::http_error(500, "InternalServerException")).await;
    assert_error_end(&events, "upstream_error", true);
}

#[tokio::test]
async fn an_exception_frame_mid_stream_ends_with_an_error_after_the_tokens() {
    let script =
        Script::tokens(&["one", " two", " three"]).exception_at(2, "modelStreamErrorException");
    let (events, stored) = answer_with(script).await;
    assert_eq!(answer_text(&events), "one two");
    assert_error_end(&events, "upstream_error", true);
    let said = events.last().unwrap().json()["error"].to_string();
    assert!(!said.contains("ModelStreamErrorException"), "{said}");
    assert_eq!(stored["status"], "error");
    assert_eq!(stored["content"], "one two");

    let script = Script::tokens(&["one", " two"]).exception_at(1, "throttlingException");
    let (events, _) = answer_with(script).await;
    assert_eq!(answer_text(&events), "one");
    assert_error_end(&events, "upstream_throttled", true);
}

#[tokio::test]
async fn a_connection_dropped_mid_stream_is_an_error_not_done() {
    let app = spawn_app().await;
    app.fake.push(
        Script::tokens(&["one", " two", " three"])
            .drop_at(2)
            .gated(),
    );
    let response = app
        .post_stream("alice", json!({"bot_id": BOT, "message": "hi"}))
        .await;
    let mut reader = SseReader::new(response);
    let mut events = vec![reader.next_event().await.unwrap()];
    // The client has both tokens before the upstream connection dies.
    for _ in 0..2 {
        app.fake.release(1);
        events.push(reader.next_event().await.unwrap());
    }
    app.fake.release(1);
    events.extend(reader.collect().await);

    assert_well_formed(&events);
    assert_eq!(answer_text(&events), "one two");
    assert_error_end(&events, "upstream_connection_error", true);
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();
    let stored = app.settled_messages("alice", &chat_id).await;
    assert_eq!(stored[1]["status"], "error");
    assert_eq!(stored[1]["content"], "one two");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_connection_error() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = spawn_app_with(|config| {
        config.providers.bedrock.as_mut().unwrap().endpoint_url = Some(format!("http://{closed}"));
    })
    .await;
    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "hi"}))
        .await;
    assert_well_formed(&events);
    assert_error_end(&events, "upstream_connection_error", true);
}
