//! `spawn_app()`: the real server on an ephemeral port with a fresh SQLite file, wired to its own
//! fake Bedrock, plus an HTTP client and an SSE reader that parses the bytes as they arrive.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mangoo::auth::Authenticator;
use mangoo::config::{
    AnthropicConfig, BedrockConfig, BotConfig, Config, OpenAiConfig, Secret, TargetConfig,
};
use mangoo::startup::{Application, Backends};
use mangoo::store::ChatStore;
use mangoo::stream_log::EventLog;
use mangoo::stream_log::memory::MemoryLog;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::fake_upstream::FakeUpstream;

/// The longest any awaited condition may take before the test fails as hung. A guard against
/// deadlock, never a performance assertion: passing tests finish far below it.
pub const HANG_GUARD: Duration = Duration::from_secs(20);

pub const SECRET: &str = "test-secret-test-secret-test-secret!";
pub const BOT: &str = "bot-123";
pub const MODEL: &str = "anthropic.claude-3-5-sonnet-20240620-v1:0";
pub const SYSTEM_PROMPT: &str = "You are a helpful assistant.";
pub const ANTHROPIC_KEY: &str = "test-anthropic-key";
pub const OPENAI_KEY: &str = "test-openai-key";

pub struct TestApp {
    pub addr: SocketAddr,
    /// Where `/metrics` is served when `[metrics] listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub client: reqwest::Client,
    pub fake: FakeUpstream,
    pub db_path: PathBuf,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

/// A token for `user`, signed with the test secret, valid for an hour.
pub fn token_for(user: &str) -> String {
    Authenticator::hs256(SECRET.as_bytes())
        .issue(user, Duration::from_secs(3600))
        .unwrap()
}

/// The TOML of the test bot `BOT` on Bedrock, answered by `fake`: for tests that run the binary.
pub fn bedrock_bot_toml(fake: &FakeUpstream) -> String {
    format!(
        "[providers.bedrock]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\nmax_attempts = 1\n\n\
         [[bots]]\nid = \"{BOT}\"\nprovider = \"bedrock\"\nmodel = \"{MODEL}\"\n",
        fake.url()
    )
}

/// A configuration pointing at `fake`, storing into `db_path`.
pub fn test_config(fake: &FakeUpstream, db_path: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".into();
    // Streams still open when a test stops the server end after this long.
    config.server.drain_secs = 1;
    // Most tests check what a disconnect does at once; tests/api/resume.rs covers the grace.
    config.streams.disconnect_grace_secs = 0;
    // Tests poll; only the rate-limit tests want the limits near.
    config.rate_limit.requests_per_second = 10_000.0;
    config.rate_limit.burst = 10_000;
    config.rate_limit.max_concurrent_streams = 64;
    config.auth.jwt_secret = Some(Secret::new(SECRET));
    config.database.url = format!("sqlite://{}", db_path.display());
    config.providers.bedrock = Some(BedrockConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(fake.url()),
        max_attempts: 1,
        ..BedrockConfig::default()
    });
    config.providers.anthropic = Some(AnthropicConfig {
        api_key: Some(Secret::new(ANTHROPIC_KEY)),
        base_url: fake.url(),
        ..AnthropicConfig::default()
    });
    config.providers.openai = Some(OpenAiConfig {
        api_key: Some(Secret::new(OPENAI_KEY)),
        base_url: format!("{}/v1", fake.url()),
        ..OpenAiConfig::default()
    });
    config.providers.local.model_path = Some(local_model_path());
    config.bots = vec![bot(BOT, "bedrock", MODEL)];
    config
}

/// A single-target bot with the test system prompt.
pub fn bot(id: &str, provider: &str, model: &str) -> BotConfig {
    BotConfig {
        id: id.into(),
        provider: Some(provider.into()),
        model: Some(model.into()),
        region: None,
        targets: Vec::new(),
        system_prompt: Some(SYSTEM_PROMPT.into()),
        temperature: Some(0.7),
        top_p: None,
        max_tokens: 512,
    }
}

/// A bot that tries `targets` (provider, model) in order.
pub fn fallback_bot(id: &str, targets: &[(&str, &str)]) -> BotConfig {
    BotConfig {
        provider: None,
        model: None,
        targets: targets
            .iter()
            .map(|(provider, model)| TargetConfig {
                provider: (*provider).into(),
                model: (*model).into(),
                region: None,
            })
            .collect(),
        ..bot(id, "", "")
    }
}

/// The real model file, as `mangoo model fetch` stores it.
pub fn local_model_path() -> PathBuf {
    std::env::var_os("MANGOO_LOCAL_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(mangoo::providers::local::default_model_path)
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("mangoo.db");
    let mut config = test_config(&fake, &db_path);
    adjust(&mut config);
    start(config, fake, dir, db_path).await
}

/// The test server over a store the test made (`make` gets the database URL), e.g. one that
/// fails on purpose; the test keeps a handle on it.
pub async fn spawn_app_with_store<S, F, Fut>(make: F) -> (TestApp, Arc<S>)
where
    S: ChatStore,
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Arc<S>>,
{
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("mangoo.db");
    let config = test_config(&fake, &db_path);
    let store = make(config.database.url.clone()).await;
    let backends = Backends {
        store: store.clone(),
        log: Arc::new(MemoryLog::default()),
        shared: None,
    };
    let app = Application::build_with(config, backends)
        .await
        .expect("the app starts");
    (serve(app, fake, dir, db_path), store)
}

/// The test server with its stream log replaced, e.g. by one that fails on purpose.
pub async fn spawn_app_with_log(log: Arc<dyn EventLog>) -> TestApp {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("mangoo.db");
    let config = test_config(&fake, &db_path);
    let backends = Backends {
        store: mangoo::store::connect(&config.database).await.unwrap(),
        log,
        shared: None,
    };
    let app = Application::build_with(config, backends)
        .await
        .expect("the app starts");
    serve(app, fake, dir, db_path)
}

async fn start(
    config: Config,
    fake: FakeUpstream,
    dir: tempfile::TempDir,
    db_path: PathBuf,
) -> TestApp {
    let app = Application::build(config).await.expect("the app starts");
    serve(app, fake, dir, db_path)
}

fn serve(
    app: Application,
    fake: FakeUpstream,
    dir: tempfile::TempDir,
    db_path: PathBuf,
) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        mangoo::telemetry::init(mangoo::config::LogFormat::Text);
    }
    let addr = app.local_addr();
    let metrics_addr = app.metrics_addr();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    TestApp {
        addr,
        metrics_addr,
        client: client_builder().no_proxy().build().unwrap(),
        fake,
        db_path,
        shutdown,
        server,
        _dir: dir,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn token(&self, user: &str) -> String {
        token_for(user)
    }

    /// POSTs a chat message as `user` and returns the raw response.
    pub async fn post_stream(&self, user: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/api/v1/chat/stream"))
            .bearer_auth(self.token(user))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs a message and reads the whole answer.
    pub async fn chat(&self, user: &str, body: Value) -> Vec<SseEvent> {
        let response = self.post_stream(user, body).await;
        assert_eq!(response.status(), 200);
        SseReader::new(response).collect().await
    }

    /// Starts an answer to `message` in a new chat; returns the reader past `start`, and the chat.
    pub async fn open_stream(&self, user: &str, message: &str) -> (SseReader, String) {
        let response = self
            .post_stream(user, serde_json::json!({"bot_id": BOT, "message": message}))
            .await;
        assert_eq!(response.status(), 200);
        let mut reader = SseReader::new(response);
        let start = reader.next_event().await.unwrap();
        assert_eq!(start.event, "start");
        let chat_id = start.json()["chat_id"].as_str().unwrap().to_owned();
        (reader, chat_id)
    }

    pub async fn delete_chat(&self, user: &str, chat_id: &str) -> reqwest::Response {
        self.client
            .delete(self.url(&format!("/api/v1/chats/{chat_id}")))
            .bearer_auth(self.token(user))
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, user: &str, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(self.url(path))
            .bearer_auth(self.token(user))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Every stored message of a chat (all pages), once its answer is no longer `streaming`.
    pub async fn settled_messages(&self, user: &str, chat_id: &str) -> Vec<Value> {
        let settled = async {
            loop {
                let messages = self.all_messages(user, chat_id).await;
                if messages.iter().all(|m| m["status"] != "streaming") {
                    return messages;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(HANG_GUARD, settled)
            .await
            .expect("the answer was never stored")
    }

    /// What `/metrics` says now.
    pub async fn metrics_text(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    /// The chat's messages, following `next_cursor` through every page.
    pub async fn all_messages(&self, user: &str, chat_id: &str) -> Vec<Value> {
        let mut messages = Vec::new();
        let mut path = format!("/api/v1/chats/{chat_id}/messages");
        loop {
            let (status, body) = self.get_json(user, &path).await;
            assert_eq!(status, 200, "{body}");
            messages.extend(body["messages"].as_array().unwrap().iter().cloned());
            match body["next_cursor"].as_str() {
                Some(cursor) => {
                    path = format!("/api/v1/chats/{chat_id}/messages?cursor={cursor}");
                }
                None => return messages,
            }
        }
    }

    /// Stops the server the way SIGTERM does and waits until it has finished.
    pub async fn stop(self) -> (FakeUpstream, tempfile::TempDir, PathBuf) {
        self.shutdown.cancel();
        tokio::time::timeout(HANG_GUARD, self.server)
            .await
            .expect("the server did not stop")
            .unwrap()
            .unwrap();
        (self.fake, self._dir, self.db_path)
    }

    /// Starts a new server on the same database and fake, as after a restart.
    pub async fn restart(self) -> TestApp {
        let (fake, dir, db_path) = self.stop().await;
        let config = test_config(&fake, &db_path);
        start(config, fake, dir, db_path).await
    }
}

/// One parsed SSE event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub retry: Option<String>,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }

    pub fn id_num(&self) -> i64 {
        self.id.as_deref().unwrap().parse().unwrap()
    }
}

/// Reads SSE events off a response body as the bytes arrive.
pub struct SseReader {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next event, or `None` when the stream ended.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(HANG_GUARD, self.next_event_unguarded())
            .await
            .expect("no SSE event arrived")
    }

    async fn next_event_unguarded(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_block(&String::from_utf8(block).unwrap()) {
                    return Some(event);
                }
                continue;
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) | Err(_) => {
                    assert!(
                        self.buffer.iter().all(|b| b.is_ascii_whitespace()),
                        "stream ended inside an event: {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    );
                    return None;
                }
            }
        }
    }

    pub async fn collect(mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next_event().await {
            events.push(event);
        }
        events
    }
}

/// Parses one event block; comment-only blocks (heartbeats) yield nothing.
fn parse_block(block: &str) -> Option<SseEvent> {
    let mut id = None;
    let mut retry = None;
    let mut event = String::from("message");
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "retry" => retry = Some(value.to_owned()),
            "event" => event = value.to_owned(),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() && id.is_none() {
        return None;
    }
    Some(SseEvent {
        id,
        retry,
        event,
        data: data.join("\n"),
    })
}

/// The text of all `message` events, in order.
pub fn answer_text(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.event == "message")
        .map(|e| e.json()["content"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts the contract's shape of a finished stream: `start` first, exactly one terminal event
/// last, and ids strictly increasing by one.
pub fn assert_well_formed(events: &[SseEvent]) {
    assert!(!events.is_empty(), "no events");
    assert_eq!(events[0].event, "start", "{events:?}");
    let terminals = events
        .iter()
        .filter(|e| e.event == "done" || e.event == "error")
        .count();
    assert_eq!(terminals, 1, "exactly one terminal event: {events:?}");
    let last = events.last().unwrap();
    assert!(last.event == "done" || last.event == "error", "{events:?}");
    for pair in events.windows(2) {
        assert_eq!(pair[1].id_num(), pair[0].id_num() + 1, "{events:?}");
    }
    for event in events {
        assert_eq!(
            event.json()["type"],
            match event.event.as_str() {
                "message" => "content",
                other => other,
            }
        );
    }
}

/// reqwest's builder once ring is the process's TLS provider (reqwest is built without one).
pub fn client_builder() -> reqwest::ClientBuilder {
    mangoo::crypto::install_default_providers();
    reqwest::Client::builder()
}

/// Runs a client the tests drive from outside (node, the Python SDK, schemathesis) to its end
/// and returns what it printed. It must run (`installed` says how it gets here) and succeed; a
/// failing run fails the test with `failure` and the whole output.
pub async fn run_client(
    command: &mut tokio::process::Command,
    installed: &str,
    failure: &str,
) -> String {
    let output = command
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("the client does not run ({installed}): {e}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{failure}:\n{report}");
    report
}
