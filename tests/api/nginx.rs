//! Debian's nginx in front of a real `mangoo serve`, proxying with exactly the shipped
//! `deploy/nginx/mangoo.conf` (the test's own nginx.conf only names the upstream and the port and
//! sets a short idle timeout): events arrive one by one, a pause three times the proxy's timeout
//! survives on heartbeats, Mangoo logs the client address nginx forwarded, and a resume works.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use super::binary::{serve_with_config, terminate};
use super::fake_upstream::{FakeUpstream, Script};
use super::helpers::{
    BOT, HANG_GUARD, SECRET, SseReader, bedrock_bot_toml, client_builder, token_for,
};
use super::services::free_port;

/// nginx's idle timeout in this test; Mangoo's heartbeat is well inside it.
const PROXY_TIMEOUT_SECS: u64 = 2;

struct Proxied {
    nginx: Child,
    mangoo: Child,
    /// nginx's base URL.
    base: String,
    fake: FakeUpstream,
    _dir: tempfile::TempDir,
}

async fn proxied() -> Proxied {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mangoo.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
bind = "127.0.0.1:0"
heartbeat_secs = 1
trusted_proxies = ["127.0.0.1/32"]
[log]
format = "json"
[streams]
on_disconnect = "continue"
[auth]
jwt_secret = "{SECRET}"
[database]
url = "sqlite://{db}"
{bot}
"#,
            db = dir.path().join("m.db").display(),
            bot = bedrock_bot_toml(&fake),
        ),
    )
    .unwrap();
    let (mangoo, mangoo_base) = serve_with_config(&config).await;
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx/mangoo.conf");
    let (nginx, base) = start_nginx(
        dir.path(),
        &format!(
            "upstream mangoo {{ server {upstream}; keepalive 8; }}",
            upstream = mangoo_base.trim_start_matches("http://"),
        ),
        &format!(
            "proxy_read_timeout {PROXY_TIMEOUT_SECS}s;\n    proxy_send_timeout {PROXY_TIMEOUT_SECS}s;\n\
             include {shipped};"
        ),
    )
    .await;
    Proxied {
        nginx,
        mangoo,
        base,
        fake,
        _dir: dir,
    }
}

/// Debian's nginx, run from `dir` with `http` (more of its `http {}` block) and `server` (the body
/// of its one `server {}`, which listens on a free port); returned with its base URL (no trailing
/// slash) once it answers `/healthz`.
pub(super) async fn start_nginx(dir: &Path, http: &str, server: &str) -> (Child, String) {
    let port = free_port();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
               {http}\n  server {{\n    listen 127.0.0.1:{port};\n    {server}\n  }}\n}}\n",
            dir = dir.display(),
        ),
    )
    .unwrap();
    let nginx = Command::new(nginx_binary())
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nginx is installed (scripts/test.sh installs Debian's nginx-light)");
    let base = format!("http://127.0.0.1:{port}");
    let client = client_builder().no_proxy().build().unwrap();
    let up = async {
        while client.get(format!("{base}/healthz")).send().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, up)
        .await
        .expect("nginx did not start");
    (nginx, base)
}

fn nginx_binary() -> &'static str {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("nginx")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_streams_are_unbuffered_survive_pauses_resume_and_keep_the_client_address() {
    let proxied = proxied().await;
    // The client comes from 127.0.0.2: the address nginx sees and forwards, unlike its own.
    let client = client_builder()
        .no_proxy()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .build()
        .unwrap();
    proxied
        .fake
        .push(Script::tokens(&["one", " two", " three", " four"]).gated());
    let response = client
        .post(format!("{}/api/v1/chat/stream", proxied.base))
        .bearer_auth(token_for("alice"))
        .header("x-request-id", "client-chosen")
        .json(&json!({"bot_id": BOT, "message": "slowly"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // nginx replaced the client's request id with its own, and Mangoo adopted nginx's.
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(request_id, "client-chosen");
    assert!(
        request_id.len() == 32 && request_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{request_id}"
    );
    let mut reader = SseReader::new(response);
    let metrics = client
        .get(format!("{}/metrics", proxied.base))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 404, "nginx does not forward /metrics");
    let start = reader.next_event().await.unwrap();
    let chat_id = start.json()["chat_id"].as_str().unwrap().to_owned();

    // One event per release: nothing waits in nginx for more.
    for expected in ["one", " two"] {
        proxied.fake.release(1);
        let event = reader.next_event().await.unwrap();
        assert_eq!(event.json()["content"], expected);
    }

    // A pause three times nginx's idle timeout: heartbeats keep the stream open.
    tokio::time::sleep(Duration::from_secs(3 * PROXY_TIMEOUT_SECS)).await;
    proxied.fake.release(1);
    let three = reader.next_event().await.unwrap();
    assert_eq!(three.json()["content"], " three");
    drop(reader);

    // The client went away; it comes back through nginx with the last id it saw.
    proxied.fake.release(1);
    let resumed = client
        .get(format!("{}/api/v1/chats/{chat_id}/stream", proxied.base))
        .bearer_auth(token_for("alice"))
        .header("last-event-id", three.id_num().to_string())
        .send()
        .await
        .unwrap();
    let rest = SseReader::new(resumed).collect().await;
    assert_eq!(rest[0].json()["content"], " four");
    assert_eq!(rest.last().unwrap().event, "done");
    assert!(rest.iter().all(|e| e.id_num() > three.id_num()));

    let Proxied {
        mut nginx, mangoo, ..
    } = proxied;
    nginx.start_kill().unwrap();
    let (_, stderr) = terminate(mangoo).await;
    let stream_line: Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["target"] == "mangoo::access" && l["path"] == "/api/v1/chat/stream")
        .expect("an access line for the stream");
    assert_eq!(stream_line["client"], "127.0.0.2", "{stream_line}");
    assert_eq!(
        stream_line["span"]["request_id"],
        request_id.as_str(),
        "{stream_line}"
    );
}
