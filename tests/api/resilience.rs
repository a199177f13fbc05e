//! Streams that survive real networks: heartbeats through an idle-cutting proxy, and every
//! stream timeout ending in its own error code with the upstream request cancelled.

use std::time::Duration;

use serde_json::json;

use super::fake_upstream::{Outcome, Script};
use super::helpers::{BOT, SseReader, answer_text, spawn_app_with};
use super::idle_proxy::IdleProxy;

/// A stream that falls silent for longer than the proxy's idle limit, then finishes. Returns
/// whether the client saw it end with `done`.
async fn silent_stream_through_proxy(heartbeat_secs: u64) -> (bool, String) {
    let app = spawn_app_with(|c| c.server.heartbeat_secs = heartbeat_secs).await;
    let proxy = IdleProxy::start(app.addr, Duration::from_secs(2)).await;
    app.fake
        .push(Script::tokens(&["before", " the", " pause"]).gated());
    let response = app
        .client
        .post(proxy.url("/api/v1/chat/stream"))
        .bearer_auth(app.token("alice"))
        .json(&json!({"bot_id": BOT, "message": "think hard"}))
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    assert_eq!(reader.next_event().await.unwrap().event, "start");
    app.fake.release(1);
    assert_eq!(
        reader.next_event().await.unwrap().json()["content"],
        "before"
    );
    // The model thinks for longer than the proxy tolerates silence.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    app.fake.release(2);
    let rest = reader.collect().await;
    let finished = rest.last().is_some_and(|e| e.event == "done");
    (finished, answer_text(&rest))
}

#[tokio::test]
async fn heartbeats_keep_a_silent_stream_alive_through_an_idle_cutting_proxy() {
    let (finished, rest) = silent_stream_through_proxy(1).await;
    assert!(finished, "the stream died");
    assert_eq!(rest, " the pause");
}

#[tokio::test]
async fn without_heartbeats_the_same_stream_is_cut_by_the_proxy() {
    let (finished, rest) = silent_stream_through_proxy(0).await;
    assert!(!finished, "the proxy should have cut the silent stream");
    assert_eq!(rest, "");
}

/// Opens a stream whose upstream sends `released` tokens of a gated script and then nothing.
async fn stalled_answer(
    adjust: impl FnOnce(&mut mangoo::config::Config),
    released: usize,
) -> (serde_json::Value, Outcome) {
    let app = spawn_app_with(adjust).await;
    app.fake
        .push(Script::tokens(&["one", " two", " three"]).gated());
    app.fake.release(released);
    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "hi"}))
        .await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:?}");
    assert_eq!(answer_text(&events).split_whitespace().count(), released);
    (last.json(), app.fake.outcome(0).await)
}

#[tokio::test]
async fn no_first_token_in_time_is_an_error_and_cancels_the_upstream() {
    let (error, outcome) = stalled_answer(|c| c.streams.first_token_timeout_secs = 1, 0).await;
    assert_eq!(error["code"], "upstream_first_token_timeout");
    assert_eq!(error["retryable"], true);
    assert_eq!(outcome, Outcome::Cancelled);
}

#[tokio::test]
async fn a_silent_gap_between_tokens_is_an_error_and_cancels_the_upstream() {
    let (error, outcome) = stalled_answer(|c| c.streams.idle_timeout_secs = 1, 1).await;
    assert_eq!(error["code"], "upstream_idle_timeout");
    assert_eq!(outcome, Outcome::Cancelled);
}

#[tokio::test]
async fn a_stream_longer_than_allowed_is_ended_and_cancels_the_upstream() {
    let (error, outcome) = stalled_answer(|c| c.streams.max_stream_secs = 1, 1).await;
    assert_eq!(error["code"], "stream_too_long");
    assert_eq!(error["retryable"], false);
    assert_eq!(outcome, Outcome::Cancelled);
}

#[tokio::test]
async fn a_provider_that_cannot_be_connected_to_in_time_is_a_connect_timeout() {
    // A listener whose accept queue is full and never drained: further SYNs go unanswered, so a
    // connection attempt hangs the way it does towards a black-holed address.
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let filler =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        filler.set_nonblocking(true).unwrap();
        let _ = filler.connect(&addr.into());
        fillers.push(filler);
    }
    let app = spawn_app_with(|c| {
        let bedrock = c.providers.bedrock.as_mut().unwrap();
        bedrock.endpoint_url = Some(format!("http://{addr}"));
        bedrock.connect_timeout_secs = 1;
    })
    .await;

    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "hi"}))
        .await;

    let last = events.last().unwrap().json();
    assert_eq!(last["code"], "upstream_connect_timeout", "{last}");
    assert_eq!(last["retryable"], true);
    drop((listener, fillers));
}
