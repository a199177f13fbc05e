//! Two instances in one test process sharing a real PostgreSQL database and a real Redis (a
//! fresh database and key prefix per test): what one instance started, the other continues,
//! resumes, stops and counts. The same scenarios against real `mangoo serve` processes behind
//! a load balancer live in `cluster.rs`.

use mangoo::config::{Config, DisconnectPolicy};
use serde_json::{Value, json};

use super::fake_upstream::{Outcome, Script};
use super::helpers::{BOT, HANG_GUARD, SseEvent, SseReader, TestApp, answer_text, spawn_app_with};
use super::services::{Partition, TestDatabase, TestKeys};

/// Two instances on one database and one Redis prefix.
pub struct Pair {
    pub a: TestApp,
    pub b: TestApp,
    _db: TestDatabase,
    pub keys: TestKeys,
}

pub async fn pair(adjust: impl Fn(&mut Config) + Clone) -> Pair {
    pair_on(TestKeys::new(), adjust).await
}

/// Two instances sharing `keys` (a prefix on the machine's Redis, or on one of the test's own).
pub async fn pair_on(keys: TestKeys, adjust: impl Fn(&mut Config) + Clone) -> Pair {
    let db = TestDatabase::create().await;
    let shared = |config: &mut Config| {
        config.database.url = db.url.clone();
        config.redis.url = Some(keys.url.clone());
        config.redis.key_prefix = keys.prefix.clone();
        config.streams.on_disconnect = DisconnectPolicy::Continue;
        adjust(config);
    };
    let a = spawn_app_with(shared).await;
    let b = spawn_app_with(shared).await;
    Pair {
        a,
        b,
        _db: db,
        keys,
    }
}

/// An answer asked on A, three tokens gated upstream: its first token read by the asker, and a
/// follower on B resumed after it (its response as it came, for the caller to check and read).
pub struct FollowedAnswer {
    pub asker: SseReader,
    pub follower: reqwest::Response,
    pub chat_id: String,
    pub first: SseEvent,
}

impl Pair {
    pub async fn answer_followed_on_b(&self) -> FollowedAnswer {
        self.a
            .fake
            .push(Script::tokens(&["one", " two", " three"]).gated());
        let (mut asker, chat_id) = self.a.open_stream("alice", "go").await;
        self.a.fake.release(1);
        let first = asker.next_event().await.unwrap();
        let follower = resume(&self.b, "alice", &chat_id, Some(first.id_num())).await;
        FollowedAnswer {
            asker,
            follower,
            chat_id,
            first,
        }
    }
}

pub async fn resume(
    app: &TestApp,
    user: &str,
    chat_id: &str,
    after: Option<i64>,
) -> reqwest::Response {
    let mut request = app
        .client
        .get(app.url(&format!("/api/v1/chats/{chat_id}/stream")))
        .bearer_auth(app.token(user));
    if let Some(after) = after {
        request = request.header("last-event-id", after.to_string());
    }
    request.send().await.unwrap()
}

pub fn ids(events: &[SseEvent]) -> Vec<i64> {
    events.iter().map(SseEvent::id_num).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_started_on_one_instance_continues_on_the_other_with_rising_ids() {
    let pair = pair(|_| {}).await;
    let first = pair
        .a
        .chat("alice", json!({"bot_id": BOT, "message": "hello"}))
        .await;
    let chat_id = first[0].json()["chat_id"].as_str().unwrap().to_owned();
    pair.b.fake.push(Script::tokens(&["second", " answer"]));
    let second = pair
        .b
        .chat(
            "alice",
            json!({"bot_id": BOT, "message": "again", "chat_id": chat_id}),
        )
        .await;
    assert_eq!(answer_text(&second), "second answer");
    let history = &pair.b.fake.requests()[0].body;
    assert!(
        history.to_string().contains("hello"),
        "B sent A's turn as history: {history}"
    );
    let all: Vec<i64> = ids(&first).into_iter().chain(ids(&second)).collect();
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    pair.a.fake.push(Script::tokens(&["third"]));
    let third = pair
        .a
        .chat(
            "alice",
            json!({"bot_id": BOT, "message": "more", "chat_id": chat_id}),
        )
        .await;
    assert!(third[0].id_num() > *all.last().unwrap());
}

/// Followers on B of an answer A generates, each joining after a different event: every one
/// gets every later event once, in order, then one terminal event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_on_the_other_instance_mid_answer_gets_every_event_once_from_any_cut() {
    followers_get_every_event_once_from_any_cut(pair(|_| {}).await).await;
}

pub async fn followers_get_every_event_once_from_any_cut(pair: Pair) {
    let tokens: Vec<String> = (0..40).map(|i| format!("t{i} ")).collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    pair.a.fake.push(Script::tokens(&refs).gated());
    let (mut reader, chat_id) = pair.a.open_stream("alice", "count").await;
    let mut seen = Vec::new();
    let mut followers = Vec::new();
    for cut in 0..40 {
        pair.a.fake.release(1);
        let event = reader.next_event().await.unwrap();
        seen.push(event.clone());
        // A follower on B joins after every other event the asker saw.
        if cut % 2 == 0 {
            let response = resume(&pair.b, "alice", &chat_id, Some(event.id_num())).await;
            assert_eq!(response.status(), 200);
            followers.push((event.id_num(), SseReader::new(response)));
        }
    }
    let rest = reader.collect().await;
    seen.extend(rest);
    let seen_ids = ids(&seen);
    assert_eq!(seen.last().unwrap().event, "done");
    for (after, follower) in followers {
        let got = follower.collect().await;
        let expected: Vec<i64> = seen_ids.iter().copied().filter(|id| *id > after).collect();
        assert_eq!(ids(&got), expected, "follower after {after}");
        assert_eq!(got.iter().filter(|e| e.event == "done").count(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_answer_resumes_from_storage_on_the_other_instance() {
    let pair = pair(|_| {}).await;
    let events = pair
        .a
        .chat("alice", json!({"bot_id": BOT, "message": "hello"}))
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();
    let after = events[1].id_num();
    let resumed = SseReader::new(resume(&pair.b, "alice", &chat_id, Some(after)).await)
        .collect()
        .await;
    assert_eq!(ids(&resumed), ids(&events[2..]));
    assert_eq!(resumed.last().unwrap().event, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_on_the_other_instance_ends_the_answer_and_cancels_the_upstream_call() {
    a_stop_anywhere_ends_the_answer(pair(|_| {}).await).await;
}

pub async fn a_stop_anywhere_ends_the_answer(pair: Pair) {
    pair.a
        .fake
        .push(Script::tokens(&["one", " two", " three"]).gated());
    let (mut reader, chat_id) = pair.a.open_stream("alice", "go").await;
    pair.a.fake.release(1);
    assert_eq!(reader.next_event().await.unwrap().json()["content"], "one");

    let stop = |app: &TestApp, user: &str| {
        app.client
            .post(app.url(&format!("/api/v1/chats/{chat_id}/stop")))
            .bearer_auth(app.token(user))
            .send()
    };
    let mallory = stop(&pair.b, "mallory").await.unwrap();
    assert_eq!(mallory.status(), 404, "another user's stop is refused");
    let stopped = stop(&pair.b, "alice").await.unwrap();
    assert_eq!(stopped.status(), 200);
    let body: Value = stopped.json().await.unwrap();
    assert_eq!(body["stopped"], true);

    let end = reader.next_event().await.unwrap();
    assert_eq!(end.event, "done");
    assert_eq!(end.json()["stopped"], true);
    assert!(reader.next_event().await.is_none());
    assert_eq!(pair.a.fake.outcome(0).await, Outcome::Cancelled);
    let messages = pair.b.settled_messages("alice", &chat_id).await;
    assert_eq!(messages[1]["status"], "stopped");
    assert_eq!(messages[1]["content"], "one");

    let again: Value = stop(&pair.b, "alice").await.unwrap().json().await.unwrap();
    assert_eq!(again["stopped"], false, "nothing runs any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_from_one_instance_works_once_on_the_other() {
    a_ticket_works_once_anywhere(pair(|_| {}).await).await;
}

pub async fn a_ticket_works_once_anywhere(pair: Pair) {
    let issued: Value = pair
        .a
        .client
        .post(pair.a.url("/api/v1/stream-tickets"))
        .bearer_auth(pair.a.token("alice"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ticket = issued["ticket"].as_str().unwrap();
    let url = |app: &TestApp| {
        app.url(&format!(
            "/api/v1/chat/stream?bot_id={BOT}&message=hi&ticket={ticket}"
        ))
    };
    let first = pair.b.client.get(url(&pair.b)).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let events = SseReader::new(first).collect().await;
    assert_eq!(events.last().unwrap().event, "done");
    let second = pair.a.client.get(url(&pair.a)).send().await.unwrap();
    assert_eq!(second.status(), 401, "used once, on any instance");
    assert!(
        pair.keys.keys().iter().all(|k| !k.contains(":ticket:")),
        "a redeemed ticket leaves no key: {:?}",
        pair.keys.keys()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_and_the_stream_cap_count_both_instances() {
    limits_count_both_instances(pair(tight_limits).await).await;
}

pub fn tight_limits(c: &mut Config) {
    c.rate_limit.requests_per_second = 0.01;
    c.rate_limit.burst = 4;
    c.rate_limit.max_concurrent_streams = 1;
}

/// Run on a pair made with [`tight_limits`].
pub async fn limits_count_both_instances(pair: Pair) {
    // The cap: one stream for Alice, wherever it runs.
    pair.a.fake.push(Script::tokens(&["held"]).gated());
    let (_held, _) = pair.a.open_stream("alice", "hold").await;
    let refused = pair
        .b
        .post_stream("alice", json!({"bot_id": BOT, "message": "second"}))
        .await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "too_many_streams");

    // The rate: four requests in all (two used above), then 429 on either instance.
    let (status, _) = pair.a.get_json("alice", "/api/v1/chats").await;
    assert_eq!(status, 200);
    let (status, _) = pair.b.get_json("alice", "/api/v1/chats").await;
    assert_eq!(status, 200);
    let limited = pair.client_get(&pair.a, "alice", "/api/v1/chats").await;
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(
        pair.client_get(&pair.b, "alice", "/api/v1/chats")
            .await
            .status(),
        429
    );
    assert_eq!(
        pair.client_get(&pair.b, "bob", "/api/v1/chats")
            .await
            .status(),
        200,
        "per user"
    );
}

impl Pair {
    async fn client_get(&self, app: &TestApp, user: &str, path: &str) -> reqwest::Response {
        app.client
            .get(app.url(path))
            .bearer_auth(app.token(user))
            .send()
            .await
            .unwrap()
    }
}

/// Redis unreachable at start: the server runs, is alive but not ready (naming Redis), and
/// refuses new streams with the contract's retryable 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_redis_when_it_is_unreachable() {
    let app = spawn_app_with(|c| {
        c.redis.url = Some("redis://127.0.0.1:1/0".into());
    })
    .await;
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("redis"), "{body}");
    let healthz = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    let refused = app
        .post_stream("alice", json!({"bot_id": BOT, "message": "hi"}))
        .await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "service_unavailable");
}

/// PostgreSQL unreachable at start: the server runs and is alive, not ready (naming the
/// database), refuses new streams with a retryable 503 — and serves once the database is back,
/// migrating then. (A database lost mid-answer: `dependency_faults.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_away_at_start_is_a_503_and_the_server_recovers_by_itself() {
    let db = TestDatabase::create().await;
    let path = Partition::to("127.0.0.1:5432", false).await;
    let url = path.database_url(&db.url);
    let app = spawn_app_with(|c| {
        c.database.url = url.clone();
        c.database.acquire_timeout_secs = 1;
    })
    .await;
    let readyz = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 503);
    let body: Value = readyz.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("database"),
        "{body}"
    );
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let refused = app
        .post_stream("alice", json!({"bot_id": BOT, "message": "hi"}))
        .await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "service_unavailable");

    path.restore();
    wait_until_ready(&app).await;
    app.fake.push(Script::tokens(&["back"]));
    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "again"}))
        .await;
    assert_eq!(answer_text(&events), "back");
}

pub async fn wait_until_ready(app: &TestApp) {
    let ready = async {
        loop {
            let readyz = app.client.get(app.url("/readyz")).send().await.unwrap();
            if readyz.status() == 200 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, ready)
        .await
        .expect("never ready again");
}

/// A producer whose lease is gone (as after a pause longer than the lease, on a machine that did
/// not die) writes nothing more: not to the log, not to storage. The answer is concluded once
/// with exactly what was logged, and both its listeners — the asker on the producing instance and
/// a follower on the other — get the same one terminal event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_lost_its_lease_is_fenced_and_the_answer_concluded_once() {
    let pair = pair(|_| {}).await;
    let FollowedAnswer {
        asker,
        follower,
        chat_id,
        first,
    } = pair.answer_followed_on_b().await;
    assert_eq!(first.json()["content"], "one");
    let follower = SseReader::new(follower);

    // What a producer paused past its lease meets: another instance took the answer over (a
    // higher fence in the hash and the lease), then went away itself (the lease expires soon).
    let taken_over: i64 = redis::Script::new(
        "local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
         redis.call('SET', KEYS[2], fence, 'PX', 1000)
         return fence",
    )
    .key(format!("{}:chat:{{{chat_id}}}:answer", pair.keys.prefix))
    .key(format!("{}:chat:{{{chat_id}}}:lease", pair.keys.prefix))
    .invoke(&mut pair.keys.connection())
    .unwrap();
    assert!(taken_over > 1, "the answer had a fence to bump");
    // Its next write (or renewal) is refused; the last piece stays unsent upstream.
    pair.a.fake.release(1);

    let asker_end = asker.collect().await;
    let follower_end = follower.collect().await;
    for events in [&asker_end, &follower_end] {
        assert_eq!(
            events.len(),
            1,
            "nothing after the lease was lost: {events:?}"
        );
        assert_eq!(events[0].event, "error");
        assert_eq!(events[0].json()["code"], "answer_interrupted");
    }
    assert_eq!(asker_end[0].id_num(), follower_end[0].id_num());
    let messages = pair.b.settled_messages("alice", &chat_id).await;
    assert_eq!(messages[1]["content"], "one");
    assert_eq!(messages[1]["status"], "interrupted");
    assert_eq!(pair.a.fake.outcome(0).await, Outcome::Cancelled);
}

/// A lease that lapsed while nobody took the answer over (Redis was away longer than a lease)
/// is the producer's still: it takes it up again and the answer goes on, whole, everywhere.
#[tokio::test]
async fn a_lease_that_lapsed_with_nobody_taking_over_is_taken_up_again() {
    let pair = pair(|_| {}).await;
    let FollowedAnswer {
        asker,
        follower,
        chat_id,
        ..
    } = pair.answer_followed_on_b().await;
    let follower = SseReader::new(follower);

    let lease = format!("{}:chat:{{{chat_id}}}:lease", pair.keys.prefix);
    let deleted: i64 = redis::cmd("DEL")
        .arg(&lease)
        .query(&mut pair.keys.connection())
        .unwrap();
    assert_eq!(deleted, 1, "the answer's lease is there to lapse");
    pair.a.fake.release(2);

    let asker_rest = asker.collect().await;
    let follower_rest = follower.collect().await;
    let seen = |events: &[SseEvent]| -> Vec<(i64, String, String)> {
        events
            .iter()
            .map(|e| (e.id_num(), e.event.clone(), e.data.clone()))
            .collect()
    };
    assert_eq!(seen(&asker_rest), seen(&follower_rest));
    let names: Vec<&str> = asker_rest.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["message", "message", "done"], "{asker_rest:?}");
    let messages = pair.b.settled_messages("alice", &chat_id).await;
    assert_eq!(messages[1]["content"], "one two three");
    assert_eq!(messages[1]["status"], "complete");
    let owner: Option<String> = redis::cmd("GET")
        .arg(&lease)
        .query(&mut pair.keys.connection())
        .unwrap();
    assert_eq!(owner, None, "the answer closed and its lease went with it");
}
