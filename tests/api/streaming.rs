//! The happy path of the public contract: headers, events, ids, storage, history, cancellation.

use serde_json::json;

use super::fake_upstream::{Outcome, Script};
use super::helpers::{
    BOT, MODEL, SYSTEM_PROMPT, SseReader, answer_text, assert_well_formed, spawn_app,
};

#[tokio::test]
async fn a_message_streams_back_as_the_contracts_events() {
    let app = spawn_app().await;

    let response = app
        .post_stream(
            "alice",
            json!({"bot_id": BOT, "message": "Explain quantum computing"}),
        )
        .await;

    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache, no-transform");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert_eq!(headers["connection"], "keep-alive");
    assert_eq!(headers["transfer-encoding"], "chunked");
    assert!(headers.get("content-length").is_none());
    assert!(headers.get("content-encoding").is_none());

    let events = SseReader::new(response).collect().await;
    assert_well_formed(&events);
    assert_eq!(events[0].id.as_deref(), Some("1"));
    assert_eq!(
        events[0].retry.as_deref(),
        Some("2000"),
        "the first event carries retry:"
    );
    assert!(events[1..].iter().all(|e| e.retry.is_none()));
    let start = events[0].json();
    let chat_id = start["chat_id"].as_str().unwrap();
    assert!(chat_id.starts_with("chat-"));
    assert!(start["message_id"].as_str().is_some());

    let contents: Vec<_> = events[1..5].iter().map(|e| e.json()).collect();
    assert_eq!(
        contents,
        [
            json!({"content": "Hello", "type": "content"}),
            json!({"content": ",", "type": "content"}),
            json!({"content": " world", "type": "content"}),
            json!({"content": "!", "type": "content"}),
        ]
    );
    let done = events[5].json();
    assert_eq!(events[5].event, "done");
    assert_eq!(events[5].id.as_deref(), Some("6"));
    assert_eq!(done["chat_id"], chat_id);
    assert_eq!(
        done["usage"],
        json!({"input_tokens": 12, "output_tokens": 4})
    );
    assert_eq!(done["provider"], "bedrock");
    assert_eq!(done["model"], MODEL);
}

#[tokio::test]
async fn the_answer_is_stored_with_its_status_and_usage() {
    let app = spawn_app().await;

    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "Hi there"}))
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();

    let messages = app.settled_messages("alice", &chat_id).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "Hi there");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], "Hello, world!");
    assert_eq!(messages[1]["status"], "complete");
    assert_eq!(
        messages[1]["usage"],
        json!({"input_tokens": 12, "output_tokens": 4})
    );
    assert_eq!(messages[1]["id"], events[0].json()["message_id"]);
}

#[tokio::test]
async fn each_token_reaches_the_client_before_the_next_one_is_generated() {
    // The fake sends a token only when the test allows it. The test allows the next one only
    // after it has read the previous one, so any buffering anywhere on the path would hang here.
    let app = spawn_app().await;
    app.fake
        .push(Script::tokens(&["one", " two", " three", " four"]).gated());

    let response = app
        .post_stream("alice", json!({"bot_id": BOT, "message": "count"}))
        .await;
    let mut reader = SseReader::new(response);
    assert_eq!(reader.next_event().await.unwrap().event, "start");
    for expected in ["one", " two", " three", " four"] {
        app.fake.release(1);
        let event = reader.next_event().await.unwrap();
        assert_eq!(event.event, "message");
        assert_eq!(event.json()["content"], expected);
    }
    assert_eq!(reader.next_event().await.unwrap().event, "done");
    assert!(reader.next_event().await.is_none());
}

#[tokio::test]
async fn the_eventsource_form_streams_the_same_answer() {
    let app = spawn_app().await;
    let token = app.token("alice");

    let response = app
        .client
        .get(app.url("/api/v1/chat/stream"))
        .query(&[
            ("bot_id", BOT),
            ("message", "Hi from EventSource"),
            ("token", &token),
        ])
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = SseReader::new(response).collect().await;
    assert_well_formed(&events);
    assert_eq!(answer_text(&events), "Hello, world!");
    assert_eq!(events.last().unwrap().event, "done");
}

#[tokio::test]
async fn a_second_turn_sends_the_system_prompt_and_history_to_the_model() {
    let app = spawn_app().await;
    let first = app
        .chat(
            "alice",
            json!({"bot_id": BOT, "message": "My name is Alice."}),
        )
        .await;
    let chat_id = first[0].json()["chat_id"].as_str().unwrap().to_owned();
    app.fake.push(Script::tokens(&["Your name", " is Alice."]));

    let second = app
        .chat(
            "alice",
            json!({"bot_id": BOT, "message": "What is my name?", "chat_id": chat_id}),
        )
        .await;

    assert_well_formed(&second);
    assert_eq!(second[0].json()["chat_id"], chat_id);
    assert_eq!(answer_text(&second), "Your name is Alice.");
    let requests = app.fake.requests();
    assert_eq!(requests.len(), 2);
    let (model, body) = (&requests[1].model, &requests[1].body);
    assert_eq!(model, MODEL);
    assert_eq!(body["system"], json!([{"text": SYSTEM_PROMPT}]));
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [{"text": "My name is Alice."}]},
            {"role": "assistant", "content": [{"text": "Hello, world!"}]},
            {"role": "user", "content": [{"text": "What is my name?"}]},
        ])
    );
    assert_eq!(body["inferenceConfig"]["maxTokens"], 512);
    // Event ids keep growing across the turns of a chat, so any id names one event.
    assert_eq!(
        second[0].id_num(),
        first.last().unwrap().id_num() + 1,
        "ids continue across turns"
    );
    let messages = app.settled_messages("alice", &chat_id).await;
    let texts: Vec<_> = messages
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "My name is Alice.",
            "Hello, world!",
            "What is my name?",
            "Your name is Alice."
        ]
    );
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_and_keeps_the_partial_answer() {
    let app = spawn_app().await;
    app.fake
        .push(Script::tokens(&["partial", " answer", " never", " sent"]).gated());
    let (mut reader, chat_id) = app.open_stream("alice", "long story").await;
    app.fake.release(1);
    assert_eq!(
        reader.next_event().await.unwrap().json()["content"],
        "partial"
    );

    drop(reader);

    assert_eq!(app.fake.outcome(0).await, Outcome::Cancelled);
    let messages = app.settled_messages("alice", &chat_id).await;
    assert_eq!(messages[1]["status"], "interrupted");
    assert_eq!(messages[1]["content"], "partial");
}

#[tokio::test]
async fn a_second_answer_in_the_same_chat_waits_for_the_first() {
    let app = spawn_app().await;
    app.fake.push(Script::tokens(&["slow"]).gated());
    let (reader, chat_id) = app.open_stream("alice", "first").await;

    let busy = app
        .post_stream(
            "alice",
            json!({"bot_id": BOT, "message": "second", "chat_id": chat_id}),
        )
        .await;

    assert_eq!(busy.status(), 409);
    let body: serde_json::Value = busy.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["code"], "chat_busy");
    app.fake.release(1);
    let rest = reader.collect().await;
    assert_eq!(rest.last().unwrap().event, "done");
}

#[tokio::test]
async fn chats_survive_a_restart() {
    let app = spawn_app().await;
    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "remember me"}))
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();

    let app = app.restart().await;

    let (status, body) = app.get_json("alice", "/api/v1/chats").await;
    assert_eq!(status, 200);
    assert_eq!(body["chats"][0]["chat_id"], chat_id);
    let messages = app.settled_messages("alice", &chat_id).await;
    assert_eq!(messages[1]["content"], "Hello, world!");
    let next = app
        .chat(
            "alice",
            json!({"bot_id": BOT, "message": "still there?", "chat_id": chat_id}),
        )
        .await;
    assert_eq!(next[0].id_num(), events.last().unwrap().id_num() + 1);
}

#[tokio::test]
async fn shutting_down_ends_open_streams_with_a_retryable_error_and_stores_them() {
    let app = spawn_app().await;
    app.fake.push(Script::tokens(&["before", " after"]).gated());
    let (mut reader, chat_id) = app.open_stream("alice", "hold on").await;
    app.fake.release(1);
    assert_eq!(
        reader.next_event().await.unwrap().json()["content"],
        "before"
    );

    let app = app.restart().await;

    let last = reader.next_event().await.unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.json()["code"], "server_shutting_down");
    assert_eq!(last.json()["retryable"], true);
    assert!(reader.next_event().await.is_none());
    let messages = app.settled_messages("alice", &chat_id).await;
    assert_eq!(messages[1]["status"], "interrupted");
    assert_eq!(messages[1]["content"], "before");
}
