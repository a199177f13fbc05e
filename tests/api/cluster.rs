//! Three real `mangoo serve` processes, started together on a fresh PostgreSQL database and one
//! Redis key prefix, behind a real HAProxy (Debian's package; `scripts/test.sh` installs it)
//! configured by the shipped `deploy/haproxy.cfg`: round-robin, no stickiness. Clients speak to
//! the load balancer only, except where a test must aim at one instance (to kill it).

use std::process::Stdio;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use super::binary::serve_with_config;
use super::fake_upstream::{FakeUpstream, Script};
use super::helpers::{
    BOT, HANG_GUARD, SECRET, SseEvent, SseReader, bedrock_bot_toml, client_builder, token_for,
};
use super::services::{OwnRedis, TestDatabase, TestKeys, free_port};

pub struct Cluster {
    /// The load balancer's base URL.
    pub lb: String,
    pub instances: Vec<(Option<Child>, String)>,
    pub fake: FakeUpstream,
    pub client: reqwest::Client,
    _haproxy: Child,
    _db: TestDatabase,
    _keys: TestKeys,
    _dir: tempfile::TempDir,
}

/// What a test changes in the instances' configuration.
pub struct Options {
    pub requests_per_second: f64,
    pub burst: u32,
    pub max_concurrent_streams: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            requests_per_second: 1000.0,
            burst: 1000,
            max_concurrent_streams: 200,
        }
    }
}

fn instance_config(
    fake: &FakeUpstream,
    db: &TestDatabase,
    keys: &TestKeys,
    options: &Options,
) -> String {
    format!(
        r#"
[server]
bind = "127.0.0.1:0"
trusted_proxies = ["127.0.0.1/32"]
drain_secs = 2

[auth]
jwt_secret = "{SECRET}"

[database]
url = "{db}"
max_connections = 4

[redis]
url = "{redis}"
key_prefix = "{prefix}"

[streams]
on_disconnect = "continue"

[rate_limit]
requests_per_second = {rps:?}
burst = {burst}
max_concurrent_streams = {streams}

{bot}
"#,
        db = db.url,
        redis = keys.url,
        prefix = keys.prefix,
        bot = bedrock_bot_toml(fake),
        rps = options.requests_per_second,
        burst = options.burst,
        streams = options.max_concurrent_streams,
    )
}

/// Starts the instances at the same moment (on a fresh database: their migrations race) and
/// HAProxy in front of them; returns once the load balancer serves.
pub async fn cluster() -> Cluster {
    cluster_with(TestKeys::new(), Options::default()).await
}

/// A cluster on the Redis (and key prefix) of `keys`, configured with `options`.
pub async fn cluster_with(keys: TestKeys, options: Options) -> Cluster {
    let fake = FakeUpstream::start().await;
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mangoo.toml");
    std::fs::write(&config, instance_config(&fake, &db, &keys, &options)).unwrap();
    let instances = join_all((0..3).map(|_| serve_with_config(&config))).await;
    let lb_port = free_port();
    let address = |base: &str| base.trim_start_matches("http://").to_owned();
    let haproxy = Command::new("haproxy")
        .arg("-f")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg"))
        .arg("-db")
        .env("MANGOO_LB_BIND", format!("127.0.0.1:{lb_port}"))
        .env("MANGOO_INSTANCE_1", address(&instances[0].1))
        .env("MANGOO_INSTANCE_2", address(&instances[1].1))
        .env("MANGOO_INSTANCE_3", address(&instances[2].1))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy is installed (scripts/test.sh installs Debian's package)");
    let cluster = Cluster {
        lb: format!("http://127.0.0.1:{lb_port}"),
        instances: instances
            .into_iter()
            .map(|(child, base)| (Some(child), base))
            .collect(),
        fake,
        client: client_builder().no_proxy().build().unwrap(),
        _haproxy: haproxy,
        _db: db,
        _keys: keys,
        _dir: dir,
    };
    cluster.wait_until_ready().await;
    cluster
}

impl Cluster {
    /// Until the load balancer answers `/readyz` with 200 on a round of every instance.
    async fn wait_until_ready(&self) {
        let ready = async {
            let mut in_a_row = 0;
            while in_a_row < 3 {
                let answered = self.client.get(format!("{}/readyz", self.lb)).send().await;
                in_a_row = match answered {
                    Ok(response) if response.status() == 200 => in_a_row + 1,
                    _ => 0,
                };
                if in_a_row == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        tokio::time::timeout(HANG_GUARD, ready)
            .await
            .expect("the cluster never became ready");
    }

    pub fn token(&self, user: &str) -> String {
        token_for(user)
    }

    pub async fn post_stream(&self, base: &str, user: &str, body: Value) -> reqwest::Response {
        self.client
            .post(format!("{base}/api/v1/chat/stream"))
            .bearer_auth(self.token(user))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn resume(&self, user: &str, chat_id: &str, after: i64) -> reqwest::Response {
        self.client
            .get(format!("{}/api/v1/chats/{chat_id}/stream", self.lb))
            .bearer_auth(self.token(user))
            .header("last-event-id", after.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn messages(&self, user: &str, chat_id: &str) -> Vec<Value> {
        let body: Value = self
            .client
            .get(format!("{}/api/v1/chats/{chat_id}/messages", self.lb))
            .bearer_auth(self.token(user))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["messages"].as_array().unwrap().clone()
    }
}

/// The statuses of requests sent at once.
async fn statuses_of(
    requests: impl Iterator<
        Item = impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    >,
) -> Vec<u16> {
    join_all(requests)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

fn ids(events: &[SseEvent]) -> Vec<i64> {
    events.iter().map(SseEvent::id_num).collect()
}

/// Turns, resumption from every cut point, stop and tickets, all through the load balancer: the
/// requests of one client land on different instances and nothing shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_behind_haproxy_behave_as_one_server() {
    let cluster = cluster().await;
    let lb = cluster.lb.clone();

    // Turns of one chat, each on whichever instance the balancer picks.
    let mut all_ids = Vec::new();
    let mut chat_id: Option<String> = None;
    for turn in 0..4 {
        cluster
            .fake
            .push(Script::tokens(&["answer", &format!(" {turn}")]));
        let mut body = json!({"bot_id": BOT, "message": format!("question {turn}")});
        if let Some(id) = &chat_id {
            body["chat_id"] = json!(id);
        }
        let response = cluster.post_stream(&lb, "alice", body).await;
        assert_eq!(response.status(), 200);
        let events = SseReader::new(response).collect().await;
        assert_eq!(events.last().unwrap().event, "done");
        chat_id.get_or_insert_with(|| events[0].json()["chat_id"].as_str().unwrap().to_owned());
        all_ids.extend(ids(&events));
    }
    assert!(all_ids.windows(2).all(|w| w[0] < w[1]), "{all_ids:?}");
    let chat_id = chat_id.unwrap();

    // HAProxy replaced the client's request id with its own unique-id, which Mangoo adopted.
    let listed = cluster
        .client
        .get(format!("{lb}/api/v1/chats"))
        .bearer_auth(cluster.token("alice"))
        .header("x-request-id", "client-chosen")
        .send()
        .await
        .unwrap();
    let request_id = listed.headers()["x-request-id"].to_str().unwrap();
    assert_ne!(request_id, "client-chosen");
    assert!(
        request_id.contains(':') && request_id.contains('_'),
        "HAProxy's unique-id format: {request_id}"
    );
    let metrics = cluster
        .client
        .get(format!("{lb}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 404, "HAProxy does not forward /metrics");
    let history = cluster.fake.requests()[3].body.to_string();
    assert!(
        history.contains("question 0") && history.contains("answer 2"),
        "{history}"
    );
    assert_eq!(cluster.messages("alice", &chat_id).await.len(), 8);

    // One answer of 100 pieces, joined by a follower after every one of its events.
    let tokens: Vec<String> = (0..100).map(|i| format!("w{i} ")).collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    cluster.fake.push(Script::tokens(&refs).gated());
    let body = json!({"bot_id": BOT, "message": "count", "chat_id": chat_id});
    let mut asker = SseReader::new(cluster.post_stream(&lb, "alice", body).await);
    let mut seen = vec![asker.next_event().await.unwrap()];
    let mut followers = Vec::new();
    for _ in 0..100 {
        let after = seen.last().unwrap().id_num();
        let response = cluster.resume("alice", &chat_id, after).await;
        assert_eq!(response.status(), 200);
        followers.push((after, SseReader::new(response)));
        cluster.fake.release(1);
        seen.push(asker.next_event().await.unwrap());
    }
    seen.extend(asker.collect().await);
    assert_eq!(seen.last().unwrap().event, "done");
    let seen_ids = ids(&seen);
    for (after, follower) in followers {
        let got = follower.collect().await;
        let expected: Vec<i64> = seen_ids.iter().copied().filter(|id| *id > after).collect();
        assert_eq!(
            ids(&got),
            expected,
            "follower after {after}: no gap, no repeat"
        );
        assert_eq!(got.iter().filter(|e| e.event == "done").count(), 1);
    }

    // Stop through the balancer ends the answer wherever it runs.
    cluster
        .fake
        .push(Script::tokens(&["never", " ends"]).gated());
    let body = json!({"bot_id": BOT, "message": "stop me", "chat_id": chat_id});
    let mut running = SseReader::new(cluster.post_stream(&lb, "alice", body).await);
    running.next_event().await.unwrap();
    for user in ["mallory", "alice"] {
        let stopped = cluster
            .client
            .post(format!("{lb}/api/v1/chats/{chat_id}/stop"))
            .bearer_auth(cluster.token(user))
            .send()
            .await
            .unwrap();
        match user {
            "mallory" => assert_eq!(stopped.status(), 404),
            _ => {
                let body: Value = stopped.json().await.unwrap();
                assert_eq!(body["stopped"], true);
            }
        }
    }
    let end = running.next_event().await.unwrap();
    assert_eq!(
        (end.event.as_str(), end.json()["stopped"].clone()),
        ("done", json!(true))
    );

    // A ticket is good once, whichever instances issue and redeem it.
    let ticket: Value = cluster
        .client
        .post(format!("{lb}/api/v1/stream-tickets"))
        .bearer_auth(cluster.token("alice"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = format!(
        "{lb}/api/v1/chat/stream?bot_id={BOT}&message=hi&ticket={}",
        ticket["ticket"].as_str().unwrap()
    );
    let statuses = statuses_of((0..3).map(|_| cluster.client.get(&url).send())).await;
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 401)),
        (1, 2),
        "{statuses:?}"
    );
}

/// `kill -9` of the instance generating an answer: the client resumes through the balancer on
/// another instance, gets the rest of what was logged and then one retryable terminal event;
/// the stored answer is exactly the text it was sent; the chat takes a new turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_generating_instance_loses_nothing_a_client_was_sent() {
    let mut cluster = cluster().await;
    let victim = cluster.instances[0].1.clone();
    cluster
        .fake
        .push(Script::tokens(&["one", " two", " three", " four", " five"]).gated());
    let response = cluster
        .post_stream(&victim, "alice", json!({"bot_id": BOT, "message": "long"}))
        .await;
    let mut reader = SseReader::new(response);
    let start = reader.next_event().await.unwrap();
    let chat_id = start.json()["chat_id"].as_str().unwrap().to_owned();
    cluster.fake.release(3);
    let mut sent = Vec::new();
    for _ in 0..3 {
        sent.push(reader.next_event().await.unwrap());
    }
    // The client saw two of the three pieces when the instance died.
    let last_seen = sent[1].id_num();
    let mut victim_process = cluster.instances[0].0.take().unwrap();
    victim_process.start_kill().unwrap();
    victim_process.wait().await.unwrap();
    drop(reader);

    let resumed = SseReader::new(cluster.resume("alice", &chat_id, last_seen).await)
        .collect()
        .await;
    assert_eq!(resumed.len(), 2, "{resumed:?}");
    assert_eq!(resumed[0].id_num(), sent[2].id_num());
    assert_eq!(resumed[0].json()["content"], " three");
    assert_eq!(resumed[1].event, "error");
    assert_eq!(resumed[1].json()["code"], "answer_interrupted");
    assert_eq!(resumed[1].json()["retryable"], true);
    assert!(resumed[1].id_num() > resumed[0].id_num());

    let messages = cluster.messages("alice", &chat_id).await;
    assert_eq!(
        messages[1]["content"], "one two three",
        "exactly what was logged and sent"
    );
    assert_eq!(messages[1]["status"], "interrupted");

    cluster.fake.push(Script::tokens(&["fine"]));
    let body = json!({"bot_id": BOT, "message": "again", "chat_id": chat_id});
    let next = SseReader::new(cluster.post_stream(&cluster.lb, "alice", body).await)
        .collect()
        .await;
    assert_eq!(
        next.last().unwrap().event,
        "done",
        "the chat takes a new turn"
    );
    assert!(next[0].id_num() > resumed[1].id_num());
}

/// The rate limit and the stream cap count a user's requests on every instance together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_the_cluster() {
    let options = Options {
        requests_per_second: 0.01,
        burst: 6,
        max_concurrent_streams: 1,
    };
    let cluster = cluster_with(TestKeys::new(), options).await;
    let lb = cluster.lb.clone();
    cluster.fake.push(Script::tokens(&["held"]).gated());
    let mut held = SseReader::new(
        cluster
            .post_stream(&lb, "alice", json!({"bot_id": BOT, "message": "hold"}))
            .await,
    );
    held.next_event().await.unwrap();
    // The next requests land on the other instances, round-robin.
    for _ in 0..2 {
        let refused = cluster
            .post_stream(&lb, "alice", json!({"bot_id": BOT, "message": "more"}))
            .await;
        assert_eq!(refused.status(), 429);
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "too_many_streams");
    }
    let list = || {
        cluster
            .client
            .get(format!("{lb}/api/v1/chats"))
            .bearer_auth(cluster.token("alice"))
            .send()
    };
    let statuses = statuses_of((0..6).map(|_| list())).await;
    // Three of the burst of six went to the streams above; three more pass, wherever they land.
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (3, 3),
        "{statuses:?}"
    );
}

/// Redis killed while a stream runs through the balancer, then started again: the stream ends
/// with exactly one terminal event, each instance reports Redis unreachable, and the cluster
/// serves again by itself once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_ends_it_once_and_the_cluster_recovers() {
    let mut redis = OwnRedis::start();
    let cluster = cluster_with(TestKeys::on(redis.url()), Options::default()).await;
    let lb = cluster.lb.clone();
    cluster.fake.push(Script::tokens(&["one", " two"]).gated());
    let mut reader = SseReader::new(
        cluster
            .post_stream(&lb, "alice", json!({"bot_id": BOT, "message": "go"}))
            .await,
    );
    reader.next_event().await.unwrap();
    cluster.fake.release(1);
    reader.next_event().await.unwrap();
    redis.kill();
    cluster.fake.release(1);
    let rest = reader.collect().await;
    let terminal: Vec<_> = rest
        .iter()
        .filter(|e| e.event == "done" || e.event == "error")
        .collect();
    assert_eq!(terminal.len(), 1, "{rest:?}");
    for (_, base) in &cluster.instances {
        let readyz = cluster
            .client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(readyz.status(), 503);
        let body: Value = readyz.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("redis"), "{body}");
    }
    redis.resume();
    cluster.wait_until_ready().await;
    cluster.fake.push(Script::tokens(&["back"]));
    let events = SseReader::new(
        cluster
            .post_stream(&lb, "alice", json!({"bot_id": BOT, "message": "again"}))
            .await,
    )
    .collect()
    .await;
    assert_eq!(events.last().unwrap().event, "done");
}
