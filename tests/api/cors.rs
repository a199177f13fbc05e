//! CORS: listed origins only, with credentials, never a wildcard.

use super::helpers::spawn_app_with;

const ALLOWED: &str = "http://localhost:3000";

#[tokio::test]
async fn a_listed_origin_gets_a_working_preflight() {
    let app = spawn_app_with(|c| c.cors.allowed_origins = vec![ALLOWED.into()]).await;

    let response = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/api/v1/chat/stream"))
        .header("origin", ALLOWED)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();

    assert!(response.status().is_success(), "{}", response.status());
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], ALLOWED);
    assert_eq!(headers["access-control-allow-credentials"], "true");
    let methods = headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(methods.contains("post"), "{methods}");
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
}

#[tokio::test]
async fn a_listed_origin_sees_credentials_and_exposed_headers_on_responses() {
    let app = spawn_app_with(|c| c.cors.allowed_origins = vec![ALLOWED.into()]).await;

    let response = app
        .client
        .get(app.url("/api/v1/chats"))
        .header("origin", ALLOWED)
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], ALLOWED);
    assert_eq!(headers["access-control-allow-credentials"], "true");
    assert!(headers.contains_key("access-control-expose-headers"));
}

#[tokio::test]
async fn other_origins_get_no_cors_headers() {
    let app = spawn_app_with(|c| c.cors.allowed_origins = vec![ALLOWED.into()]).await;

    for request in [
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/api/v1/chat/stream"))
            .header("access-control-request-method", "POST"),
        app.client.get(app.url("/api/v1/chats")),
    ] {
        let response = request
            .header("origin", "http://evil.test")
            .send()
            .await
            .unwrap();
        let headers = response.headers();
        assert!(headers.get("access-control-allow-origin").is_none());
        assert!(headers.get("access-control-allow-credentials").is_none());
    }
}
