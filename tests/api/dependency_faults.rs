//! PostgreSQL and Redis failing under live answers, for real: connections ended by
//! `pg_terminate_backend` (idle and mid-statement), a database path cut for longer than one
//! call waits, a Redis killed and started again empty, flushed, losing the tail of a log, and
//! demoted to a replica while its name moves to the promoted one. Whatever happens, every
//! listener gets each event once, in order, with no hole, then exactly one terminal event, and
//! storage holds exactly what they were sent.

use mangoo::config::{Config, DisconnectPolicy};
use serde_json::{Value, json};

use super::fake_upstream::Script;
use super::helpers::{
    BOT, SseEvent, SseReader, TestApp, answer_text, assert_well_formed, spawn_app_with,
};
use super::services::{OwnRedis, Partition, TestDatabase, TestKeys};
use super::shared_state::{FollowedAnswer, Pair, ids, pair_on, resume, wait_until_ready};

const HANG_GUARD: std::time::Duration = super::helpers::HANG_GUARD;

/// Polls `check` until it gives something (each poll is a real query; the guard only stops a
/// test that would otherwise hang).
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let polling = async {
        loop {
            if let Some(found) = check().await {
                return found;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, polling)
        .await
        .unwrap_or_else(|_| panic!("never: {what}"))
}

async fn app_on_postgres(db: &TestDatabase, adjust: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with(|c| {
        c.database.url = db.url.clone();
        adjust(c);
    })
    .await
}

/// The whole answer as its listener got it, and as storage holds it.
async fn assert_stored_as_sent(app: &TestApp, chat_id: &str, events: &[SseEvent], status: &str) {
    let messages = app.settled_messages("alice", chat_id).await;
    let answer = messages.last().unwrap();
    assert_eq!(answer["content"], answer_text(events), "stored = sent");
    assert_eq!(answer["status"], status, "{answer}");
}

/// The statement that stores an answer's end is killed while it runs (it waits on a row lock
/// the test holds, so the kill lands mid-statement): it is run again on a fresh connection, the
/// stream ends `done` once, and storage holds the whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_killed_mid_flight_is_run_again_and_the_answer_ends_done() {
    let db = TestDatabase::create().await;
    let app = app_on_postgres(&db, |_| {}).await;
    app.fake.push(Script::tokens(&["one", " two"]).gated());
    let (mut reader, chat_id) = app.open_stream("alice", "go").await;
    app.fake.release(1);
    let mut events = vec![reader.next_event().await.unwrap()];

    let mut blocker = db.connect().await;
    sqlx::raw_sql("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("SELECT 1 FROM messages WHERE chat_id = $1 AND role = 'assistant' FOR UPDATE")
        .bind(&chat_id)
        .execute(&mut blocker)
        .await
        .unwrap();
    app.fake.release(1);
    let first = eventually("the answer's end waits on the lock", || async {
        db.mangoo_backends_waiting_on_a_lock()
            .await
            .first()
            .copied()
    })
    .await;
    assert!(db.terminate_mangoo_connections().await >= 1);
    let second = eventually("the end is tried again on a new connection", || async {
        let waiting = db.mangoo_backends_waiting_on_a_lock().await;
        waiting.into_iter().find(|pid| *pid != first)
    })
    .await;
    assert_ne!(first, second);
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await.unwrap();

    events.extend(reader.collect().await);
    assert_eq!(answer_text(&events), "one two");
    assert_eq!(events.last().unwrap().event, "done", "{events:?}");
    assert_stored_as_sent(&app, &chat_id, &events, "complete").await;
}

/// Every pooled connection ended while idle (an RDS Proxy or NAT idle timeout, a failover):
/// the next stream start and reads work as if nothing happened — no 500, no 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_start_after_every_pooled_connection_was_ended() {
    let db = TestDatabase::create().await;
    let app = app_on_postgres(&db, |_| {}).await;
    let first = app
        .chat("alice", json!({"bot_id": BOT, "message": "hello"}))
        .await;
    let chat_id = first[0].json()["chat_id"].as_str().unwrap().to_owned();
    for round in 0..3 {
        assert!(
            db.terminate_mangoo_connections().await >= 1,
            "round {round}"
        );
        let (status, body) = app.get_json("alice", "/api/v1/chats").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            db.terminate_mangoo_connections().await >= 1,
            "round {round}"
        );
        app.fake.push(Script::tokens(&["again"]));
        let response = app
            .post_stream(
                "alice",
                json!({"bot_id": BOT, "message": "more", "chat_id": chat_id}),
            )
            .await;
        assert_eq!(response.status(), 200, "round {round}");
        let events = SseReader::new(response).collect().await;
        assert_well_formed(&events);
        assert_eq!(events.last().unwrap().event, "done");
        assert_stored_as_sent(&app, &chat_id, &events, "complete").await;
    }
}

/// The database path cut as the answer ends, for longer than one call keeps trying: the
/// producer holds the answer (its listener hears heartbeats) and stores it once the database is
/// back; the listener then gets `done` — not an error, not a second terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_end_meets_a_database_outage_is_stored_when_it_is_back() {
    answer_end_survives(Partition::cut).await;
}

/// The same with the path black-holed instead (nothing answers, nothing is closed): the
/// statement that stores the end does not wait for the kernel's retransmission timeout; it gives
/// up after a few seconds, counts as the database away, and the producer offers it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_end_meets_a_black_holed_database_is_stored_when_it_is_back() {
    answer_end_survives(Partition::black_hole).await;
}

async fn answer_end_survives(fault: fn(&Partition)) {
    let db = TestDatabase::create().await;
    let path = Partition::to("127.0.0.1:5432", true).await;
    let url = path.database_url(&db.url);
    let app = spawn_app_with(|c| {
        c.database.url = url.clone();
        c.database.acquire_timeout_secs = 1;
    })
    .await;
    app.fake.push(Script::tokens(&["one", " two"]).gated());
    let (mut reader, chat_id) = app.open_stream("alice", "go").await;
    app.fake.release(1);
    let mut events = vec![reader.next_event().await.unwrap()];
    fault(&path);
    app.fake.release(1);
    events.push(reader.next_event().await.unwrap());
    eventually("the producer offers the answer again", || async {
        let metrics = app.metrics_text().await;
        let retries = metrics
            .lines()
            .find(|l| l.starts_with("mangoo_answer_store_retries_total "))?
            .rsplit(' ')
            .next()?
            .parse::<f64>()
            .ok()?;
        (retries >= 1.0).then_some(())
    })
    .await;
    path.restore();
    events.extend(reader.collect().await);
    assert_eq!(events.last().unwrap().event, "done", "{events:?}");
    assert_eq!(answer_text(&events), "one two");
    wait_until_ready(&app).await;
    assert_stored_as_sent(&app, &chat_id, &events, "complete").await;
}

/// Two instances on a Redis of the test's own, an answer generated on A with a listener on each.
async fn answer_on_a_with_a_follower_on_b(
    pair: &Pair,
    tokens: &[&str],
) -> (SseReader, SseReader, String, Vec<SseEvent>) {
    pair.a.fake.push(Script::tokens(tokens).gated());
    let (mut asker, chat_id) = pair.a.open_stream("alice", "count").await;
    pair.a.fake.release(1);
    let first = asker.next_event().await.unwrap();
    let follower = resume(&pair.b, "alice", &chat_id, Some(first.id_num())).await;
    assert_eq!(follower.status(), 200);
    (asker, SseReader::new(follower), chat_id, vec![first])
}

/// Both listeners got the whole answer: the asker every event, the follower every one after the
/// id it joined at, once each, in order, and one `done`; storage holds the same text.
async fn assert_both_got_everything(
    pair: &Pair,
    asker: SseReader,
    follower: SseReader,
    chat_id: &str,
    mut seen: Vec<SseEvent>,
    text: &str,
) {
    let joined_at = seen[0].id_num();
    seen.extend(asker.collect().await);
    let followed = follower.collect().await;
    assert_eq!(answer_text(&seen), text, "{seen:?}");
    assert_eq!(seen.last().unwrap().event, "done", "{seen:?}");
    for pair in seen.windows(2) {
        assert_eq!(pair[1].id_num(), pair[0].id_num() + 1, "no hole: {seen:?}");
    }
    let expected: Vec<i64> = ids(&seen)
        .into_iter()
        .filter(|id| *id > joined_at)
        .collect();
    assert_eq!(ids(&followed), expected, "the follower: {followed:?}");
    assert_eq!(followed.last().unwrap().event, "done");
    assert_stored_as_sent(&pair.b, chat_id, &seen, "complete").await;
}

fn tokens(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t{i} ")).collect()
}

fn continue_policy(c: &mut Config) {
    c.streams.on_disconnect = DisconnectPolicy::Continue;
}

/// Redis killed and started again empty (no persistence) mid-answer: the producer notices its
/// answer is gone, writes it again from its own copy with the same ids and goes on; nobody gets
/// an error, a hole, or an event twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_mid_answer_costs_no_event() {
    let mut redis = OwnRedis::start();
    let pair = pair_on(TestKeys::on(redis.url()), continue_policy).await;
    let words = tokens(6);
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    let (mut asker, follower, chat_id, mut seen) =
        answer_on_a_with_a_follower_on_b(&pair, &refs).await;
    pair.a.fake.release(1);
    seen.push(asker.next_event().await.unwrap());

    redis.kill();
    redis.resume();
    pair.a.fake.release(4);
    assert_both_got_everything(&pair, asker, follower, &chat_id, seen, &words.concat()).await;
    let keys = pair.keys.keys();
    assert!(
        keys.iter().any(|k| k.ends_with(":log")),
        "the log was written again: {keys:?}"
    );
}

/// `FLUSHALL` mid-answer (an operator, an eviction of everything): the same repair, with the
/// connections still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_mid_answer_costs_no_event() {
    let redis = OwnRedis::start();
    let pair = pair_on(TestKeys::on(redis.url()), continue_policy).await;
    let words = tokens(5);
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    let (asker, follower, chat_id, seen) = answer_on_a_with_a_follower_on_b(&pair, &refs).await;
    redis.command(&["FLUSHALL"]);
    pair.a.fake.release(4);
    assert_both_got_everything(&pair, asker, follower, &chat_id, seen, &words.concat()).await;
}

/// The last entries of an answer's log vanish while its lease and hash stay — what a failover
/// to a replica that missed the last writes leaves: the producer finds the log ending before its
/// last acknowledged event and writes it again; a follower waiting past the hole gets each event
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_lost_its_last_entries_is_written_again() {
    let pair = pair_on(TestKeys::new(), continue_policy).await;
    let words = tokens(6);
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    let (mut asker, follower, chat_id, mut seen) =
        answer_on_a_with_a_follower_on_b(&pair, &refs).await;
    pair.a.fake.release(2);
    seen.push(asker.next_event().await.unwrap());
    seen.push(asker.next_event().await.unwrap());

    let log = format!("{}:chat:{{{chat_id}}}:log", pair.keys.prefix);
    let mut conn = redis::Client::open(pair.keys.url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let last_two: Vec<String> = seen[seen.len() - 2..]
        .iter()
        .map(|e| format!("{}-0", e.id_num()))
        .collect();
    let removed: i64 = redis::cmd("XDEL")
        .arg(&log)
        .arg(&last_two)
        .query(&mut conn)
        .unwrap();
    assert_eq!(removed, 2, "the tail was there to lose");
    pair.a.fake.release(3);
    assert_both_got_everything(&pair, asker, follower, &chat_id, seen, &words.concat()).await;
}

/// A failover: the primary is demoted to a replica of the promoted one (its clients' writes
/// answer `READONLY`, its blocked readers are unblocked) and the name the instances use moves to
/// the new primary. The instances reconnect by themselves and the answer goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_while_the_primary_is_demoted_costs_no_event() {
    let old = OwnRedis::start();
    let new = OwnRedis::start_with(&[]);
    new.command(&["REPLICAOF", "127.0.0.1", &old.port.to_string()]);
    eventually("the replica is in sync", || async {
        let info = new.command(&["INFO", "replication"]);
        let text = match info {
            redis::Value::BulkString(bytes) => String::from_utf8(bytes).unwrap(),
            redis::Value::VerbatimString { text, .. } => text,
            other => format!("{other:?}"),
        };
        text.contains("master_link_status:up").then_some(())
    })
    .await;
    let name = Partition::to(&format!("127.0.0.1:{}", old.port), true).await;
    let pair = pair_on(TestKeys::on(name.redis_url()), continue_policy).await;
    let words = tokens(6);
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    let (mut asker, follower, chat_id, mut seen) =
        answer_on_a_with_a_follower_on_b(&pair, &refs).await;
    pair.a.fake.release(1);
    seen.push(asker.next_event().await.unwrap());

    new.command(&["REPLICAOF", "NO", "ONE"]);
    old.command(&["REPLICAOF", "127.0.0.1", &new.port.to_string()]);
    name.redirect(&format!("127.0.0.1:{}", new.port));
    pair.a.fake.release(4);
    assert_both_got_everything(&pair, asker, follower, &chat_id, seen, &words.concat()).await;

    pair.a.fake.push(Script::tokens(&["after"]));
    let next = pair
        .a
        .chat(
            "alice",
            json!({"bot_id": BOT, "message": "again", "chat_id": chat_id}),
        )
        .await;
    assert_eq!(answer_text(&next), "after", "written to the new primary");
}

/// Redis gone for longer than the producer offers events to it: every listener gets exactly one
/// retryable terminal event, storage holds exactly what was delivered (as interrupted), and the
/// chat takes a new turn once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_away_for_longer_than_the_writer_waits_ends_the_answer_once() {
    let mut redis = OwnRedis::start();
    let db = TestDatabase::create().await;
    let url = redis.url();
    let app = spawn_app_with(|c| {
        c.database.url = db.url.clone();
        c.redis.url = Some(url.clone());
        continue_policy(c);
    })
    .await;
    app.fake
        .push(Script::tokens(&["one", " two", " three"]).gated());
    let (mut reader, chat_id) = app.open_stream("alice", "go").await;
    app.fake.release(1);
    let mut events = vec![reader.next_event().await.unwrap()];

    redis.kill();
    app.fake.release(1);
    events.extend(reader.collect().await);
    let end = events.last().unwrap().clone();
    assert_eq!(end.event, "error", "{events:?}");
    assert_eq!(end.json()["code"], "answer_interrupted");
    assert_eq!(end.json()["retryable"], true);
    assert_eq!(
        events.iter().filter(|e| e.event == "error").count(),
        1,
        "exactly one terminal event"
    );
    assert_stored_as_sent(&app, &chat_id, &events, "interrupted").await;

    let refused = app
        .post_stream("alice", json!({"bot_id": BOT, "message": "now?"}))
        .await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "service_unavailable");

    redis.resume();
    wait_until_ready(&app).await;
    app.fake.push(Script::tokens(&["back"]));
    let again = app
        .chat(
            "alice",
            json!({"bot_id": BOT, "message": "again", "chat_id": chat_id}),
        )
        .await;
    assert_eq!(answer_text(&again), "back");
    assert!(again[0].id_num() > end.id_num());
}

/// `on_disconnect = "cancel"` behind a load balancer: the asker's connection to A drops and the
/// user follows the answer on B instead. A counts B's listener (its presence in Redis), so the
/// answer is not cancelled even with no grace period; once B's listener goes too, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_policy_counts_listeners_on_every_instance() {
    let pair = pair_on(TestKeys::new(), |c| {
        c.streams.on_disconnect = DisconnectPolicy::Cancel;
        c.streams.disconnect_grace_secs = 0;
    })
    .await;
    let FollowedAnswer {
        asker,
        follower,
        chat_id,
        ..
    } = pair.answer_followed_on_b().await;
    assert_eq!(follower.status(), 200);
    let answer = format!("{}:chat:{{{chat_id}}}:answer", pair.keys.prefix);
    let mut conn = pair.keys.connection();
    eventually("the producer counts the listener on B", || {
        let counted: Option<i64> = redis::cmd("HGET")
            .arg(&answer)
            .arg("remote_listeners")
            .query(&mut conn)
            .unwrap();
        async move { counted.filter(|n| *n >= 1).map(|_| ()) }
    })
    .await;
    drop(asker);
    pair.a.fake.release(1);
    let mut follower = SseReader::new(follower);
    assert_eq!(
        follower.next_event().await.unwrap().json()["content"],
        " two"
    );

    drop(follower);
    assert_eq!(
        pair.a.fake.outcome(0).await,
        super::fake_upstream::Outcome::Cancelled,
        "nobody listens anywhere: the provider call is cancelled"
    );
    let messages = pair.b.settled_messages("alice", &chat_id).await;
    assert_eq!(messages[1]["content"], "one two");
    assert_eq!(messages[1]["status"], "interrupted");
}
