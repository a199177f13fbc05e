//! SIGTERM to a real server process mid-stream: readiness flips at once, new streams are
//! refused, the running stream gets its retryable end after the drain window with the id to
//! resume from, the partial answer is stored, and the process exits 0.

use std::time::Duration;

use serde_json::{Value, json};

use super::binary::serve_with_config;
use super::fake_upstream::{FakeUpstream, Outcome, Script};
use super::helpers::{BOT, HANG_GUARD, SECRET, SseReader, bedrock_bot_toml, token_for};

const DRAIN_SECS: u64 = 2;

fn config(fake: &FakeUpstream, db: &std::path::Path) -> String {
    format!(
        r#"
[server]
bind = "127.0.0.1:0"
drain_secs = {DRAIN_SECS}

[auth]
jwt_secret = "{SECRET}"

[database]
url = "sqlite://{db}"

{bot}
"#,
        db = db.display(),
        bot = bedrock_bot_toml(fake),
    )
}

/// A real `mangoo serve` on a SQLite file, its fake upstream, a client and Alice's token.
struct Server {
    fake: FakeUpstream,
    dir: tempfile::TempDir,
    db: std::path::PathBuf,
    config_path: std::path::PathBuf,
    child: tokio::process::Child,
    base: String,
    client: reqwest::Client,
    token: String,
}

async fn server() -> Server {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let config_path = dir.path().join("mangoo.toml");
    std::fs::write(&config_path, config(&fake, &db)).unwrap();
    let (child, base) = serve_with_config(&config_path).await;
    let client = crate::helpers::client_builder().no_proxy().build().unwrap();
    let token = token_for("alice");
    Server {
        fake,
        dir,
        db,
        config_path,
        child,
        base,
        client,
        token,
    }
}

#[tokio::test]
async fn sigterm_drains_then_ends_streams_retryably_stores_them_and_exits_zero() {
    let Server {
        fake,
        dir: _dir,
        db,
        config_path: _config_path,
        mut child,
        base,
        client,
        token,
    } = server().await;
    let ask = || {
        client
            .post(format!("{base}/api/v1/chat/stream"))
            .bearer_auth(&token)
            .json(&json!({"bot_id": BOT, "message": "a long answer please"}))
            .send()
    };
    fake.push(Script::tokens(&["partial", " answer", " never", " finished"]).gated());
    let mut stream = SseReader::new(ask().await.unwrap());
    let chat_id = stream.next_event().await.unwrap().json()["chat_id"]
        .as_str()
        .unwrap()
        .to_owned();
    fake.release(1);
    let token_event = stream.next_event().await.unwrap();
    assert_eq!(token_event.json()["content"], "partial");

    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let terminated_at = tokio::time::Instant::now();

    // Readiness flips as soon as the signal is handled; new streams are then refused with the
    // contract's body.
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let readyz = client.get(format!("{base}/readyz")).send().await.unwrap();
            if readyz.status() == 503 {
                return;
            }
            assert_eq!(readyz.status(), 200);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("readyz never went 503");
    let refused = ask().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "server_shutting_down");
    assert_eq!(body["type"], "error");

    // The running stream ends after the drain window with the id to resume from.
    let end = stream.next_event().await.unwrap();
    assert_eq!(end.event, "error");
    let end = end.json();
    assert_eq!(end["code"], "server_shutting_down");
    assert_eq!(end["retryable"], true);
    assert_eq!(end["last_event_id"], token_event.id_num());
    assert!(stream.next_event().await.is_none());

    let status = tokio::time::timeout(Duration::from_secs(DRAIN_SECS) + HANG_GUARD, child.wait())
        .await
        .expect("mangoo did not exit")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        terminated_at.elapsed() >= Duration::from_secs(DRAIN_SECS),
        "the drain window was honoured"
    );
    assert_eq!(fake.outcome(0).await, Outcome::Cancelled);

    let store = mangoo::store::SqliteStore::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    use mangoo::store::ChatStore;
    let messages = store.list_messages(&chat_id, None, 10_000).await.unwrap();
    assert_eq!(
        messages[1].status,
        mangoo::store::MessageStatus::Interrupted
    );
    assert_eq!(messages[1].content, "partial");
}

/// `kill -9` mid-answer, without Redis: the text saved while it streamed (about once a second)
/// survives. The next start marks the answer interrupted with that text; a client resuming with
/// the last id it saw gets one terminal event with a larger id, and the chat's next turn goes on
/// after it — no id is ever reused.
#[tokio::test]
async fn kill_9_mid_answer_loses_at_most_the_last_moments_and_no_id_is_reused() {
    let Server {
        fake,
        dir: _dir,
        db,
        config_path,
        mut child,
        base,
        client,
        token,
    } = server().await;
    fake.push(Script::tokens(&["partial", " answer", " never", " finished"]).gated());
    let response = client
        .post(format!("{base}/api/v1/chat/stream"))
        .bearer_auth(&token)
        .json(&json!({"bot_id": BOT, "message": "a long answer please"}))
        .send()
        .await
        .unwrap();
    let mut stream = SseReader::new(response);
    let chat_id = stream.next_event().await.unwrap().json()["chat_id"]
        .as_str()
        .unwrap()
        .to_owned();
    fake.release(2);
    stream.next_event().await.unwrap();
    let last_seen = stream.next_event().await.unwrap();
    assert_eq!(last_seen.json()["content"], " answer");

    // The checkpoint lands within about a second of the text; wait for it, then kill.
    let saved = || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row(
            "SELECT content FROM messages WHERE chat_id = ?1 AND role = 'assistant'",
            [&chat_id],
            |row| row.get::<_, String>(0),
        )
        .unwrap()
    };
    tokio::time::timeout(HANG_GUARD, async {
        while saved() != "partial answer" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the partial answer was never saved");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    drop(stream);

    let (restarted, base) = serve_with_config(&config_path).await;
    let messages: Value = client
        .get(format!("{base}/api/v1/chats/{chat_id}/messages"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let answer = &messages["messages"][1];
    assert_eq!(answer["content"], "partial answer");
    assert_eq!(answer["status"], "interrupted");

    let resumed = client
        .get(format!("{base}/api/v1/chats/{chat_id}/stream"))
        .bearer_auth(&token)
        .header("last-event-id", last_seen.id_num().to_string())
        .send()
        .await
        .unwrap();
    let events = SseReader::new(resumed).collect().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event, "error");
    assert_eq!(events[0].json()["retryable"], true);
    let terminal_id = events[0].id_num();
    assert!(terminal_id > last_seen.id_num());

    fake.push(Script::tokens(&["again"]));
    let next = client
        .post(format!("{base}/api/v1/chat/stream"))
        .bearer_auth(&token)
        .json(&json!({"bot_id": BOT, "message": "go on", "chat_id": chat_id}))
        .send()
        .await
        .unwrap();
    let next = SseReader::new(next).collect().await;
    assert_eq!(
        next.last().unwrap().event,
        "done",
        "the chat takes a new turn"
    );
    assert!(
        next[0].id_num() > terminal_id,
        "ids go on after the recovered answer"
    );
    drop(restarted);
}
