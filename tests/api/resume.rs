//! A dropped client reconnects with Last-Event-ID and gets exactly the rest of its answer, under
//! both disconnect policies, live or from storage; stop works from any connection.

use serde_json::json;

use super::fake_upstream::{Outcome, Script};
use super::helpers::{SseEvent, SseReader, TestApp, answer_text, spawn_app, spawn_app_with};
use mangoo::config::DisconnectPolicy;

const ANSWER: [&str; 5] = ["The", " sea", " is", " wide", "."];

/// Reconnects to the chat's answer, optionally after `last_event_id`.
async fn reconnect(
    app: &TestApp,
    user: &str,
    chat_id: &str,
    last_event_id: Option<i64>,
) -> reqwest::Response {
    let mut request = app
        .client
        .get(app.url(&format!("/api/v1/chats/{chat_id}/stream")))
        .bearer_auth(app.token(user));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    request.send().await.unwrap()
}

/// Reads `start` and the first two tokens, then drops the connection. Returns what was read.
async fn read_two_then_drop(app: &TestApp) -> (String, Vec<SseEvent>) {
    app.fake.push(Script::tokens(&ANSWER).gated());
    let (mut reader, chat_id) = app.open_stream("alice", "describe the sea").await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        app.fake.release(1);
        seen.push(reader.next_event().await.unwrap());
    }
    drop(reader);
    (chat_id, seen)
}

fn assert_contiguous(seen: &[SseEvent], rest: &[SseEvent]) {
    let last_seen = seen.last().unwrap().id_num();
    assert_eq!(rest[0].id_num(), last_seen + 1, "no gap, no duplicate");
    for pair in rest.windows(2) {
        assert_eq!(pair[1].id_num(), pair[0].id_num() + 1);
    }
    assert!(rest.last().unwrap().event == "done" || rest.last().unwrap().event == "error");
}

#[tokio::test]
async fn under_continue_a_reconnecting_client_follows_the_answer_live_to_its_end() {
    let app = spawn_app_with(|c| c.streams.on_disconnect = DisconnectPolicy::Continue).await;
    let (chat_id, seen) = read_two_then_drop(&app).await;

    let response = reconnect(&app, "alice", &chat_id, Some(seen[1].id_num())).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut reader = SseReader::new(response);
    app.fake.release(3);
    let mut rest = Vec::new();
    while let Some(event) = reader.next_event().await {
        rest.push(event);
    }

    assert_contiguous(&seen, &rest);
    assert_eq!(rest.last().unwrap().event, "done");
    assert_eq!(
        format!("{}{}", answer_text(&seen), answer_text(&rest)),
        ANSWER.concat()
    );
    assert_eq!(app.fake.outcome(0).await, Outcome::Completed);
}

#[tokio::test]
async fn under_continue_an_answer_finished_while_away_is_replayed_from_storage() {
    let app = spawn_app_with(|c| c.streams.on_disconnect = DisconnectPolicy::Continue).await;
    let (chat_id, seen) = read_two_then_drop(&app).await;
    app.fake.release(3);
    assert_eq!(app.fake.outcome(0).await, Outcome::Completed);
    let stored = app.settled_messages("alice", &chat_id).await;
    assert_eq!(stored[1]["status"], "complete");

    let response = reconnect(&app, "alice", &chat_id, Some(seen[1].id_num())).await;
    let rest = SseReader::new(response).collect().await;

    assert_contiguous(&seen, &rest);
    assert_eq!(
        format!("{}{}", answer_text(&seen), answer_text(&rest)),
        ANSWER.concat()
    );
    assert_eq!(rest.last().unwrap().json()["usage"]["output_tokens"], 5);
}

#[tokio::test]
async fn under_cancel_a_reconnecting_client_gets_the_stored_partial_answer_and_its_end() {
    let app = spawn_app().await;
    let (chat_id, seen) = read_two_then_drop(&app).await;
    assert_eq!(app.fake.outcome(0).await, Outcome::Cancelled);
    let stored = app.settled_messages("alice", &chat_id).await;
    assert_eq!(stored[1]["status"], "interrupted");

    let response = reconnect(&app, "alice", &chat_id, Some(seen[1].id_num())).await;
    let rest = SseReader::new(response).collect().await;

    assert_contiguous(&seen, &rest);
    let terminal = rest.last().unwrap().json();
    assert_eq!(terminal["code"], "answer_interrupted");
    let text = format!("{}{}", answer_text(&seen), answer_text(&rest));
    assert_eq!(text, stored[1]["content"].as_str().unwrap());
}

#[tokio::test]
async fn within_the_grace_period_a_returning_client_gets_the_whole_answer_live() {
    let app = spawn_app_with(|c| c.streams.disconnect_grace_secs = 3600).await;
    let (chat_id, seen) = read_two_then_drop(&app).await;

    // The page reloaded: it knows no event id and reads the answer from its start.
    let response = reconnect(&app, "alice", &chat_id, None).await;
    assert_eq!(response.status(), 200);
    let mut reader = SseReader::new(response);
    app.fake.release(3);
    let mut events = Vec::new();
    while let Some(event) = reader.next_event().await {
        events.push(event);
    }

    assert_eq!(events.first().unwrap().event, "start");
    assert_eq!(events.last().unwrap().event, "done");
    assert_eq!(
        events[1].id_num(),
        seen[0].id_num(),
        "the same ids as before the reload"
    );
    assert_eq!(answer_text(&events), ANSWER.concat());
    assert_eq!(app.fake.outcome(0).await, Outcome::Completed);
    let stored = app.settled_messages("alice", &chat_id).await;
    assert_eq!(stored[1]["status"], "complete");
    assert_eq!(stored[1]["content"], ANSWER.concat());
}

#[tokio::test]
async fn when_nobody_returns_within_the_grace_period_the_upstream_call_is_aborted() {
    let app = spawn_app_with(|c| c.streams.disconnect_grace_secs = 1).await;
    let (chat_id, seen) = read_two_then_drop(&app).await;

    assert_eq!(app.fake.outcome(0).await, Outcome::Cancelled);
    let stored = app.settled_messages("alice", &chat_id).await;
    assert_eq!(stored[1]["status"], "interrupted");
    assert_eq!(stored[1]["content"], answer_text(&seen));
    let response = reconnect(&app, "alice", &chat_id, Some(seen[1].id_num())).await;
    let rest = SseReader::new(response).collect().await;
    assert_eq!(rest.last().unwrap().json()["code"], "answer_interrupted");
}

#[tokio::test]
async fn a_finished_answer_replays_with_the_same_ids_and_data_and_then_says_no_more() {
    let app = spawn_app().await;
    let original = app
        .chat(
            "alice",
            json!({"bot_id": super::helpers::BOT, "message": "hi"}),
        )
        .await;
    let chat_id = original[0].json()["chat_id"].as_str().unwrap().to_owned();

    let replay = SseReader::new(reconnect(&app, "alice", &chat_id, None).await)
        .collect()
        .await;
    let strip = |events: &[SseEvent]| -> Vec<_> {
        events
            .iter()
            .map(|e| (e.id.clone(), e.event.clone(), e.json()))
            .collect()
    };
    assert_eq!(strip(&replay), strip(&original));
    assert_eq!(replay[0].retry.as_deref(), Some("2000"));

    let after_terminal = reconnect(
        &app,
        "alice",
        &chat_id,
        Some(original.last().unwrap().id_num()),
    )
    .await;
    assert_eq!(after_terminal.status(), 204);
    let query = app
        .client
        .get(app.url(&format!(
            "/api/v1/chats/{chat_id}/stream?last_event_id={}",
            original[2].id_num()
        )))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    let rest = SseReader::new(query).collect().await;
    assert_eq!(strip(&rest), strip(&original[3..]));
}

#[tokio::test]
async fn resuming_is_owner_only_and_validates_the_id() {
    let app = spawn_app().await;
    let events = app
        .chat(
            "alice",
            json!({"bot_id": super::helpers::BOT, "message": "hi"}),
        )
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();

    let response = reconnect(&app, "mallory", &chat_id, None).await;
    assert_eq!(response.status(), 404);
    let response = app
        .client
        .get(app.url(&format!("/api/v1/chats/{chat_id}/stream")))
        .bearer_auth(app.token("alice"))
        .header("last-event-id", "not-a-number")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = app
        .client
        .get(app.url(&format!("/api/v1/chats/{chat_id}/stream")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn stop_from_a_second_connection_ends_the_answer_for_every_listener() {
    let app = spawn_app().await;
    app.fake.push(Script::tokens(&ANSWER).gated());
    let (mut first, chat_id) = app.open_stream("alice", "describe the sea").await;
    app.fake.release(1);
    assert_eq!(first.next_event().await.unwrap().json()["content"], "The");
    // A second tab follows the same answer.
    let mut second = SseReader::new(reconnect(&app, "alice", &chat_id, Some(1)).await);
    assert_eq!(second.next_event().await.unwrap().json()["content"], "The");

    let stop = app
        .client
        .post(app.url(&format!("/api/v1/chats/{chat_id}/stop")))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 200);
    assert_eq!(
        stop.json::<serde_json::Value>().await.unwrap()["stopped"],
        true
    );

    for reader in [&mut first, &mut second] {
        let done = reader.next_event().await.unwrap();
        assert_eq!(done.event, "done");
        assert_eq!(done.json()["stopped"], true);
        assert!(reader.next_event().await.is_none());
    }
    assert_eq!(app.fake.outcome(0).await, Outcome::Cancelled);
    let stored = app.settled_messages("alice", &chat_id).await;
    assert_eq!(stored[1]["status"], "stopped");
    assert_eq!(stored[1]["content"], "The");

    let again = app
        .client
        .post(app.url(&format!("/api/v1/chats/{chat_id}/stop")))
        .bearer_auth(app.token("mallory"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404, "another user cannot stop it");
}

#[tokio::test]
async fn eventsource_reconnecting_to_the_chat_stream_url_resumes_instead_of_asking_again() {
    let app = spawn_app_with(|c| c.streams.on_disconnect = DisconnectPolicy::Continue).await;
    app.fake.push(Script::tokens(&ANSWER).gated());
    let token = app.token("alice");
    let query = [
        ("bot_id", super::helpers::BOT),
        ("message", "describe the sea"),
        ("token", token.as_str()),
    ];
    let open = |last_event_id: Option<i64>| {
        let mut request = app.client.get(app.url("/api/v1/chat/stream")).query(&query);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        request.send()
    };
    let mut first = SseReader::new(open(None).await.unwrap());
    let mut seen = vec![first.next_event().await.unwrap()];
    app.fake.release(1);
    seen.push(first.next_event().await.unwrap());
    drop(first);

    // The same URL again, with the id EventSource remembers.
    let again = open(Some(seen[1].id_num())).await.unwrap();
    assert_eq!(again.status(), 200);
    let mut again = SseReader::new(again);
    app.fake.release(4);
    let mut rest = Vec::new();
    while let Some(event) = again.next_event().await {
        rest.push(event);
    }

    assert_contiguous(&seen, &rest);
    assert_eq!(
        format!("{}{}", answer_text(&seen), answer_text(&rest)),
        ANSWER.concat()
    );
    assert_eq!(
        app.fake.requests().len(),
        1,
        "the question was not asked twice"
    );
    let chats = app.get_json("alice", "/api/v1/chats").await.1;
    assert_eq!(chats["chats"].as_array().unwrap().len(), 1);
    // Once everything was received, a further reconnection is told there is nothing more.
    let done = open(Some(rest.last().unwrap().id_num())).await.unwrap();
    assert_eq!(done.status(), 204);
}
