//! Shared state stays bounded and honest: Redis holds what live and recently ended answers
//! need, never a key per chat ever made; stale entries in the sweep's index cannot stand in
//! front of a dead instance's answer; odd `Last-Event-ID`s mean the same on both logs; an
//! evicting Redis is reported; no stream place is ever leaked. Against the machine's real
//! Redis (a key prefix per test) or a test's own `redis-server`.

use std::time::Duration;

use mangoo::config::{Config, RedisConfig};
use mangoo::shared::Redis;
use mangoo::shared::limits::StreamLeases;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::fake_upstream::Script;
use super::helpers::{BOT, HANG_GUARD, SseReader, TestApp, spawn_app, spawn_app_with};
use super::services::{OwnRedis, TestKeys};
use super::shared_state::{pair, resume};

/// Waits, re-checking every few milliseconds, until `check` holds (or fails after `bound`).
async fn until<F, Fut>(bound: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let holds = async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(bound, holds)
        .await
        .unwrap_or_else(|_| panic!("never: {what}"));
}

fn on(keys: &TestKeys) -> impl FnOnce(&mut Config) + '_ {
    |config: &mut Config| {
        config.redis.url = Some(keys.url.clone());
        config.redis.key_prefix = keys.prefix.clone();
    }
}

fn chat_keys(keys: &TestKeys) -> Vec<String> {
    let chat = format!("{}:chat:", keys.prefix);
    keys.keys()
        .into_iter()
        .filter(|k| k.starts_with(&chat))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_chats_leave_no_keys_and_ended_answers_expire_after_keep_ended_secs() {
    let keys = TestKeys::new();
    let app = spawn_app_with(on(&keys)).await;
    for turn in 0..30 {
        app.fake.push(Script::tokens(&["gone"]));
        let events = app
            .chat(
                "alice",
                json!({"bot_id": BOT, "message": format!("q{turn}")}),
            )
            .await;
        assert_eq!(events.last().unwrap().event, "done");
        let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();
        assert_eq!(app.delete_chat("alice", &chat_id).await.status(), 204);
    }
    // Well inside keep_ended_secs (60 s): gone because the chats were deleted, not expired.
    until(HANG_GUARD, "a deleted chat's keys are gone", || async {
        chat_keys(&keys).is_empty()
    })
    .await;

    // A chat that stays: its ended answer's keys live keep_ended_secs, not a day.
    app.fake.push(Script::tokens(&["kept"]));
    let events = app
        .chat("alice", json!({"bot_id": BOT, "message": "stay"}))
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();
    let mut conn = keys.connection();
    let answer = format!("{}:chat:{{{chat_id}}}:answer", keys.prefix);
    until(HANG_GUARD, "the answer is closed", || {
        let state: Option<String> = redis::cmd("HGET")
            .arg(&answer)
            .arg("state")
            .query(&mut conn)
            .unwrap();
        async move { state.as_deref() == Some("done") }
    })
    .await;
    for key in chat_keys(&keys) {
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
        assert!(
            ttl > 0 && ttl <= 60_000,
            "{key} lives {ttl} ms, not keep_ended_secs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entries_in_the_live_index_do_not_stall_the_recovery_of_a_dead_answer() {
    let pair = pair(|_| {}).await;
    let mut conn = pair.keys.connection();
    let live = format!("{}:live", pair.keys.prefix);
    // Entries older than anything real: chats that do not exist, and one whose answer ended.
    for n in 0..150 {
        let _: i64 = redis::cmd("ZADD")
            .arg(&live)
            .arg(n)
            .arg(format!("chat-stale-{n}"))
            .query(&mut conn)
            .unwrap();
    }
    pair.a.fake.push(Script::tokens(&["one", " two"]).gated());
    let (mut asker, chat_id) = pair.a.open_stream("alice", "go").await;
    pair.a.fake.release(1);
    asker.next_event().await.unwrap();
    drop(asker); // nobody follows: only the sweep can notice the answer is orphaned

    // Its producer is taken over by an instance that then dies: the fence moves on, the lease
    // is gone, and A — fenced — writes nothing more. The sweep on B must find the answer.
    let base = format!("{}:chat:{{{chat_id}}}", pair.keys.prefix);
    let _: () = redis::cmd("EVAL")
        .arg("redis.call('HINCRBY', KEYS[1], 'fence', 1) redis.call('DEL', KEYS[2])")
        .arg(2)
        .arg(format!("{base}:answer"))
        .arg(format!("{base}:lease"))
        .query(&mut conn)
        .unwrap();

    let concluded = async {
        loop {
            let messages = pair.b.all_messages("alice", &chat_id).await;
            if messages.iter().all(|m| m["status"] != "streaming") {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // A lease (10 s) plus a few sweeps (5 s apart); a stalled sweep never gets there.
    let messages = tokio::time::timeout(Duration::from_secs(40), concluded)
        .await
        .expect("the dead producer's answer was never concluded");
    assert_eq!(messages[1]["status"], "interrupted", "{messages:?}");
    assert_eq!(messages[1]["content"], "one");
    let left: i64 = redis::cmd("ZCARD").arg(&live).query(&mut conn).unwrap();
    assert_eq!(
        left, 0,
        "the sweep removed the entries with no answer behind them"
    );
}

/// `-5` names nothing sent: the answer is replayed from its start, the same on both logs.
async fn a_negative_last_event_id_resumes_from_the_start(app: &TestApp) {
    app.fake.push(Script::tokens(&["one", " two"]).gated());
    let (mut asker, chat_id) = app.open_stream("alice", "go").await;
    app.fake.release(1);
    let one = asker.next_event().await.unwrap(); // open_stream read the start already
    let response = resume_with(app, &chat_id, "-5").await;
    assert_eq!(response.status(), 200);
    app.fake.release(1);
    let events = SseReader::new(response).collect().await;
    assert_eq!(events[0].event, "start");
    assert_eq!(events[1].id_num(), one.id_num());
    assert!(events.iter().all(|e| e.id_num() > 0));
    assert_eq!(events.last().unwrap().event, "done", "{events:?}");
    let malformed = resume_with(app, &chat_id, "five").await;
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(body["code"], "invalid_request", "{body}");
}

async fn resume_with(app: &TestApp, chat_id: &str, id: &str) -> reqwest::Response {
    app.client
        .get(app.url(&format!("/api/v1/chats/{chat_id}/stream")))
        .bearer_auth(app.token("alice"))
        .header("last-event-id", id)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_last_event_id_resumes_from_the_start_on_both_logs() {
    a_negative_last_event_id_resumes_from_the_start(&spawn_app().await).await;
    let keys = TestKeys::new();
    a_negative_last_event_id_resumes_from_the_start(&spawn_app_with(on(&keys)).await).await;
    // And a finished answer, replayed from storage.
    let pair = pair(|_| {}).await;
    let events = pair
        .a
        .chat("alice", json!({"bot_id": BOT, "message": "hi"}))
        .await;
    let chat_id = events[0].json()["chat_id"].as_str().unwrap().to_owned();
    let replayed = SseReader::new(resume(&pair.b, "alice", &chat_id, Some(-5)).await)
        .collect()
        .await;
    assert_eq!(replayed.len(), events.len());
    assert_eq!(replayed[0].event, "start");
}

async fn metric_line(app: &TestApp, prefix: &str) -> Option<String> {
    let text = app.metrics_text().await;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_owned)
}

/// Until `/metrics` names `policy` as the shared Redis's eviction policy.
async fn until_policy_exported(app: &TestApp, policy: &str) {
    let expected = format!("mangoo_redis_maxmemory_policy{{policy=\"{policy}\"}} 1");
    until(HANG_GUARD, &format!("{policy} is exported"), || {
        let expected = &expected;
        async move {
            metric_line(app, "mangoo_redis_maxmemory_policy")
                .await
                .as_ref()
                == Some(expected)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_reported_and_its_memory_exported() {
    let evicting = OwnRedis::start_with(&["--maxmemory-policy", "volatile-lru"]);
    let keys = TestKeys::on(evicting.url());
    let app = spawn_app_with(on(&keys)).await;
    until_policy_exported(&app, "volatile-lru").await;
    let used = metric_line(&app, "mangoo_redis_used_memory_bytes").await;
    let bytes: i64 = used
        .as_deref()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("used memory exported");
    assert!(bytes > 0);

    // The machine's Redis keeps the default policy, noeviction: reported as such.
    let keys = TestKeys::new();
    let app = spawn_app_with(on(&keys)).await;
    until_policy_exported(&app, "noeviction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stream_place_is_leaked_however_many_are_released_at_once() {
    let keys = TestKeys::new();
    let config = RedisConfig {
        key_prefix: keys.prefix.clone(),
        ..RedisConfig::default()
    };
    let redis = Redis::new(&keys.url, false, &config).unwrap();
    let stop = CancellationToken::new();
    // More places than the old change queue held (4,096), released while the keeper is not
    // running yet: every release must still reach Redis.
    let (leases, keeper) = StreamLeases::new(redis, 10_000, stop.clone());
    let mut held = Vec::new();
    for _ in 0..5000 {
        held.push(leases.take("bob").await.unwrap().expect("under the cap"));
    }
    let places = format!("{}:streams:bob", keys.prefix);
    let mut conn = keys.connection();
    let count = |conn: &mut redis::Connection| -> i64 {
        redis::cmd("ZCARD").arg(&places).query(conn).unwrap()
    };
    assert_eq!(count(&mut conn), 5000);
    drop(held);
    let keeper = tokio::spawn(keeper);
    // Places expire by themselves after 30 s: gone sooner means they were given back.
    until(HANG_GUARD, "every place is given back", || {
        let n = count(&mut conn);
        async move { n == 0 }
    })
    .await;
    stop.cancel();
    keeper.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_requires_auth_is_reached_with_redis_password() {
    let guarded = OwnRedis::start_with(&["--requirepass", "s3cret-token"]);
    let with = |password: Option<&str>| {
        let url = guarded.url();
        let password = password.map(mangoo::config::Secret::new);
        move |config: &mut Config| {
            config.redis.url = Some(url);
            config.redis.key_prefix = "mangoo-auth-test".into();
            config.redis.password = password;
        }
    };
    let ready = |app: TestApp| async move {
        let response = app.client.get(app.url("/readyz")).send().await.unwrap();
        response.status().as_u16()
    };
    assert_eq!(
        ready(spawn_app_with(with(Some("s3cret-token"))).await).await,
        200
    );
    assert_eq!(ready(spawn_app_with(with(None)).await).await, 503);
}
