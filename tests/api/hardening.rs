//! What a security review found, each reproduced against the running server: unbounded metric
//! labels, credentials in URLs, HEAD starting answers, spoofable client addresses, internals in
//! error bodies, a stream cap that did not count generations, and panics that left chats stuck.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mangoo::store::{
    AnswerVersion, BegunTurn, ChatCursor, ChatRecord, ChatStore, FinishedTurn, MessageRecord,
    NewTurn, PartialAnswer, SearchHit, SearchTerms, SqliteStore, StoreError,
};
use reqwest::Method;
use serde_json::{Value, json};

use super::fake_upstream::Script;
use super::helpers::{
    BOT, SseReader, TestApp, spawn_app_with, spawn_app_with_log, spawn_app_with_store,
};
use mangoo::events::StreamEvent;
use mangoo::stream_log::{AnswerSignals, Audience, Claim, ClaimError, EventLog, LogError};

#[tokio::test]
async fn unknown_methods_share_one_metrics_label_and_grow_nothing() {
    let app = spawn_app_with(|_| {}).await;
    let long_method = "X".repeat(10_000);
    for n in 0..5 {
        let method = Method::from_bytes(format!("{long_method}{n}").as_bytes()).unwrap();
        let response = app
            .client
            .request(method, app.url("/api/v1/chats"))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_client_error());
    }

    let metrics = app.metrics_text().await;

    assert!(!metrics.contains("XXXXXXXX"), "a raw method became a label");
    assert!(metrics.contains(r#"method="other""#), "{metrics}");
    assert!(
        metrics.len() < 64 * 1024,
        "metrics grew to {} bytes",
        metrics.len()
    );
}

#[tokio::test]
async fn a_token_in_the_url_counts_only_on_the_stream_routes() {
    let app = spawn_app_with(|_| {}).await;
    let token = app.token("alice");

    let listed = app
        .client
        .get(app.url(&format!("/api/v1/chats?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 401, "a token in a list URL is not read");
    let body: Value = listed.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");

    let streamed = app
        .client
        .get(app.url("/api/v1/chat/stream"))
        .query(&[
            ("token", token.as_str()),
            ("bot_id", BOT),
            ("message", "hi"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let events = SseReader::new(streamed).collect().await;
    assert_eq!(events.last().unwrap().event, "done");
}

#[tokio::test]
async fn head_on_a_stream_route_is_405_and_asks_no_model() {
    let app = spawn_app_with(|_| {}).await;
    let token = app.token("alice");
    for path in [
        "/api/v1/chat/stream?bot_id=bot-123&message=hi".to_owned(),
        "/api/v1/chats/chat-x/stream".to_owned(),
    ] {
        let response = app
            .client
            .head(app.url(&path))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{path}");
        assert!(response.headers().contains_key("allow"));
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "the JSON error's headers (HEAD carries no body)"
        );
    }

    assert!(app.fake.requests().is_empty(), "no provider was called");
    let (_, chats) = app.get_json("alice", "/api/v1/chats").await;
    assert_eq!(chats["chats"], json!([]), "no turn was stored");
}

#[tokio::test]
async fn with_a_wildcard_proxy_the_client_cannot_choose_its_address() {
    let app = spawn_app_with(|c| {
        c.server.trusted_proxies = vec!["*".into()];
        c.rate_limit.requests_per_second = 0.001;
        c.rate_limit.burst = 3;
    })
    .await;
    let mut statuses = Vec::new();
    for n in 0..6 {
        // The client writes the left-most entry; the proxy appends the address it saw.
        let response = app
            .client
            .get(app.url("/api/v1/chats"))
            .header("x-forwarded-for", format!("10.9.{n}.1, 203.0.113.7"))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses,
        [401, 401, 401, 429, 429, 429],
        "one address, one limit"
    );
}

#[tokio::test]
async fn refusals_carry_the_json_body_and_no_library_internals() {
    let app = spawn_app_with(|_| {}).await;
    // alg "none": jsonwebtoken's own message quotes its list of algorithm variants.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ.";
    let response = app
        .client
        .get(app.url("/api/v1/chats"))
        .bearer_auth(none)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid token", "{body}");

    let response = app
        .client
        .get(app.url("/api/v1/chats/%FF%FE/messages"))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["code"], "invalid_request");
}

#[tokio::test]
async fn api_json_is_never_cached_or_sniffed() {
    let app = spawn_app_with(|_| {}).await;
    for (path, token) in [
        ("/api/v1/chats", Some(app.token("alice"))),
        ("/api/v1/chats", None),
        ("/api/v1/bots", Some(app.token("alice"))),
    ] {
        let mut request = app.client.get(app.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let headers = response.headers();
        assert_eq!(headers["cache-control"], "no-store", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
    }
}

#[tokio::test]
async fn the_stream_cap_counts_answers_still_generating_after_their_clients_left() {
    let app = spawn_app_with(|c| {
        c.streams.on_disconnect = mangoo::config::DisconnectPolicy::Continue;
        c.rate_limit.max_concurrent_streams = 2;
    })
    .await;
    for _ in 0..2 {
        app.fake.push(Script::tokens(&["a", "b"]).gated());
        let (reader, _chat) = app.open_stream("alice", "keep going").await;
        drop(reader); // the client leaves after `start`; the answer goes on
    }

    let third = app
        .post_stream("alice", json!({"bot_id": BOT, "message": "one more"}))
        .await;
    assert_eq!(third.status(), 429);
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["code"], "too_many_streams");

    app.fake.release(4); // both answers finish; their places come back
    let freed = async {
        loop {
            let response = app
                .post_stream("alice", json!({"bot_id": BOT, "message": "now?"}))
                .await;
            if response.status() == 200 {
                return SseReader::new(response).collect().await;
            }
            assert_eq!(response.status(), 429);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let events = tokio::time::timeout(super::helpers::HANG_GUARD, freed)
        .await
        .expect("the places never came back");
    assert_eq!(events.last().unwrap().event, "done");
}

/// SQLite underneath, with a panic injected where the test asks for one.
struct PanickingStore {
    inner: SqliteStore,
    panic_in_finish: AtomicBool,
    panic_in_list: AtomicBool,
}

#[async_trait::async_trait]
impl ChatStore for PanickingStore {
    async fn get_chat(&self, chat_id: &str) -> Result<Option<ChatRecord>, StoreError> {
        self.inner.get_chat(chat_id).await
    }
    async fn list_chats(
        &self,
        user_id: &str,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<Vec<ChatRecord>, StoreError> {
        if self.panic_in_list.swap(false, Ordering::SeqCst) {
            panic!("injected: list_chats");
        }
        self.inner.list_chats(user_id, limit, cursor).await
    }
    async fn list_messages(
        &self,
        chat_id: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        self.inner.list_messages(chat_id, after_seq, limit).await
    }
    async fn messages_before(
        &self,
        chat_id: &str,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        self.inner.messages_before(chat_id, before_seq, limit).await
    }
    async fn message_seq(
        &self,
        chat_id: &str,
        message_id: &str,
    ) -> Result<Option<i64>, StoreError> {
        self.inner.message_seq(chat_id, message_id).await
    }
    async fn search_chats(
        &self,
        user_id: &str,
        terms: &SearchTerms,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<Vec<SearchHit>, StoreError> {
        self.inner.search_chats(user_id, terms, limit, cursor).await
    }
    async fn begin_turn(&self, turn: &NewTurn) -> Result<BegunTurn, StoreError> {
        self.inner.begin_turn(turn).await
    }
    async fn finish_turn(&self, turn: FinishedTurn) -> Result<bool, StoreError> {
        if self.panic_in_finish.swap(false, Ordering::SeqCst) {
            panic!("injected: finish_turn");
        }
        self.inner.finish_turn(turn).await
    }
    async fn save_partial(&self, partial: PartialAnswer) -> Result<bool, StoreError> {
        self.inner.save_partial(partial).await
    }
    async fn chat_history(
        &self,
        chat_id: &str,
        user_id: &str,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>)>, StoreError> {
        self.inner.chat_history(chat_id, user_id, limit).await
    }
    async fn delete_chat(&self, chat_id: &str, user_id: &str) -> Result<bool, StoreError> {
        self.inner.delete_chat(chat_id, user_id).await
    }
    async fn rename_chat(
        &self,
        chat_id: &str,
        user_id: &str,
        title: &str,
    ) -> Result<bool, StoreError> {
        self.inner.rename_chat(chat_id, user_id, title).await
    }
    async fn rewind_chat(
        &self,
        chat_id: &str,
        user_id: &str,
        message: &str,
        keep_answer: bool,
    ) -> Result<(), StoreError> {
        self.inner
            .rewind_chat(chat_id, user_id, message, keep_answer)
            .await
    }
    async fn answer_versions(
        &self,
        chat_id: &str,
        from_seq: i64,
        to_seq: i64,
    ) -> Result<Vec<AnswerVersion>, StoreError> {
        self.inner.answer_versions(chat_id, from_seq, to_seq).await
    }
    async fn recover_abandoned_turns(&self) -> Result<u64, StoreError> {
        self.inner.recover_abandoned_turns().await
    }
    async fn usage(
        &self,
        query: mangoo::store::UsageQuery<'_>,
    ) -> Result<Vec<mangoo::store::UsageRow>, StoreError> {
        self.inner.usage(query).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

async fn app_with_panicking_store() -> (TestApp, Arc<PanickingStore>) {
    spawn_app_with_store(|db_url| async move {
        Arc::new(PanickingStore {
            inner: SqliteStore::connect(&db_url).await.unwrap(),
            panic_in_finish: AtomicBool::new(false),
            panic_in_list: AtomicBool::new(false),
        })
    })
    .await
}

#[tokio::test]
async fn a_panicking_handler_is_a_json_500_and_the_server_keeps_serving() {
    let (app, store) = app_with_panicking_store().await;
    store.panic_in_list.store(true, Ordering::SeqCst);

    let (status, body) = app.get_json("alice", "/api/v1/chats").await;
    assert_eq!(status, 500);
    assert_eq!(body["code"], "internal_error");
    assert_eq!(body["type"], "error");
    assert!(!body.to_string().contains("injected"), "{body}");

    let (status, _) = app.get_json("alice", "/api/v1/chats").await;
    assert_eq!(
        status, 200,
        "the same connection pool and server still answer"
    );
}

#[tokio::test]
async fn a_panicking_producer_ends_its_stream_frees_the_chat_and_stores_an_error() {
    let (app, store) = app_with_panicking_store().await;
    store.panic_in_finish.store(true, Ordering::SeqCst);

    let response = app
        .post_stream("alice", json!({"bot_id": BOT, "message": "first"}))
        .await;
    let events = SseReader::new(response).collect().await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:?}");
    assert_eq!(last.json()["code"], "internal_error");
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();

    let messages = app.settled_messages("alice", &chat_id).await;
    assert_eq!(messages[1]["status"], "error");
    assert_eq!(
        messages[1]["content"], "Hello, world!",
        "the streamed text is kept"
    );

    let next = app
        .post_stream(
            "alice",
            json!({"bot_id": BOT, "message": "again", "chat_id": chat_id}),
        )
        .await;
    assert_eq!(next.status(), 200, "the chat is not left busy");
    let events = SseReader::new(next).collect().await;
    assert_eq!(events.last().unwrap().event, "done");
}

#[tokio::test]
async fn quotas_answer_403_in_the_contract_shape_and_store_nothing() {
    let app = spawn_app_with(|c| {
        c.quotas.max_turns_per_chat = 1;
        c.quotas.max_chats_per_user = 1;
    })
    .await;
    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "one"}))
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();

    let more = app
        .post_stream(
            "alice",
            json!({"bot_id": BOT, "message": "two", "chat_id": chat_id}),
        )
        .await;
    assert_eq!(more.status(), 403);
    let body: Value = more.json().await.unwrap();
    assert_eq!(
        (body["type"].as_str(), body["code"].as_str()),
        (Some("error"), Some("turn_limit_reached"))
    );

    let another = app
        .post_stream("alice", json!({"bot_id": BOT, "message": "new chat"}))
        .await;
    assert_eq!(another.status(), 403);
    let body: Value = another.json().await.unwrap();
    assert_eq!(body["code"], "chat_limit_reached");

    let messages = app.settled_messages("alice", &chat_id).await;
    assert_eq!(messages.len(), 2, "the refused turns left nothing");
}

#[tokio::test]
async fn messages_come_in_pages_that_chain_by_cursor() {
    let app = spawn_app_with(|_| {}).await;
    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "one"}))
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();
    app.chat(
        "alice",
        json!({"bot_id": BOT, "message": "two", "chat_id": chat_id}),
    )
    .await;

    let (status, whole) = app
        .get_json("alice", &format!("/api/v1/chats/{chat_id}/messages"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        whole["messages"].as_array().unwrap().len(),
        4,
        "one page by default"
    );
    assert_eq!(whole["next_cursor"], Value::Null);

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/chats/{chat_id}/messages?limit=3");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = app.get_json("alice", &path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].clone()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let all: Vec<Value> = whole["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(seen, all);

    let (status, body) = app
        .get_json(
            "alice",
            &format!("/api/v1/chats/{chat_id}/messages?cursor=nope"),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_request"))
    );
}

/// A stream log whose server is gone: every call fails.
struct UnreachableLog;

#[async_trait::async_trait]
impl EventLog for UnreachableLog {
    async fn claim(&self, _: &str) -> Result<Claim, ClaimError> {
        Err(ClaimError::Log(LogError("connection refused".into())))
    }
    async fn open(
        &self,
        _: &str,
        _: Claim,
        _: &str,
        _: i64,
        _: &Arc<Audience>,
    ) -> Result<AnswerSignals, LogError> {
        Err(LogError("connection refused".into()))
    }
    async fn append(&self, _: &str, _: StreamEvent) -> Result<(), LogError> {
        Err(LogError("connection refused".into()))
    }
    async fn close(&self, _: &str) -> Result<(), LogError> {
        Err(LogError("connection refused".into()))
    }
    async fn follow(
        &self,
        _: &str,
        _: i64,
    ) -> Result<Option<futures_util::stream::BoxStream<'static, StreamEvent>>, LogError> {
        Err(LogError("connection refused".into()))
    }
}

#[tokio::test]
async fn an_unreachable_stream_log_is_a_retryable_503_that_leaves_no_turn_half_begun() {
    let app = spawn_app_with_log(Arc::new(UnreachableLog)).await;

    let response = app
        .post_stream("alice", json!({"bot_id": BOT, "message": "hello?"}))
        .await;

    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "service_unavailable");
    assert!(!body.to_string().contains("refused"), "{body}");
    assert!(app.fake.requests().is_empty(), "no provider was asked");
    let (_, chats) = app.get_json("alice", "/api/v1/chats").await;
    assert_eq!(chats["chats"], json!([]), "nothing was stored: {chats}");
}

#[tokio::test]
async fn the_history_sent_to_the_provider_is_the_latest_turns_within_the_budget() {
    let app = spawn_app_with(|c| c.quotas.max_history_chars = 40).await;
    let first = app
        .chat(
            "alice",
            json!({"bot_id": BOT, "message": "an old question, long enough to matter"}),
        )
        .await;
    let chat_id = first[0].json()["chat_id"].as_str().unwrap().to_owned();
    app.chat(
        "alice",
        json!({"bot_id": BOT, "message": "recent", "chat_id": chat_id}),
    )
    .await;

    app.chat(
        "alice",
        json!({"bot_id": BOT, "message": "now", "chat_id": chat_id}),
    )
    .await;

    // Bedrock's body: messages[].content[].text. The old turn (38 + 13 characters) no longer
    // fits; the recent one (6 + 13) does; the new message always goes.
    let sent = app.fake.requests().last().unwrap().body.to_string();
    assert!(!sent.contains("an old question"), "{sent}");
    assert!(sent.contains("recent") && sent.contains("now"), "{sent}");
    let stored = app.all_messages("alice", &chat_id).await;
    assert_eq!(stored.len(), 6, "everything stays stored");
}
