//! Chat history endpoints: owner-only listing, reading and deleting.

use serde_json::json;

use super::fake_upstream::{Outcome, Script};
use super::helpers::{BOT, spawn_app};

#[tokio::test]
async fn chats_are_listed_newest_first_and_paginated() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let events = app
            .chat(
                "alice",
                json!({"bot_id": BOT, "message": format!("chat number {n}")}),
            )
            .await;
        ids.push(events[0].json()["chat_id"].as_str().unwrap().to_owned());
    }
    ids.reverse();

    let (status, page1) = app.get_json("alice", "/api/v1/chats?limit=2").await;
    assert_eq!(status, 200);
    let cursor = page1["next_cursor"].as_str().unwrap().to_owned();
    let (_, page2) = app
        .get_json("alice", &format!("/api/v1/chats?limit=2&cursor={cursor}"))
        .await;
    let cursor = page2["next_cursor"].as_str().unwrap().to_owned();
    let (_, page3) = app
        .get_json("alice", &format!("/api/v1/chats?limit=2&cursor={cursor}"))
        .await;
    assert!(page3["next_cursor"].is_null());

    let listed: Vec<String> = [&page1, &page2, &page3]
        .iter()
        .flat_map(|p| p["chats"].as_array().unwrap().clone())
        .map(|c| c["chat_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ids);
    assert_eq!(page1["chats"][0]["title"], "chat number 4");
    assert_eq!(page1["chats"][0]["bot_id"], BOT);

    let (status, _) = app.get_json("alice", "/api/v1/chats?limit=0").await;
    assert_eq!(status, 400);
    let (status, _) = app.get_json("alice", "/api/v1/chats?cursor=%%%").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn another_users_chat_cannot_be_read_continued_or_deleted() {
    let app = spawn_app().await;
    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "alice's secret"}))
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();

    let (status, body) = app.get_json("mallory", "/api/v1/chats").await;
    assert_eq!(status, 200);
    assert_eq!(body["chats"], json!([]));

    let (status, body) = app
        .get_json("mallory", &format!("/api/v1/chats/{chat_id}/messages"))
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "chat_not_found");
    assert!(!body.to_string().contains("secret"));

    let response = app
        .post_stream(
            "mallory",
            json!({"bot_id": BOT, "message": "tell me", "chat_id": chat_id}),
        )
        .await;
    assert_eq!(response.status(), 404);

    let response = app.delete_chat("mallory", &chat_id).await;
    assert_eq!(response.status(), 404);

    // Alice's chat is untouched, and the model never saw Mallory's message.
    let messages = app.settled_messages("alice", &chat_id).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(app.fake.requests().len(), 1);
}

#[tokio::test]
async fn deleting_a_chat_removes_it_and_its_messages() {
    let app = spawn_app().await;
    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "forget me"}))
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();

    let response = app.delete_chat("alice", &chat_id).await;

    assert_eq!(response.status(), 204);
    let (_, body) = app.get_json("alice", "/api/v1/chats").await;
    assert_eq!(body["chats"], json!([]));
    let (status, _) = app
        .get_json("alice", &format!("/api/v1/chats/{chat_id}/messages"))
        .await;
    assert_eq!(status, 404);
    let response = app.delete_chat("alice", &chat_id).await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn deleting_a_chat_stops_its_running_answer() {
    let app = spawn_app().await;
    app.fake.push(Script::tokens(&["first", " second"]).gated());
    let (mut reader, chat_id) = app.open_stream("alice", "go on").await;

    let response = app.delete_chat("alice", &chat_id).await;

    assert_eq!(response.status(), 204);
    let last = reader.next_event().await.unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.json()["code"], "chat_deleted");
    assert!(reader.next_event().await.is_none());
    assert_eq!(app.fake.outcome(0).await, Outcome::Cancelled);
    let (status, _) = app
        .get_json("alice", &format!("/api/v1/chats/{chat_id}/messages"))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_chat_is_renamed_by_its_owner_only_and_a_bad_title_is_refused() {
    let app = spawn_app().await;
    let events = app
        .chat(
            "alice",
            json!({"bot_id": BOT, "message": "Plan a trip. Somewhere warm."}),
        )
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();
    let (_, list) = app.get_json("alice", "/api/v1/chats").await;
    assert_eq!(
        list["chats"][0]["title"], "Plan a trip.",
        "the first sentence"
    );
    let rename = |user: &str, body: serde_json::Value| {
        app.client
            .patch(app.url(&format!("/api/v1/chats/{chat_id}")))
            .bearer_auth(app.token(user))
            .json(&body)
            .send()
    };

    let renamed = rename("alice", json!({"title": "  Lisbon\n in May "}))
        .await
        .unwrap();
    assert_eq!(renamed.status(), 200);
    let chat: serde_json::Value = renamed.json().await.unwrap();
    assert_eq!(chat["title"], "Lisbon in May");
    assert_eq!(chat["chat_id"], chat_id.as_str());

    let theirs = rename("mallory", json!({"title": "mine"})).await.unwrap();
    assert_eq!(theirs.status(), 404);
    for bad in [json!({"title": "   "}), json!({"title": "x".repeat(201)})] {
        let refused = rename("alice", bad).await.unwrap();
        assert_eq!(refused.status(), 400);
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "invalid_title");
    }
    let (_, list) = app.get_json("alice", "/api/v1/chats").await;
    assert_eq!(list["chats"][0]["title"], "Lisbon in May");
}

#[tokio::test]
async fn rewinding_to_the_last_question_lets_it_be_asked_again() {
    let app = spawn_app().await;
    let first = app
        .chat("alice", json!({"bot_id": BOT, "message": "first"}))
        .await;
    let chat_id = first[0].json()["chat_id"].as_str().unwrap().to_owned();
    app.chat(
        "alice",
        json!({"bot_id": BOT, "message": "second", "chat_id": chat_id}),
    )
    .await;
    let messages = app.settled_messages("alice", &chat_id).await;
    let second_question = messages[2]["id"].as_str().unwrap().to_owned();
    let rewind = |user: &str, message_id: &str| {
        app.client
            .delete(app.url(&format!("/api/v1/chats/{chat_id}/messages/{message_id}")))
            .bearer_auth(app.token(user))
            .send()
    };

    assert_eq!(
        rewind("mallory", &second_question).await.unwrap().status(),
        404
    );
    let unknown = rewind("alice", "msg-unknown").await.unwrap();
    assert_eq!(unknown.status(), 404);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["code"], "message_not_found");
    assert_eq!(
        rewind("alice", &second_question).await.unwrap().status(),
        204
    );
    assert_eq!(app.settled_messages("alice", &chat_id).await.len(), 2);

    // Regenerated: the model sees the first exchange and the question once.
    app.chat(
        "alice",
        json!({"bot_id": BOT, "message": "second, edited", "chat_id": chat_id}),
    )
    .await;
    let messages = app.settled_messages("alice", &chat_id).await;
    let texts: Vec<&str> = messages
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["first", "Hello, world!", "second, edited", "Hello, world!"]
    );
    let asked = app.fake.requests().last().unwrap().body.clone();
    assert_eq!(asked["messages"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn a_chat_cannot_be_rewound_while_its_answer_streams() {
    let app = spawn_app().await;
    app.fake.push(Script::tokens(&["slow"]).gated());
    let (reader, chat_id) = app.open_stream("alice", "wait").await;
    let messages = app.all_messages("alice", &chat_id).await;
    let question = messages[0]["id"].as_str().unwrap();

    let busy = app
        .client
        .delete(app.url(&format!("/api/v1/chats/{chat_id}/messages/{question}")))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(busy.status(), 409);
    app.fake.release(1);
    reader.collect().await;
    assert_eq!(app.settled_messages("alice", &chat_id).await.len(), 2);
}

/// Texts of a page of messages.
fn texts(page: &serde_json::Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_long_chat_reads_backwards_from_its_newest_messages() {
    let app = spawn_app().await;
    let first = app
        .chat("alice", json!({"bot_id": BOT, "message": "turn 1"}))
        .await;
    let chat_id = first[0].json()["chat_id"].as_str().unwrap().to_owned();
    for n in 2..=6 {
        app.chat(
            "alice",
            json!({"bot_id": BOT, "message": format!("turn {n}"), "chat_id": chat_id}),
        )
        .await;
    }
    let path = format!("/api/v1/chats/{chat_id}/messages");
    let (status, newest) = app
        .get_json("alice", &format!("{path}?before=latest&limit=4"))
        .await;
    assert_eq!(status, 200);
    let shown = texts(&newest);
    assert_eq!((shown[0].as_str(), shown[2].as_str()), ("turn 5", "turn 6"));
    assert!(newest["next_cursor"].is_null(), "nothing is newer");

    // Back page by page to the first message: every message once, in order.
    let mut all = shown;
    let mut before = newest["prev_cursor"].as_str().unwrap().to_owned();
    loop {
        let (_, page) = app
            .get_json("alice", &format!("{path}?before={before}&limit=3"))
            .await;
        let mut older = texts(&page);
        assert!(page["next_cursor"].is_string(), "newer ones exist");
        older.append(&mut all);
        all = older;
        match page["prev_cursor"].as_str() {
            Some(cursor) => before = cursor.to_owned(),
            None => break,
        }
    }
    let forwards: Vec<String> = app
        .all_messages("alice", &chat_id)
        .await
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all, forwards);
    assert_eq!(all.len(), 12);

    // Before a message named by its id; an empty `before` is the newest.
    let id = newest["messages"][0]["id"].as_str().unwrap();
    let (_, page) = app
        .get_json("alice", &format!("{path}?before={id}&limit=1"))
        .await;
    assert_eq!(texts(&page)[0], forwards[7]);
    let (_, page) = app
        .get_json("alice", &format!("{path}?before=&limit=1"))
        .await;
    assert_eq!(texts(&page), [forwards[11].clone()]);

    let (status, body) = app
        .get_json("alice", &format!("{path}?before=msg-nope"))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("message_not_found"))
    );
    let cursor = newest["prev_cursor"].as_str().unwrap();
    let (status, body) = app
        .get_json("alice", &format!("{path}?before=latest&cursor={cursor}"))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, _) = app
        .get_json("mallory", &format!("{path}?before=latest"))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn search_finds_the_callers_chats_by_title_and_text_and_pages() {
    let app = spawn_app().await;
    for n in 0..3 {
        app.chat(
            "alice",
            json!({"bot_id": BOT, "message": format!("packing list {n} for Lisbon")}),
        )
        .await;
    }
    app.chat("alice", json!({"bot_id": BOT, "message": "unrelated"}))
        .await;
    app.chat("bob", json!({"bot_id": BOT, "message": "Lisbon for bob"}))
        .await;

    let (status, page) = app
        .get_json("alice", "/api/v1/chats/search?q=lisb&limit=2")
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["terms"], json!(["lisb"]));
    let results = page["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["chat"]["title"], "packing list 2 for Lisbon");
    assert!(results[0]["message_id"].is_string());
    assert_eq!(results[0]["snippet"], "packing list 2 for Lisbon");
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, rest) = app
        .get_json(
            "alice",
            &format!("/api/v1/chats/search?q=lisb&limit=2&cursor={cursor}"),
        )
        .await;
    assert_eq!(rest["results"].as_array().unwrap().len(), 1);
    assert!(rest["next_cursor"].is_null());
    assert!(!format!("{page}{rest}").contains("bob"));

    // The chat list takes the same words, in its own shape.
    let (status, listed) = app.get_json("alice", "/api/v1/chats?q=lisb&limit=5").await;
    assert_eq!(status, 200);
    let chats = listed["chats"].as_array().unwrap();
    assert_eq!(chats.len(), 3);
    assert_eq!(chats[0]["title"], "packing list 2 for Lisbon");
    assert_eq!(chats[0]["snippet"], "packing list 2 for Lisbon");
    assert!(chats[0]["matched_message_id"].is_string());
    let (_, plain) = app.get_json("alice", "/api/v1/chats").await;
    assert!(plain["chats"][0].get("snippet").is_none());

    for bad in ["", "q=", "q=%20%3F!", &format!("q={}", "a".repeat(201))] {
        let (status, body) = app
            .get_json("alice", &format!("/api/v1/chats/search?{bad}"))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["code"], "invalid_request");
    }
}

#[tokio::test]
async fn the_limits_endpoint_tells_what_a_turn_is_checked_against() {
    let app = super::helpers::spawn_app_with(|c| c.server.max_message_chars = 1234).await;
    let (status, limits) = app.get_json("alice", "/api/v1/limits").await;
    assert_eq!(status, 200);
    assert_eq!(limits["max_message_chars"], 1234);
    assert_eq!(limits["max_title_chars"], 200);
    let response = app
        .post_stream("alice", json!({"bot_id": BOT, "message": "x".repeat(1235)}))
        .await;
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn a_regenerated_answer_lists_the_answers_it_replaced() {
    let app = spawn_app().await;
    let first = app
        .chat("alice", json!({"bot_id": BOT, "message": "pick a number"}))
        .await;
    let chat_id = first[0].json()["chat_id"].as_str().unwrap().to_owned();
    for (n, tokens) in [["seven"], ["eleven"]].iter().enumerate() {
        let messages = app.settled_messages("alice", &chat_id).await;
        let question = messages[0]["id"].as_str().unwrap();
        let response = app
            .client
            .delete(app.url(&format!(
                "/api/v1/chats/{chat_id}/messages/{question}?keep_answer=true"
            )))
            .bearer_auth(app.token("alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204, "regeneration {n}");
        app.fake.push(Script::tokens(tokens));
        app.chat(
            "alice",
            json!({"bot_id": BOT, "message": "pick a number", "chat_id": chat_id}),
        )
        .await;
    }
    let messages = app.settled_messages("alice", &chat_id).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1]["content"], "eleven");
    let versions: Vec<&str> = messages[1]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["content"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["Hello, world!", "seven"]);
    assert!(messages[0].get("versions").is_none(), "questions have none");
    assert_eq!(messages[1]["versions"][0]["status"], "complete");
    // The model was asked the question once each time, with no earlier answer in its history.
    let last = app.fake.requests().pop().unwrap();
    assert!(!last.body.to_string().contains("seven"), "{}", last.body);

    let response = app
        .client
        .delete(app.url(&format!(
            "/api/v1/chats/{chat_id}/messages/x?keep_answer=maybe"
        )))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}
