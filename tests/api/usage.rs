//! The usage ledger over HTTP: a user sees what they spent by day and bot, an operator (a token
//! whose `roles` claim holds `[auth] admin_role`) everyone's, and nobody else sees that view.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use super::fake_upstream::Script;
use super::helpers::{BOT, SECRET, TestApp, spawn_app_with};

fn token_with_roles(user: &str, roles: Value) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = json!({"sub": user, "exp": exp, "roles": roles});
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn get(app: &TestApp, token: &str, path: &str) -> (u16, Value) {
    let response = app
        .client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Asks one question and waits until its answer is stored (and so in the ledger).
async fn turn(app: &TestApp, user: &str) {
    let events = app
        .chat(user, json!({"bot_id": BOT, "message": "hello"}))
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();
    app.settled_messages(user, &chat_id).await;
}

#[tokio::test]
async fn users_see_their_own_usage_and_only_an_operator_sees_everyones() {
    let app = spawn_app_with(|c| c.auth.admin_role = Some("admin".into())).await;
    turn(&app, "alice").await;
    turn(&app, "alice").await;
    app.fake
        .push(Script::http_error(400, "ValidationException"));
    turn(&app, "alice").await;
    turn(&app, "bob").await;
    // Bob stops his second answer after its first piece: the provider never reported usage.
    app.fake
        .push(Script::tokens(&["one", " two", " three"]).gated());
    let (mut reader, chat_id) = app.open_stream("bob", "count").await;
    app.fake.release(1);
    assert_eq!(reader.next_event().await.unwrap().event, "message");
    let stop = app
        .client
        .post(app.url(&format!("/api/v1/chats/{chat_id}/stop")))
        .bearer_auth(app.token("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 200);
    reader.collect().await;
    app.settled_messages("bob", &chat_id).await;

    let alice = app.token("alice");
    let (status, by_day) = get(&app, &alice, "/api/v1/usage").await;
    assert_eq!(status, 200, "{by_day}");
    assert_eq!(by_day["group_by"], "day");
    let days = by_day["usage"].as_array().unwrap();
    assert_eq!(days.len(), 1, "{by_day}");
    assert_eq!(days[0]["day"].as_str().unwrap().len(), 10);
    // The test upstream reports 12 tokens in and one per piece out (4) for each answer. The
    // failed turn's provider reported nothing: its prompt is counted (the system prompt and
    // "hello", 33 bytes, about 9 tokens) and what it streamed (nothing).
    assert_eq!(
        by_day["total"],
        json!({"turns": 3, "input_tokens": 24 + 9, "output_tokens": 8, "total_tokens": 41})
    );
    // The same in Prometheus, by bot and provider; no user label.
    let metrics = app.metrics_text().await;
    for line in [
        format!(
            "mangoo_bot_tokens_total{{bot=\"{BOT}\",provider=\"bedrock\",direction=\"input\",source=\"reported\"}} 36"
        ),
        format!(
            "mangoo_bot_tokens_total{{bot=\"{BOT}\",provider=\"none\",direction=\"input\",source=\"counted\"}} 9"
        ),
    ] {
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
    let (_, by_bot) = get(&app, &alice, "/api/v1/usage?group_by=bot").await;
    assert_eq!(by_bot["usage"][0]["bot_id"], BOT);
    assert_eq!(by_bot["usage"][0]["turns"], 3);
    let (_, long_ago) = get(&app, &alice, "/api/v1/usage?from=2020-01-01&to=2020-01-31").await;
    assert_eq!(long_ago["usage"], json!([]));
    assert_eq!(long_ago["from"], "2020-01-01T00:00:00Z");
    assert_eq!(
        long_ago["to"], "2020-02-01T00:00:00Z",
        "the last day is included"
    );

    // The operator's view, refused to ordinary users (and to a role that is not the admin one).
    for token in [
        alice.clone(),
        token_with_roles("mallory", json!(["viewer"])),
    ] {
        let (status, body) = get(&app, &token, "/api/v1/admin/usage").await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("forbidden")),
            "{body}"
        );
    }
    let operator = token_with_roles("olga", json!(["viewer", "admin"]));
    let (status, by_user) = get(&app, &operator, "/api/v1/admin/usage?group_by=user").await;
    assert_eq!(status, 200);
    let users: Vec<(&str, u64)> = by_user["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["user_id"].as_str().unwrap(), u["turns"].as_u64().unwrap()))
        .collect();
    assert_eq!(users, [("alice", 3), ("bob", 2)]);
    let (_, bob) = get(&app, &operator, "/api/v1/admin/usage?user_id=bob").await;
    // 12 + 4 reported; the stopped turn counted: its prompt (33 bytes, 9) and its one piece.
    assert_eq!(
        bob["total"],
        json!({"turns": 2, "input_tokens": 12 + 9, "output_tokens": 4 + 1, "total_tokens": 26})
    );
    let spaced = token_with_roles("olga", json!("viewer admin"));
    assert_eq!(
        get(&app, &spaced, "/api/v1/admin/usage").await.0,
        200,
        "a string of roles"
    );

    for bad in [
        "/api/v1/usage?group_by=week",
        "/api/v1/usage?from=yesterday",
        "/api/v1/usage?from=2026-12-08&to=2026-12-01",
        "/api/v1/usage?group_by=user",
        "/api/v1/usage?user_id=bob",
    ] {
        let (status, body) = get(&app, &alice, bad).await;
        assert_eq!(
            (status, body["type"].as_str()),
            (400, Some("error")),
            "{bad}: {body}"
        );
    }
}
