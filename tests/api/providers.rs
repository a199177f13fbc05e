//! Anthropic and OpenAI-compatible providers against test servers speaking their real streaming
//! formats, and bots that fall back from one target to the next.

use serde_json::{Value, json};

use super::fake_upstream::{Outcome, Script};
use super::helpers::{
    ANTHROPIC_KEY, MODEL, OPENAI_KEY, SYSTEM_PROMPT, SseEvent, TestApp, answer_text,
    assert_well_formed, bot, fallback_bot, spawn_app_with,
};

async fn app_with_bots() -> TestApp {
    spawn_app_with(|config| {
        config.bots = vec![
            bot("claude", "anthropic", "claude-3-5-sonnet-latest"),
            bot("gpt", "openai", "gpt-4o-mini"),
            fallback_bot(
                "support",
                &[
                    ("bedrock", MODEL),
                    ("anthropic", "claude-3-5-sonnet-latest"),
                    ("openai", "gpt-4o-mini"),
                ],
            ),
        ];
    })
    .await
}

async fn ask(app: &TestApp, bot_id: &str) -> Vec<SseEvent> {
    let events = app
        .chat("alice", json!({"bot_id": bot_id, "message": "hi"}))
        .await;
    assert_well_formed(&events);
    events
}

fn last_error(events: &[SseEvent]) -> Value {
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:?}");
    last.json()
}

#[tokio::test]
async fn anthropic_streams_text_and_usage() {
    let app = app_with_bots().await;

    let events = ask(&app, "claude").await;

    assert_eq!(answer_text(&events), "Hello, world!");
    let done = events.last().unwrap().json();
    assert_eq!(
        done["usage"],
        json!({"input_tokens": 12, "output_tokens": 4})
    );
    assert_eq!(done["provider"], "anthropic");
    assert_eq!(done["model"], "claude-3-5-sonnet-latest");
    let request = &app.fake.requests()[0];
    assert_eq!(request.provider, "anthropic");
    assert_eq!(request.headers["x-api-key"], ANTHROPIC_KEY);
    assert_eq!(request.headers["anthropic-version"], "2023-06-01");
    assert_eq!(request.body["stream"], true);
    assert_eq!(request.body["system"], SYSTEM_PROMPT);
    assert_eq!(
        request.body["messages"],
        json!([{"role": "user", "content": "hi"}])
    );
}

#[tokio::test]
async fn anthropic_errors_map_onto_the_shared_codes() {
    let app = app_with_bots().await;
    app.fake
        .push(Script::tokens(&["one", " two"]).exception_at(1, "overloaded_error"));
    app.fake.push(Script::http_error(429, "rate_limit_error"));
    app.fake
        .push(Script::http_error(400, "invalid_request_error"));

    let overloaded = ask(&app, "claude").await;
    assert_eq!(answer_text(&overloaded), "one");
    assert_eq!(last_error(&overloaded)["code"], "upstream_unavailable");
    assert_eq!(last_error(&overloaded)["retryable"], true);

    let throttled = ask(&app, "claude").await;
    assert_eq!(last_error(&throttled)["code"], "upstream_throttled");
    let said = last_error(&throttled)["error"].to_string();
    assert!(
        !said.contains("refused by the test"),
        "upstream words stay in the log: {said}"
    );

    let invalid = ask(&app, "claude").await;
    assert_eq!(last_error(&invalid)["code"], "upstream_invalid_request");
    assert_eq!(last_error(&invalid)["retryable"], false);
}

#[tokio::test]
async fn an_anthropic_connection_dropped_mid_stream_is_an_error() {
    let app = app_with_bots().await;
    app.fake
        .push(Script::tokens(&["one", " two", " three"]).drop_at(2));

    let events = ask(&app, "claude").await;

    assert_eq!(last_error(&events)["code"], "upstream_connection_error");
    assert!(answer_text(&events).len() <= "one two".len());
}

#[tokio::test]
async fn openai_compatible_servers_stream_despite_their_quirks() {
    let app = app_with_bots().await;

    let events = ask(&app, "gpt").await;

    assert_eq!(answer_text(&events), "Hello, world!");
    let done = events.last().unwrap().json();
    assert_eq!(
        done["usage"],
        json!({"input_tokens": 12, "output_tokens": 4})
    );
    assert_eq!(done["provider"], "openai");
    let request = &app.fake.requests()[0];
    assert_eq!(request.provider, "openai");
    assert_eq!(
        request.headers["authorization"],
        format!("Bearer {OPENAI_KEY}").as_str()
    );
    assert_eq!(request.body["stream"], true);
    assert_eq!(
        request.body["stream_options"],
        json!({"include_usage": true})
    );
    assert_eq!(
        request.body["messages"],
        json!([
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "hi"}
        ])
    );
}

#[tokio::test]
async fn an_openai_stream_without_done_after_its_finish_reason_still_completes() {
    let app = app_with_bots().await;
    app.fake.push(Script::default().omit_done());

    let events = ask(&app, "gpt").await;

    assert_eq!(events.last().unwrap().event, "done");
    assert_eq!(answer_text(&events), "Hello, world!");
}

#[tokio::test]
async fn openai_errors_map_onto_the_shared_codes() {
    let app = app_with_bots().await;
    app.fake
        .push(Script::tokens(&["one", " two"]).exception_at(1, "server_error"));
    app.fake
        .push(Script::http_error(429, "rate_limit_exceeded"));
    app.fake
        .push(Script::tokens(&["one", " two", " three"]).drop_at(2));

    let mid_stream = ask(&app, "gpt").await;
    assert_eq!(answer_text(&mid_stream), "one");
    assert_eq!(last_error(&mid_stream)["code"], "upstream_error");

    let throttled = ask(&app, "gpt").await;
    assert_eq!(last_error(&throttled)["code"], "upstream_throttled");

    let dropped = ask(&app, "gpt").await;
    assert_eq!(last_error(&dropped)["code"], "upstream_connection_error");
}

#[tokio::test]
async fn a_target_that_fails_before_its_first_token_falls_back_to_the_next() {
    let app = app_with_bots().await;
    app.fake
        .push(Script::http_error(429, "ThrottlingException"));
    app.fake.push(Script::http_error(529, "overloaded_error"));
    app.fake.push(Script::tokens(&["from", " openai"]));

    let events = ask(&app, "support").await;

    assert_eq!(answer_text(&events), "from openai");
    let done = events.last().unwrap().json();
    assert_eq!(done["provider"], "openai");
    assert_eq!(done["model"], "gpt-4o-mini");
    let providers: Vec<_> = app.fake.requests().iter().map(|r| r.provider).collect();
    assert_eq!(providers, ["bedrock", "anthropic", "openai"]);
}

#[tokio::test]
async fn a_target_silent_past_the_first_token_timeout_is_skipped_and_cancelled() {
    let app = spawn_app_with(|config| {
        config.streams.first_token_timeout_secs = 1;
        config.bots = vec![fallback_bot(
            "support",
            &[
                ("bedrock", MODEL),
                ("anthropic", "claude-3-5-sonnet-latest"),
            ],
        )];
    })
    .await;
    // Bedrock accepts but never sends a token (its gate is never opened).
    app.fake.push(Script::tokens(&["never"]).gated());

    let events = ask(&app, "support").await;

    assert_eq!(events.last().unwrap().json()["provider"], "anthropic");
    assert_eq!(answer_text(&events), "Hello, world!");
    assert_eq!(app.fake.outcome(0).await, Outcome::Cancelled);
}

#[tokio::test]
async fn once_a_token_has_streamed_there_is_no_fallback() {
    let app = app_with_bots().await;
    app.fake
        .push(Script::tokens(&["partial", " answer"]).exception_at(1, "modelStreamErrorException"));

    let events = ask(&app, "support").await;

    assert_eq!(answer_text(&events), "partial");
    assert_eq!(last_error(&events)["code"], "upstream_error");
    assert_eq!(app.fake.requests().len(), 1, "no other target was called");
}

#[tokio::test]
async fn when_every_target_fails_the_last_failure_is_reported() {
    let app = app_with_bots().await;
    app.fake
        .push(Script::http_error(503, "ServiceUnavailableException"));
    app.fake.push(Script::http_error(529, "overloaded_error"));
    app.fake
        .push(Script::http_error(429, "rate_limit_exceeded"));

    let events = ask(&app, "support").await;

    assert_eq!(events.len(), 2, "start and the error: {events:?}");
    assert_eq!(last_error(&events)["code"], "upstream_throttled");
    assert_eq!(app.fake.requests().len(), 3);
}
