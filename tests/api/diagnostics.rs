//! The diagnostics stream `mangoo probe` measures paths with: paced, stamped, authenticated like
//! an answer, resumable, and never a model call.

use super::helpers::{SseReader, TestApp, spawn_app};

async fn diagnostics(app: &TestApp, query: &str, last_event_id: Option<i64>) -> reqwest::Response {
    let mut request = app
        .client
        .get(app.url(&format!("/api/v1/diagnostics/stream?{query}")))
        .bearer_auth(app.token("prober"));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn paced_events_carry_their_sequence_and_send_time_then_done() {
    let app = spawn_app().await;
    let response = diagnostics(&app, "events=3&interval_ms=40", None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(
        response.headers()["cache-control"],
        "no-cache, no-transform"
    );
    let events = SseReader::new(response).collect().await;

    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["start", "message", "message", "message", "done"]);
    let ids: Vec<i64> = events.iter().map(|e| e.id_num()).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    let stamps: Vec<serde_json::Value> = events[1..4]
        .iter()
        .map(|e| serde_json::from_str(e.json()["content"].as_str().unwrap()).unwrap())
        .collect();
    for (n, stamp) in stamps.iter().enumerate() {
        assert_eq!(stamp["seq"], n as u64 + 1);
    }
    for pair in stamps.windows(2) {
        let gap = pair[1]["sent_at_ms"].as_u64().unwrap() - pair[0]["sent_at_ms"].as_u64().unwrap();
        // Stamps are whole milliseconds, truncated: 40 ms apart may read as 39.
        assert!(gap >= 39, "paced by the server: {gap} ms apart");
    }
    assert!(app.fake.requests().is_empty(), "no model was called");
}

#[tokio::test]
async fn a_resumed_diagnostics_stream_continues_after_the_last_event_id() {
    let app = spawn_app().await;
    let rest = SseReader::new(diagnostics(&app, "events=5&interval_ms=0", Some(3)).await)
        .collect()
        .await;
    let ids: Vec<i64> = rest.iter().map(|e| e.id_num()).collect();
    assert_eq!(ids, [4, 5, 6, 7]);
    assert_eq!(rest.last().unwrap().event, "done");
    let past_the_end = diagnostics(&app, "events=5", Some(7)).await;
    assert_eq!(past_the_end.status(), 204);
}

#[tokio::test]
async fn it_takes_a_query_token_like_eventsource_and_refuses_bad_input() {
    let app = spawn_app().await;
    let by_query = app
        .client
        .get(app.url(&format!(
            "/api/v1/diagnostics/stream?events=1&token={}",
            app.token("prober")
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 200);
    let anonymous = app
        .client
        .get(app.url("/api/v1/diagnostics/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    for bad in [
        "events=0",
        "events=1001",
        "interval_ms=10001",
        "silence_secs=901",
        "events=x",
    ] {
        let refused = diagnostics(&app, bad, None).await;
        assert_eq!(refused.status(), 400, "{bad}");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "invalid_request");
    }
}
