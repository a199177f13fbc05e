//! The embedded model over HTTP: the default bot, the bounded queue and a missing model file.

use std::time::Duration;

use serde_json::{Value, json};

use super::helpers::{HANG_GUARD, SseReader, answer_text, assert_well_formed, spawn_app_with};

#[tokio::test]
async fn with_no_bots_configured_the_default_bot_answers_with_the_local_model() {
    let app = spawn_app_with(|config| config.bots.clear()).await;

    let events = app
        .chat(
            "alice",
            json!({"bot_id": "default", "message": "Say hello in one short sentence."}),
        )
        .await;

    assert_well_formed(&events);
    let done = events.last().unwrap();
    assert_eq!(done.event, "done", "{events:?}");
    assert_eq!(done.json()["provider"], "local");
    assert!(!answer_text(&events).trim().is_empty());
    let usage = &done.json()["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 10, "{usage}");
    assert!(usage["output_tokens"].as_u64().unwrap() > 0, "{usage}");
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_and_frees_up_when_the_client_leaves() {
    let app = spawn_app_with(|config| {
        config.bots.clear();
        config.providers.local.concurrency = 1;
        config.providers.local.queue_size = 0;
    })
    .await;
    let request = json!({"bot_id": "default", "message": "Write a long story about the sea."});
    // The one place is taken by a stream that is open (and not read).
    let first = app.post_stream("alice", request.clone()).await;
    assert_eq!(first.status(), 200);

    let refused = app.post_stream("bob", request.clone()).await;

    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["code"], "overloaded");
    let (_, chats) = app.get_json("bob", "/api/v1/chats").await;
    assert_eq!(
        chats["chats"],
        json!([]),
        "a refused request stores nothing"
    );

    // Once the first client leaves, its place comes back.
    drop(first);
    let admitted = async {
        loop {
            let response = app.post_stream("bob", request.clone()).await;
            if response.status() == 200 {
                return SseReader::new(response);
            }
            assert_eq!(response.status(), 503);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut reader = tokio::time::timeout(HANG_GUARD, admitted)
        .await
        .expect("the place was never freed");
    assert_eq!(reader.next_event().await.unwrap().event, "start");
}

#[tokio::test]
async fn a_missing_model_says_how_to_fetch_it() {
    let app = spawn_app_with(|config| {
        config.bots.clear();
        config.providers.local.model_path = Some("/nonexistent/model.gguf".into());
    })
    .await;

    let response = app
        .post_stream("alice", json!({"bot_id": "default", "message": "hi"}))
        .await;

    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "model_unavailable");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("mangoo model fetch"),
        "{body}"
    );
}
