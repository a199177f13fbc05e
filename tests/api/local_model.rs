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
async fn a_missing_model_is_a_plain_503_that_names_no_path() {
    let app = spawn_app_with(|config| {
        config.bots.clear();
        config.providers.local.model_path = Some("/nonexistent/model.gguf".into());
    })
    .await;

    let response = app
        .post_stream("alice", json!({"bot_id": "default", "message": "hi"}))
        .await;

    assert_eq!(response.status(), 503);
    let response_retry_after = response.headers().get("retry-after").cloned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "model_unavailable");
    let said = body["error"].as_str().unwrap();
    assert!(
        !said.contains('/'),
        "no server path reaches the client: {body}"
    );
    assert!(
        response_retry_after.is_none(),
        "not retryable: no Retry-After"
    );
}

/// The `mangoo_local_prompt_tokens_total` counter.
async fn prompt_tokens_computed(app: &super::helpers::TestApp) -> u64 {
    app.metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("mangoo_local_prompt_tokens_total "))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test]
async fn a_long_prompt_whose_client_left_stops_in_its_first_chunks_and_others_are_answered() {
    let app = spawn_app_with(|config| {
        config.bots.clear();
        config.providers.local.concurrency = 1;
        // Let the long prompt through, to show it can be abandoned midway.
        config.providers.local.max_prompt_tokens = 6000;
    })
    .await;
    // ~2,400 tokens: minutes of uninterruptible work for one thread before chunking.
    let long = "word ".repeat(2400);
    let response = app
        .post_stream("alice", json!({"bot_id": "default", "message": long}))
        .await;
    assert_eq!(response.status(), 200);
    let mut alice = SseReader::new(response);
    assert_eq!(alice.next_event().await.unwrap().event, "start");
    drop(alice); // the client leaves while the prompt is being evaluated

    let events = app
        .chat(
            "bob",
            json!({"bot_id": "default", "message": "Say hi in three words."}),
        )
        .await;

    assert_eq!(events.last().unwrap().event, "done", "{events:?}");
    assert!(!answer_text(&events).trim().is_empty());
    let computed = prompt_tokens_computed(&app).await;
    assert!(
        computed < 1200,
        "alice's prompt was evaluated to its end: {computed} prompt tokens computed"
    );
}

#[tokio::test]
async fn a_message_over_the_local_prompt_budget_is_refused_without_evaluating_it() {
    let app = spawn_app_with(|config| {
        config.bots.clear();
        config.providers.local.max_prompt_tokens = 256;
    })
    .await;

    let events = app
        .chat(
            "alice",
            json!({"bot_id": "default", "message": "word ".repeat(1000)}),
        )
        .await;

    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.json()["code"], "upstream_invalid_request");
    assert_eq!(prompt_tokens_computed(&app).await, 0);
}

#[tokio::test]
async fn one_user_cannot_take_every_place_in_the_local_queue() {
    let app = spawn_app_with(|config| {
        config.bots.clear();
        config.providers.local.concurrency = 1;
        config.providers.local.queue_size = 8;
        config.providers.local.max_queued_per_user = 2;
    })
    .await;
    let request = json!({"bot_id": "default", "message": "Write a long story about the sea."});
    // Alice's two places are taken: one answer decoding, one waiting behind it (each takes
    // seconds; the requests below follow within milliseconds).
    let first = app.post_stream("alice", request.clone()).await;
    let second = app.post_stream("alice", request.clone()).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );

    let third = app.post_stream("alice", request.clone()).await;
    assert_eq!(third.status(), 503);
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["code"], "overloaded");

    let bob = app.post_stream("bob", request).await;
    assert_eq!(bob.status(), 200, "another user still gets a place");
}
