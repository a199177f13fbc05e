//! The real `mangoo` binary: configuration errors, the token command, the first-run banner,
//! access logs and a clean exit on SIGTERM.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use super::helpers::{HANG_GUARD, SseReader, answer_text, assert_well_formed};

pub fn mangoo() -> Command {
    command(Command::new(env!("CARGO_BIN_EXE_mangoo")))
}

/// A command with none of Mangoo's environment inherited and its output captured.
fn command(mut command: Command) -> Command {
    command
        .env_remove("MANGOO_JWT_SECRET")
        .env_remove("MANGOO_CONFIG")
        .env_remove("MANGOO_BIND")
        .env_remove("MANGOO_DATABASE_URL")
        .env_remove("MANGOO_REDIS_URL")
        .env_remove("MANGOO_ALLOWED_ORIGINS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Starts `mangoo serve --config <file>` and waits for its listening line; returns the process
/// and its base URL.
pub async fn serve_with_config(config: &std::path::Path) -> (Child, String) {
    let mut child = mangoo()
        .arg("serve")
        .arg("--config")
        .arg(config)
        .spawn()
        .unwrap();
    let base = wait_until_listening(&mut child).await;
    (child, base)
}

/// Reads the process's output up to its listening line; returns the base URL it names.
async fn wait_until_listening(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("no banner");
            if let Some(url) = line.strip_prefix("Mangoo listening on ") {
                return url.trim().to_owned();
            }
        }
    })
    .await
    .expect("mangoo did not start")
}

/// Sends SIGTERM and waits for the exit; returns the exit code and everything logged.
pub async fn terminate(mut child: Child) -> (Option<i32>, String) {
    let pid = child.id().unwrap().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(HANG_GUARD, child.wait())
        .await
        .expect("mangoo did not exit after SIGTERM")
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    (status.code(), stderr)
}

#[tokio::test]
async fn a_bad_configuration_stops_the_start_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        ("[server]\nbind = \"not an address\"\n", "server.bind"),
        ("[server]\nbindd = \"0.0.0.0:1\"\n", "bindd"),
        (
            "[[bots]]\nid = \"b\"\nprovider = \"nope\"\nmodel = \"m\"\n",
            "bots[0].provider",
        ),
        (
            "[cors]\nallowed_origins = [\"*\"]\n",
            "cors.allowed_origins[0]",
        ),
        ("this is not toml", "bad.toml"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let output = mangoo()
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "started with {text:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{text:?} -> {stderr}");
    }
}

#[tokio::test]
async fn secrets_never_appear_in_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[auth]\njwt_secret = \"super-secret-value-123456789012345\"\n[server]\nbind = \"x\"\n",
    )
    .unwrap();
    let output = mangoo()
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(all.contains("server.bind"));
    assert!(!all.contains("super-secret-value"));
}

#[tokio::test]
async fn the_token_command_signs_with_the_configured_secret() {
    let secret = "token-command-secret-token-command-secret";
    let output = mangoo()
        .args(["token", "--sub", "alice", "--ttl", "2h"])
        .env("MANGOO_JWT_SECRET", secret)
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let user = mangoo::auth::Authenticator::hs256(secret.as_bytes())
        .verify(&token)
        .await
        .unwrap();
    assert_eq!(user.as_str(), "alice");

    let output = mangoo()
        .args(["token", "--sub", "alice"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("jwt_secret"));
}

/// What the first-run banner tells a new user.
struct Banner {
    base: String,
    token: String,
    /// The curl example's JSON body and URL.
    body: serde_json::Value,
    url: String,
}

/// Reads stdout through the banner's two-line curl example.
async fn read_banner(child: &mut Child) -> Banner {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let read = async {
        let mut base = None;
        let mut page_link = None;
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("Mangoo listening on ") {
                base = Some(url.trim().to_owned());
            }
            if line.trim().starts_with("http") && line.contains("/#token=") {
                page_link = Some(line.trim().to_owned());
            }
            let Some(rest) = line
                .trim()
                .strip_prefix("curl -N -H 'Authorization: Bearer ")
            else {
                continue;
            };
            let token = rest.split('\'').next().unwrap().to_owned();
            let data_line = lines.next_line().await.unwrap().unwrap();
            let data = data_line.trim().strip_prefix("-d '").unwrap();
            let (body, url) = data.split_once("' ").unwrap();
            let base = base.expect("no listening line");
            assert_eq!(
                page_link,
                Some(format!("{base}/#token={token}")),
                "the page link"
            );
            return Banner {
                base,
                token,
                body: serde_json::from_str(body).unwrap(),
                url: url.trim().to_owned(),
            };
        }
        panic!("the banner has no curl example");
    };
    tokio::time::timeout(HANG_GUARD, read)
        .await
        .expect("no banner")
}

#[tokio::test]
async fn a_first_run_prints_a_curl_that_streams_a_real_answer_logs_requests_and_exits_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = mangoo()
        .arg("serve")
        .env("MANGOO_BIND", "127.0.0.1:0")
        .env(
            "MANGOO_DATABASE_URL",
            format!("sqlite://{}/m.db", dir.path().display()),
        )
        .spawn()
        .unwrap();
    let Banner {
        base,
        token,
        body,
        url,
    } = read_banner(&mut child).await;
    let client = crate::helpers::client_builder().no_proxy().build().unwrap();

    // The printed curl example streams a real answer from the default bot (the local model).
    let response = client
        .post(&url)
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = SseReader::new(response).collect().await;
    assert_well_formed(&events);
    assert_eq!(events.last().unwrap().json()["provider"], "local");
    assert!(!answer_text(&events).trim().is_empty());

    let response = client
        .get(format!("{base}/api/v1/chats"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let (code, stderr) = terminate(child).await;
    assert_eq!(code, Some(0));
    assert!(stderr.contains("GET /api/v1/chats 200"), "{stderr}");
    assert!(stderr.contains("client=127.0.0.1"), "{stderr}");
    assert!(!stderr.contains(&token), "the token leaked into the logs");
}

#[tokio::test]
async fn with_an_identity_provider_and_no_secret_no_token_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mangoo.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}/m.db\"\n\
             [auth]\njwks_url = \"http://127.0.0.1:9/jwks.json\"\nissuer = \"https://idp.test\"\n\
             audience = \"mangoo\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut child = mangoo()
        .args(["serve", "--config"])
        .arg(&config)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = tokio::time::timeout(HANG_GUARD, async {
        let mut text = String::new();
        while let Some(line) = stdout.next_line().await.unwrap() {
            text.push_str(&line);
            text.push('\n');
            if line.starts_with("Tokens:") {
                return text;
            }
        }
        panic!("the banner ended early: {text}");
    })
    .await
    .expect("no banner");

    assert!(banner.contains("identity provider"), "{banner}");
    assert!(!banner.contains("eyJ"), "a token was printed: {banner}");
    let (code, _) = terminate(child).await;
    assert_eq!(code, Some(0));
}

/// The soft and hard "Max open files" of a running process.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn serve_raises_its_open_files_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    // Started by a shell that lowers its soft limit first and execs, so the pid is Mangoo's.
    let mut shell = command(Command::new("bash"));
    let mut child = shell
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" serve")
        .arg(env!("CARGO_BIN_EXE_mangoo"))
        .env("MANGOO_BIND", "127.0.0.1:0")
        .env(
            "MANGOO_JWT_SECRET",
            "a-test-secret-that-is-long-enough-0123",
        )
        .env(
            "MANGOO_DATABASE_URL",
            format!("sqlite://{}/m.db", dir.path().display()),
        )
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    wait_until_listening(&mut child).await;
    let (soft, hard) = open_files_limits(pid);
    assert_ne!(soft, "256", "the soft limit was raised");
    assert_eq!(soft, hard);
    // SIGTERM right after the banner drains and exits 0: the signal handlers are installed before
    // the banner appears (a signal with no handler yet would kill the process: no exit code).
    let (code, _) = terminate(child).await;
    assert_eq!(code, Some(0));
}
