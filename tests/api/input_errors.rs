//! Every bad request gets its status and the contract's JSON error body, and changes nothing.

use serde_json::{Value, json};

use super::helpers::{BOT, TestApp, spawn_app, spawn_app_with};

async fn assert_error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status(), status);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(!body["error"].as_str().unwrap().is_empty(), "{body}");
}

async fn post_raw(
    app: &TestApp,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/chat/stream"))
        .bearer_auth(app.token("alice"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn assert_nothing_stored(app: &TestApp) {
    let (status, body) = app.get_json("alice", "/api/v1/chats").await;
    assert_eq!(status, 200);
    assert_eq!(body["chats"], json!([]));
    assert!(app.fake.requests().is_empty(), "the model was called");
}

#[tokio::test]
async fn malformed_json_is_a_400() {
    let app = spawn_app().await;
    assert_error(
        post_raw(&app, "application/json", "{\"bot_id\": ").await,
        400,
        "invalid_json",
    )
    .await;
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn missing_and_wrongly_typed_fields_are_400s() {
    let app = spawn_app().await;
    for body in [
        json!({"message": "hi"}),
        json!({"bot_id": BOT}),
        json!({"bot_id": 7, "message": "hi"}),
        json!({"bot_id": BOT, "message": ["hi"]}),
        json!({"bot_id": BOT, "message": "hi", "chat_id": 12}),
        json!([]),
    ] {
        let response = post_raw(&app, "application/json", body.to_string()).await;
        assert_error(response, 400, "invalid_request").await;
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn empty_and_too_long_messages_are_400s() {
    let app = spawn_app_with(|c| c.server.max_message_chars = 100).await;
    for message in ["", "   \n\t"] {
        let response = app
            .post_stream("alice", json!({"bot_id": BOT, "message": message}))
            .await;
        assert_error(response, 400, "empty_message").await;
    }
    let long = "é".repeat(101);
    let response = app
        .post_stream("alice", json!({"bot_id": BOT, "message": long}))
        .await;
    assert_error(response, 400, "message_too_long").await;
    // Exactly at the limit is fine (characters, not bytes).
    let response = app
        .post_stream("alice", json!({"bot_id": BOT, "message": "é".repeat(100)}))
        .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn unknown_bots_and_chats_are_404s() {
    let app = spawn_app().await;
    let response = app
        .post_stream("alice", json!({"bot_id": "nope", "message": "hi"}))
        .await;
    assert_error(response, 404, "bot_not_found").await;
    let response = app
        .post_stream(
            "alice",
            json!({"bot_id": BOT, "message": "hi", "chat_id": "chat-does-not-exist"}),
        )
        .await;
    assert_error(response, 404, "chat_not_found").await;
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413() {
    let app = spawn_app().await;
    let message = "a".repeat(1024 * 1024 + 10);
    let body = json!({"bot_id": BOT, "message": message}).to_string();
    assert_error(
        post_raw(&app, "application/json", body).await,
        413,
        "payload_too_large",
    )
    .await;
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_415() {
    let app = spawn_app().await;
    let body = json!({"bot_id": BOT, "message": "hi"}).to_string();
    assert_error(
        post_raw(&app, "text/plain", body.clone()).await,
        415,
        "unsupported_media_type",
    )
    .await;
    let response = app
        .client
        .post(app.url("/api/v1/chat/stream"))
        .bearer_auth(app.token("alice"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_error(response, 415, "unsupported_media_type").await;
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn the_get_form_validates_its_query() {
    let app = spawn_app().await;
    let token = app.token("alice");
    type Query<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Query, u16, &str); 3] = [
        (&[("message", "hi")], 400, "invalid_request"),
        (&[("bot_id", BOT), ("message", "")], 400, "empty_message"),
        (
            &[("bot_id", "nope"), ("message", "hi")],
            404,
            "bot_not_found",
        ),
    ];
    for (query, status, code) in cases {
        let response = app
            .client
            .get(app.url("/api/v1/chat/stream"))
            .query(query)
            .query(&[("token", &token)])
            .send()
            .await
            .unwrap();
        assert_error(response, status, code).await;
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_json() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/api/v1/nope"))
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "not_found").await;
    let response = app
        .client
        .put(app.url("/api/v1/chat/stream"))
        .send()
        .await
        .unwrap();
    assert_error(response, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn the_server_keeps_serving_after_bad_input() {
    let app = spawn_app().await;
    let garbage: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    assert_eq!(
        post_raw(&app, "application/json", garbage).await.status(),
        400
    );
    assert_eq!(
        post_raw(&app, "application/json", "\u{0}\u{1}{{{{")
            .await
            .status(),
        400
    );
    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "still alive?"}))
        .await;
    assert_eq!(events.last().unwrap().event, "done");
}
