//! Authentication: HS256 with the configured secret, `sub` and `exp` required, nothing else.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::helpers::{BOT, SECRET, TestApp, spawn_app};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(alg: Algorithm, secret: &[u8], claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn unsigned(claims: Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{claims}.")
}

async fn stream_with(app: &TestApp, authorization: Option<String>) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/api/v1/chat/stream"))
        .json(&json!({"bot_id": BOT, "message": "hi"}));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.unwrap()
}

async fn assert_401(response: reqwest::Response) {
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["code"], "unauthorized");
}

#[tokio::test]
async fn requests_without_a_valid_token_are_401s() {
    let app = spawn_app().await;
    let valid_claims = json!({"sub": "alice", "exp": now() + 600});
    let cases = [
        None,
        Some("Bearer".to_owned()),
        Some("Basic YWxpY2U6c2VjcmV0".to_owned()),
        Some("Bearer not-a-jwt".to_owned()),
        // expired
        Some(format!(
            "Bearer {}",
            sign(
                Algorithm::HS256,
                SECRET.as_bytes(),
                json!({"sub": "alice", "exp": now() - 3600})
            )
        )),
        // forged: another secret
        Some(format!(
            "Bearer {}",
            sign(
                Algorithm::HS256,
                b"someone-elses-secret-someone-else",
                valid_claims.clone()
            )
        )),
        // alg: none
        Some(format!("Bearer {}", unsigned(valid_claims.clone()))),
        // the right secret, another algorithm
        Some(format!(
            "Bearer {}",
            sign(Algorithm::HS512, SECRET.as_bytes(), valid_claims.clone())
        )),
        // required claims missing
        Some(format!(
            "Bearer {}",
            sign(Algorithm::HS256, SECRET.as_bytes(), json!({"sub": "alice"}))
        )),
        Some(format!(
            "Bearer {}",
            sign(
                Algorithm::HS256,
                SECRET.as_bytes(),
                json!({"exp": now() + 600})
            )
        )),
    ];
    for authorization in cases {
        assert_401(stream_with(&app, authorization).await).await;
    }
    assert!(app.fake.requests().is_empty());
}

#[tokio::test]
async fn a_valid_token_works_in_the_header_and_in_the_query() {
    let app = spawn_app().await;
    let token = sign(
        Algorithm::HS256,
        SECRET.as_bytes(),
        json!({"sub": "alice", "exp": now() + 600}),
    );
    let response = stream_with(&app, Some(format!("Bearer {token}"))).await;
    assert_eq!(response.status(), 200);

    // In the URL only where EventSource needs it: the stream routes.
    let response = app
        .client
        .get(app.url("/api/v1/chat/stream"))
        .query(&[
            ("token", token.as_str()),
            ("bot_id", BOT),
            ("message", "hi"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = app
        .client
        .get(app.url("/api/v1/chat/stream"))
        .query(&[("token", "forged"), ("bot_id", BOT), ("message", "hi")])
        .send()
        .await
        .unwrap();
    assert_401(response).await;
}

#[tokio::test]
async fn every_chat_endpoint_requires_a_token() {
    let app = spawn_app().await;
    for (method, path) in [
        (reqwest::Method::GET, "/api/v1/chats"),
        (reqwest::Method::GET, "/api/v1/chats/chat-x/messages"),
        (reqwest::Method::DELETE, "/api/v1/chats/chat-x"),
        (
            reqwest::Method::GET,
            "/api/v1/chat/stream?bot_id=bot-123&message=hi",
        ),
    ] {
        let response = app
            .client
            .request(method, app.url(path))
            .send()
            .await
            .unwrap();
        assert_401(response).await;
    }
}
