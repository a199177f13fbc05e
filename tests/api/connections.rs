//! Connection limits on the real listener: caps per address, an HTTP/2 connection that sends its
//! preface and nothing else, keep-alive connections left idle.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::helpers::{HANG_GUARD, spawn_app_with};

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(tcp: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(HANG_GUARD, async {
        let mut buffer = [0u8; 4096];
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await
    .expect("the server kept the connection open");
    received
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_connections() {
    let app = spawn_app_with(|c| c.server.max_connections_per_address = 2).await;
    // Two silent connections take the address's two places.
    let _first = TcpStream::connect(app.addr).await.unwrap();
    let _second = TcpStream::connect(app.addr).await.unwrap();
    // The accept loop takes connections in the order they arrived: these two were first.
    let mut third = TcpStream::connect(app.addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut third).await;
    assert!(answer.is_empty(), "refused without an answer: {answer:?}");

    drop((_first, _second));
    let freed = async {
        loop {
            if let Ok(response) = app.client.get(app.url("/healthz")).send().await
                && response.status() == 200
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, freed)
        .await
        .expect("the places never came back");
    let text = app.metrics_text().await;
    assert!(
        text.contains(
            r#"mangoo_connections_refused_total{reason="max_connections_per_address"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn an_http2_connection_that_only_says_hello_is_closed_when_idle() {
    let app = spawn_app_with(|c| c.server.idle_timeout_secs = 1).await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // an empty SETTINGS frame

    let received = read_until_closed(&mut tcp).await;

    // The server's own SETTINGS, then a GOAWAY (frame type 7) before it closed.
    assert!(received.len() >= 9, "{received:?}");
    assert_eq!(received[3], 4, "SETTINGS first");
    assert!(
        frame_types(&received).contains(&7),
        "a GOAWAY: {received:?}"
    );
}

/// The types of the HTTP/2 frames in `bytes`.
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let length =
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + length).min(bytes.len())..];
    }
    types
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_but_a_quiet_stream_is_not() {
    let app = spawn_app_with(|c| c.server.idle_timeout_secs = 1).await;
    app.fake
        .push(super::fake_upstream::Script::tokens(&["slow", " answer"]).gated());
    let (reader, _chat) = app.open_stream("alice", "take your time").await;

    // Opened after the stream, answered, then left idle: closed after the idle timeout.
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut idle).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "answered, then closed when idle"
    );

    // The stream's connection has been quiet for longer than that: a request in flight is
    // never idle, so its answer still arrives whole.
    app.fake.release(2);
    let events = reader.collect().await;
    assert_eq!(super::helpers::answer_text(&events), "slow answer");
    assert_eq!(events.last().unwrap().event, "done");
}

/// The kernel's accept queue of the main listener is as long as `server.listen_backlog` asks
/// (`ss` shows a listening socket's backlog as its Send-Q).
#[tokio::test]
async fn the_listener_queues_as_many_connections_as_configured() {
    for backlog in [77u32, 4096] {
        let app = spawn_app_with(|c| c.server.listen_backlog = backlog).await;
        let output = tokio::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{}", app.addr.port())])
            .output()
            .await
            .expect("ss runs (iproute2; scripts/test.sh installs it)");
        let line = String::from_utf8_lossy(&output.stdout).to_string();
        let send_q: u32 = line
            .split_whitespace()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a listening socket in: {line}"));
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(send_q, backlog.min(somaxconn), "{line}");
    }
}
