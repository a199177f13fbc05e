//! `mangoo chat` in a real pseudo-terminal (rexpect), as a person would use it: answers stream,
//! Ctrl-C stops one (and the model with it), a dropped connection resumes by itself, Ctrl-D
//! quits; `--message` and its exit codes for scripts.

use std::process::Command;
use std::time::Duration;

use rexpect::process::WaitStatus;
use rexpect::session::{PtySession, spawn_command};
use tokio::sync::watch;

use super::fake_upstream::{Outcome, Script};
use super::helpers::{TestApp, spawn_app_with};
use super::idle_proxy::IdleProxy;

/// rexpect's guard against a hang: no step waits longer.
const STEP_TIMEOUT_MS: u64 = 30_000;

fn chat_command(url: &str, token: &str, history: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mangoo"));
    command
        .args(["chat", url, "--token", token])
        .env("XDG_DATA_HOME", history)
        .env_remove("MANGOO_TOKEN");
    command
}

fn spawn_chat(url: &str, token: &str, history: &std::path::Path) -> PtySession {
    spawn_command(chat_command(url, token, history), Some(STEP_TIMEOUT_MS)).unwrap()
}

fn exit_code(session: &PtySession) -> i32 {
    match session.process().wait().unwrap() {
        WaitStatus::Exited(_, code) => code,
        other => panic!("mangoo chat ended with {other:?}"),
    }
}

async fn app() -> TestApp {
    spawn_app_with(|c| c.streams.disconnect_grace_secs = 30).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_streams_ctrl_c_stops_it_and_ctrl_d_quits() {
    let app = app().await;
    let (url, token) = (app.url("/"), app.token("alice"));
    let fake = app.fake.clone();
    fake.push(Script::tokens(&["Partial", " answer", " never", " finished"]).gated());
    let history = tempfile::tempdir().unwrap();
    let history_dir = history.path().to_owned();

    let code = tokio::task::spawn_blocking(move || {
        let mut chat = spawn_chat(&url, &token, &history_dir);
        chat.exp_string("you> ").unwrap();
        chat.send_line("Tell me a long story").unwrap();
        fake.release(1);
        chat.exp_string("Partial").unwrap();
        chat.send_control('c').unwrap();
        chat.exp_string("[stopped]").unwrap();
        chat.exp_string("you> ").unwrap();
        // The default script: a second question, answered in the same chat.
        chat.send_line("And now?").unwrap();
        chat.exp_string("Hello, world!").unwrap();
        chat.exp_string("you> ").unwrap();
        chat.send_control('d').unwrap();
        chat.exp_eof().unwrap();
        exit_code(&chat)
    })
    .await
    .unwrap();

    assert_eq!(code, 0);
    assert_eq!(
        app.fake.outcome(0).await,
        Outcome::Cancelled,
        "the model stopped too"
    );
    let (_, chats) = app.get_json("alice", "/api/v1/chats").await;
    assert_eq!(
        chats["chats"].as_array().unwrap().len(),
        1,
        "one chat, two turns"
    );
    let chat_id = chats["chats"][0]["chat_id"].as_str().unwrap();
    let messages = app.settled_messages("alice", chat_id).await;
    assert_eq!(messages[1]["status"], "stopped");
    assert_eq!(messages[1]["content"], "Partial");
    assert_eq!(messages[3]["content"], "Hello, world!");
    let saved = std::fs::read_to_string(history.path().join("mangoo/chat_history")).unwrap();
    assert!(
        saved.contains("Tell me a long story"),
        "history kept: {saved}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_by_the_server_side_resumes_with_nothing_lost_or_repeated() {
    let app = app().await;
    let (cut, cuts) = watch::channel(0u64);
    let proxy = IdleProxy::cuttable(app.addr, Duration::from_secs(3600), cuts).await;
    let (url, token) = (proxy.url("/"), app.token("alice"));
    let fake = app.fake.clone();
    fake.push(Script::tokens(&["One", " two", " three", " four."]).gated());
    let history = tempfile::tempdir().unwrap();
    let history_dir = history.path().to_owned();

    let shown = tokio::task::spawn_blocking(move || {
        let mut chat = spawn_chat(&url, &token, &history_dir);
        chat.exp_string("you> ").unwrap();
        chat.send_line("Count").unwrap();
        fake.release(2);
        chat.exp_string("One two").unwrap();
        cut.send_modify(|n| *n += 1);
        chat.exp_string("[reconnecting...]").unwrap();
        fake.release(2);
        let rest = chat.exp_string("you> ").unwrap();
        chat.send_control('d').unwrap();
        chat.exp_eof().unwrap();
        rest
    })
    .await
    .unwrap();

    assert!(shown.contains(" three four."), "{shown:?}");
    assert!(!shown.contains("One"), "nothing shown twice: {shown:?}");
    assert_eq!(app.fake.outcome(0).await, Outcome::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_question_with_message_and_exit_codes_scripts_can_use() {
    let app = app().await;
    let history = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], token: Option<String>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mangoo"));
        command
            .args(["chat", &app.url("/")])
            .args(extra)
            .env("XDG_DATA_HOME", history.path())
            .env_remove("MANGOO_TOKEN");
        if let Some(token) = token {
            command.env("MANGOO_TOKEN", token);
        }
        tokio::process::Command::from(command).output()
    };

    let answered = run(&["--message", "Hi"], Some(app.token("bob")))
        .await
        .unwrap();
    assert_eq!(answered.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&answered.stdout), "Hello, world!\n");

    app.fake
        .push(Script::http_error(400, "ValidationException"));
    let failed = run(&["--message", "Hi"], Some(app.token("bob")))
        .await
        .unwrap();
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("error:"));

    let unknown_bot = run(
        &["--message", "Hi", "--bot", "nope"],
        Some(app.token("bob")),
    )
    .await
    .unwrap();
    assert_eq!(unknown_bot.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown_bot.stderr).contains("unknown bot"));

    let refused = run(&["--message", "Hi"], Some("not-a-token".into()))
        .await
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));

    let no_token = run(&["--message", "Hi"], None).await.unwrap();
    assert_eq!(no_token.status.code(), Some(2));
}
