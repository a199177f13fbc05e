//! The OpenAI-compatible API over HTTP, byte for byte what the SDKs parse: chunks, the whole
//! answer, errors in OpenAI's shape, a chat carried on by `X-Mangoo-Chat-Id`, a completion
//! resumed by `Last-Event-ID`, stop sequences. The official `openai` Python SDK drives the same
//! routes in `openai_sdk.rs`.

use serde_json::{Value, json};

use super::fake_upstream::{Outcome, Script};
use super::helpers::{SYSTEM_PROMPT, SseEvent, SseReader, TestApp, bot, spawn_app_with};
use mangoo::config::DisconnectPolicy;

/// A bot on the OpenAI-compatible provider, so the upstream request is easy to read back.
pub const GPT: &str = "gpt";

pub async fn spawn_openai_app() -> TestApp {
    spawn_app_with(|c| {
        c.bots.push(bot(GPT, "openai", "gpt-test"));
        c.streams.on_disconnect = DisconnectPolicy::Continue;
    })
    .await
}

async fn complete(
    app: &TestApp,
    user: &str,
    chat_id: Option<&str>,
    body: Value,
) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(app.token(user))
        .json(&body);
    if let Some(chat_id) = chat_id {
        request = request.header("x-mangoo-chat-id", chat_id);
    }
    request.send().await.unwrap()
}

fn chunk_text(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .filter_map(|e| {
            e.json()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn a_streamed_completion_arrives_as_openai_chunks_and_stores_the_conversation() {
    let app = spawn_openai_app().await;
    let response = complete(
        &app,
        "alice",
        None,
        json!({
            "model": GPT, "stream": true, "stream_options": {"include_usage": true},
            "max_tokens": 100, "temperature": 0.2,
            "messages": [
                {"role": "system", "content": "Answer in English."},
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": [{"type": "text", "text": "Say hello"}]}
            ]
        }),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let chat_id = response.headers()["x-mangoo-chat-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let events = SseReader::new(response).collect().await;

    let role = events[0].json();
    assert_eq!(role["object"], "chat.completion.chunk");
    assert_eq!(role["model"], GPT);
    assert_eq!(
        role["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert!(role["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(chunk_text(&events), "Hello, world!");
    let finish = &events[events.len() - 3].json();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let usage = events[events.len() - 2].json();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16})
    );
    assert_eq!(events.last().unwrap().data, "[DONE]");
    // One completion: the same id on every chunk; ids of the events increase by one.
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| e.json()["id"] == role["id"])
    );
    let ids: Vec<i64> = events
        .iter()
        .filter(|e| e.id.is_some())
        .map(SseEvent::id_num)
        .collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");

    // The model saw the bot's prompt with the request's, and the conversation in order.
    let sent = &app.fake.requests()[0].body;
    assert_eq!(sent["max_tokens"], 100);
    assert!((sent["temperature"].as_f64().unwrap() - 0.2).abs() < 1e-6);
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(
        messages[0]["content"],
        format!("{SYSTEM_PROMPT}\n\nAnswer in English.")
    );
    let said: Vec<(&str, &str)> = messages[1..]
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        said,
        [
            ("user", "Say hi"),
            ("assistant", "Hi!"),
            ("user", "Say hello")
        ]
    );

    // The chat holds the conversation as brought, then the answer as streamed.
    let stored = app.settled_messages("alice", &chat_id).await;
    let texts: Vec<&str> = stored
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["Say hi", "Hi!", "Say hello", "Hello, world!"]);
}

#[tokio::test]
async fn an_unstreamed_completion_is_one_object_and_the_chat_id_header_carries_the_chat_on() {
    let app = spawn_openai_app().await;
    let first = complete(
        &app,
        "alice",
        None,
        json!({"model": GPT, "messages": [{"role": "user", "content": "Say hello"}]}),
    )
    .await;
    assert_eq!(first.status(), 200);
    assert!(
        first.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let chat_id = first.headers()["x-mangoo-chat-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], GPT);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello, world!");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["total_tokens"], 16);

    // The client sends the whole conversation again; the stored chat is what the model sees.
    app.fake.push(Script::tokens(&["Again"]));
    let second = complete(
        &app,
        "alice",
        Some(&chat_id),
        json!({"model": GPT, "messages": [
            {"role": "user", "content": "Say hello"},
            {"role": "assistant", "content": "a different copy"},
            {"role": "user", "content": "Once more"}
        ]}),
    )
    .await;
    assert_eq!(second.headers()["x-mangoo-chat-id"], chat_id.as_str());
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Again");
    let sent = &app.fake.requests()[1].body;
    let said: Vec<&str> = sent["messages"].as_array().unwrap()[1..]
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(said, ["Say hello", "Hello, world!", "Once more"]);
    assert_eq!(app.settled_messages("alice", &chat_id).await.len(), 4);

    // Another user cannot carry Alice's chat on.
    let mallory = complete(
        &app,
        "mallory",
        Some(&chat_id),
        json!({"model": GPT, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(mallory.status(), 404);
}

async fn openai_error(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        error["type"].is_string() && error.get("param").is_some(),
        "{body}"
    );
    (status, error.clone())
}

#[tokio::test]
async fn refusals_and_failures_come_in_openai_error_shape_with_its_statuses() {
    let app = spawn_openai_app().await;
    let hello = json!([{"role": "user", "content": "hi"}]);

    let (status, error) = openai_error(
        complete(
            &app,
            "alice",
            None,
            json!({"model": "nope", "messages": hello}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, &error["code"], &error["param"]),
        (404, &json!("model_not_found"), &json!("model"))
    );
    assert_eq!(error["type"], "invalid_request_error");

    let unauthenticated = app
        .client
        .post(app.url("/v1/chat/completions"))
        .json(&json!({"model": GPT, "messages": hello}))
        .send()
        .await
        .unwrap();
    let (status, error) = openai_error(unauthenticated).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (401, Some("invalid_api_key"))
    );

    for bad in [
        json!({"model": GPT, "messages": []}),
        json!({"model": GPT, "messages": hello, "n": 3}),
        json!({"model": GPT, "messages": hello, "temperature": 9}),
        json!({"model": GPT, "messages": [{"role": "tool", "content": "x"}]}),
        json!({"messages": hello}),
    ] {
        let (status, error) = openai_error(complete(&app, "alice", None, bad.clone()).await).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(error["type"], "invalid_request_error");
    }

    // The provider throttles: unstreamed, a 429 as OpenAI would send; streamed, an error chunk.
    app.fake
        .push(Script::http_error(429, "rate_limit_exceeded"));
    let (status, error) = openai_error(
        complete(
            &app,
            "alice",
            None,
            json!({"model": GPT, "messages": hello}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (429, Some("upstream_throttled"))
    );
    app.fake
        .push(Script::http_error(429, "rate_limit_exceeded"));
    let streamed = complete(
        &app,
        "alice",
        None,
        json!({"model": GPT, "stream": true, "messages": hello}),
    )
    .await;
    assert_eq!(streamed.status(), 200);
    let events = SseReader::new(streamed).collect().await;
    let failure = events[events.len() - 2].json();
    assert_eq!(failure["error"]["code"], "upstream_throttled");
    assert_eq!(events.last().unwrap().data, "[DONE]");

    let (status, models) = app.get_json("alice", "/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&GPT), "{ids:?}");
    let missing = app
        .client
        .get(app.url("/v1/models/nope"))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(openai_error(missing).await.0, 404);
}

#[tokio::test]
async fn a_dropped_completion_resumes_by_last_event_id_without_a_duplicate_and_stops() {
    let app = spawn_openai_app().await;
    app.fake
        .push(Script::tokens(&["The", " sea", " is", " wide", "."]).gated());
    let response = complete(
        &app,
        "alice",
        None,
        json!({"model": GPT, "stream": true, "messages": [{"role": "user", "content": "sea?"}]}),
    )
    .await;
    let chat_id = response.headers()["x-mangoo-chat-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut reader = SseReader::new(response);
    let mut seen = vec![reader.next_event().await.unwrap()];
    for _ in 0..2 {
        app.fake.release(1);
        seen.push(reader.next_event().await.unwrap());
    }
    drop(reader);

    let resumed = app
        .client
        .get(app.url(&format!("/v1/chats/{chat_id}/completions/stream")))
        .bearer_auth(app.token("alice"))
        .header("last-event-id", seen.last().unwrap().id_num().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    let mut reader = SseReader::new(resumed);
    app.fake.release(3);
    let mut rest = Vec::new();
    while let Some(event) = reader.next_event().await {
        rest.push(event);
    }
    assert_eq!(
        rest[0].id_num(),
        seen.last().unwrap().id_num() + 1,
        "no gap, no duplicate"
    );
    assert_eq!(
        rest[0].json()["id"],
        seen[0].json()["id"],
        "the same completion"
    );
    assert_eq!(chunk_text(&seen) + &chunk_text(&rest), "The sea is wide.");
    assert_eq!(rest.last().unwrap().data, "[DONE]");

    // Everything seen: nothing left.
    let last_id = rest.iter().rev().find(|e| e.id.is_some()).unwrap().id_num();
    let done = app
        .client
        .get(app.url(&format!("/v1/chats/{chat_id}/completions/stream")))
        .bearer_auth(app.token("alice"))
        .header("last-event-id", last_id.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 204);

    // A running completion stops from another connection, with OpenAI's finish chunk.
    app.fake
        .push(Script::tokens(&["one", "two", "three"]).gated());
    let running = complete(
        &app,
        "alice",
        Some(&chat_id),
        json!({"model": GPT, "stream": true, "messages": [{"role": "user", "content": "count"}]}),
    )
    .await;
    let mut reader = SseReader::new(running);
    reader.next_event().await.unwrap();
    app.fake.release(1);
    reader.next_event().await.unwrap();
    let stop = app
        .client
        .post(app.url(&format!("/api/v1/chats/{chat_id}/stop")))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 200);
    let rest = reader.collect().await;
    let finish = rest
        .iter()
        .find(|e| e.data != "[DONE]" && e.json()["choices"][0]["finish_reason"].is_string());
    assert_eq!(
        finish.unwrap().json()["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(app.fake.outcome(1).await, Outcome::Cancelled);
}

#[tokio::test]
async fn a_stop_sequence_ends_the_answer_before_it_even_across_tokens() {
    let app = spawn_openai_app().await;
    app.fake
        .push(Script::tokens(&["Hello", ", wo", "rld", " and more"]));
    let response = complete(
        &app,
        "alice",
        None,
        json!({"model": GPT, "stop": ["world"], "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let chat_id = response.headers()["x-mangoo-chat-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hello, ");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let stored = app.settled_messages("alice", &chat_id).await;
    assert_eq!(stored[1]["content"], "Hello, ", "stored as delivered");
}
