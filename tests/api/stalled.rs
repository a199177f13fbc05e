//! A client that stops reading never makes the server buffer without bound: once its connection
//! has taken no data for `stalled_client_secs`, it is dropped and its answer cancelled.

use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::fake_upstream::{Outcome, Script};
use super::helpers::{BOT, HANG_GUARD, spawn_app_with};

const TOKEN_BYTES: usize = 4096;
const TOKENS: usize = 20_000;

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_and_its_answer_cancelled() {
    let app = spawn_app_with(|c| c.streams.stalled_client_secs = 1).await;
    app.fake
        .push(Script::repeated(&"x".repeat(TOKEN_BYTES), TOKENS).gated());
    // A raw client with a small receive buffer that sends its request and never reads a byte.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&app.addr.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut client = tokio::net::TcpStream::from_std(socket.into()).unwrap();
    let body = json!({"bot_id": BOT, "message": "never mind"}).to_string();
    let request = format!(
        "POST /api/v1/chat/stream HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        app.token("alice"),
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();

    // The upstream keeps sending, a batch at a time, until the server gives up on the client.
    let outcome = tokio::time::timeout(HANG_GUARD, async {
        let fake = app.fake.clone();
        let outcome = fake.outcome(0);
        tokio::pin!(outcome);
        loop {
            tokio::select! {
                outcome = &mut outcome => return outcome,
                () = tokio::time::sleep(Duration::from_millis(20)) => app.fake.release(64),
            }
        }
    })
    .await
    .expect("the stalled client was never dropped");

    assert_eq!(
        outcome,
        Outcome::Cancelled,
        "the upstream was cancelled, not read to the end"
    );
    let chats = app.get_json("alice", "/api/v1/chats").await.1;
    let chat_id = chats["chats"][0]["chat_id"].as_str().unwrap().to_owned();
    let stored = app.settled_messages("alice", &chat_id).await;
    assert_eq!(stored[1]["status"], "interrupted");
    let held = stored[1]["content"].as_str().unwrap().len();
    assert!(
        held < TOKENS * TOKEN_BYTES / 2,
        "the server pulled {held} bytes for a client that read nothing"
    );
    drop(client);
}
