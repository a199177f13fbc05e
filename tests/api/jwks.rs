//! Tokens from an identity provider: ES256 keys served as a real JWKS by a local test server,
//! rotated, and every way a token can be wrong.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use super::helpers::{TestApp, spawn_app_with};

const ISSUER: &str = "https://idp.test/pool";
const AUDIENCE: &str = "mangoo";

/// An ES256 signing key and its public JWK.
struct SigningKey {
    kid: String,
    pkcs8: Vec<u8>,
    jwk: Value,
}

impl SigningKey {
    fn generate(kid: &str) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref().to_vec(); // 0x04 ‖ x ‖ y
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        Self {
            kid: kid.into(),
            pkcs8: pkcs8.as_ref().to_vec(),
            jwk,
        }
    }

    fn sign(&self, claims: Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(&self.pkcs8)).unwrap()
    }
}

/// A JWKS endpoint whose key set the test can swap; counts how often it is fetched.
#[derive(Clone, Default)]
struct KeyServer {
    keys: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

impl KeyServer {
    async fn start(keys: &[&SigningKey]) -> (Self, String) {
        let server = Self::default();
        server.serve(keys);
        let app = Router::new()
            .route("/.well-known/jwks.json", get(jwks))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (server, url)
    }

    fn serve(&self, keys: &[&SigningKey]) {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk.clone()).collect();
        *self.keys.lock().unwrap() = json!({ "keys": keys });
    }
}

async fn jwks(State(server): State<KeyServer>) -> axum::Json<Value> {
    server.fetches.fetch_add(1, Ordering::SeqCst);
    axum::Json(server.keys.lock().unwrap().clone())
}

fn claims(extra: Value) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = json!({"sub": "idp-user", "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

async fn status_with(app: &TestApp, token: &str) -> u16 {
    app.client
        .get(app.url("/api/v1/chats"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Asks with `token` until the answer is `status` (the key set changes on its own schedule).
async fn until_status(app: &TestApp, token: &str, status: u16, hung: &str) {
    let reached = async {
        while status_with(app, token).await != status {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(super::helpers::HANG_GUARD, reached)
        .await
        .expect(hung);
}

async fn app_with_jwks(url: &str, adjust: impl FnOnce(&mut mangoo::config::AuthConfig)) -> TestApp {
    let url = url.to_owned();
    spawn_app_with(move |c| {
        c.auth.jwks_url = Some(url);
        c.auth.issuer = Some(ISSUER.into());
        c.auth.audience = Some(AUDIENCE.into());
        adjust(&mut c.auth);
    })
    .await
}

#[tokio::test]
async fn tokens_signed_by_a_key_of_the_set_are_accepted_and_hs256_keeps_working() {
    let key = SigningKey::generate("k1");
    let (_server, url) = KeyServer::start(&[&key]).await;
    let app = app_with_jwks(&url, |_| {}).await;

    assert_eq!(status_with(&app, &key.sign(claims(json!({})))).await, 200);
    assert_eq!(status_with(&app, &app.token("alice")).await, 200);
}

#[tokio::test]
async fn wrong_issuer_audience_kid_signature_or_algorithm_are_refused() {
    let key = SigningKey::generate("k1");
    let impostor = SigningKey::generate("k1"); // claims k1, signs with another key
    let (_server, url) = KeyServer::start(&[&key]).await;
    let app = app_with_jwks(&url, |_| {}).await;
    let unknown = SigningKey::generate("k9");
    // Algorithm confusion: an HS256 token "signed" with the public key as the HMAC secret.
    let public_key = URL_SAFE_NO_PAD
        .decode(key.jwk["x"].as_str().unwrap())
        .unwrap();
    let mut confused = Header::new(Algorithm::HS256);
    confused.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(
        &confused,
        &claims(json!({})),
        &EncodingKey::from_secret(&public_key),
    )
    .unwrap();

    for token in [
        key.sign(claims(json!({"iss": "https://evil.test"}))),
        key.sign(claims(json!({"aud": "someone-else"}))),
        key.sign(claims(json!({"iss": null}))),
        key.sign(claims(json!({"exp": 1000}))),
        impostor.sign(claims(json!({}))),
        unknown.sign(claims(json!({}))),
        confused,
    ] {
        assert_eq!(status_with(&app, &token).await, 401, "{token}");
    }
}

#[tokio::test]
async fn a_rotated_key_set_is_fetched_again_for_a_new_kid() {
    let old = SigningKey::generate("old");
    let new = SigningKey::generate("new");
    let (server, url) = KeyServer::start(&[&old]).await;
    let app = app_with_jwks(&url, |auth| auth.jwks_min_refresh_secs = 1).await;
    assert_eq!(status_with(&app, &old.sign(claims(json!({})))).await, 200);

    server.serve(&[&new]);

    // The set is fetched again once a second has passed since the last fetch.
    until_status(
        &app,
        &new.sign(claims(json!({}))),
        200,
        "the new key was never fetched",
    )
    .await;
    assert_eq!(
        status_with(&app, &old.sign(claims(json!({})))).await,
        401,
        "the old key is gone"
    );
}

#[tokio::test]
async fn with_an_identity_provider_and_no_secret_hs256_is_off() {
    let key = SigningKey::generate("k1");
    let (_server, url) = KeyServer::start(&[&key]).await;
    let app = spawn_app_with(move |c| {
        c.auth.jwt_secret = None;
        c.auth.jwks_url = Some(url);
        c.auth.issuer = Some(ISSUER.into());
        c.auth.audience = Some(AUDIENCE.into());
    })
    .await;

    assert_eq!(status_with(&app, &key.sign(claims(json!({})))).await, 200);
    // Signed with the test suite's secret: the server must not have made one up and use it.
    assert_eq!(status_with(&app, &app.token("alice")).await, 401);
}

#[tokio::test]
async fn a_key_set_too_large_to_be_real_is_not_used() {
    let key = SigningKey::generate("k1");
    let mut padded = key.jwk.clone();
    padded["x5c"] = json!(["A".repeat(300 * 1024)]);
    let (server, url) = KeyServer::start(&[]).await;
    *server.keys.lock().unwrap() = json!({ "keys": [padded] });
    let app = app_with_jwks(&url, |_| {}).await;

    assert_eq!(status_with(&app, &key.sign(claims(json!({})))).await, 401);
    assert_eq!(server.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unknown_key_ids_refresh_the_set_at_most_once_a_minute() {
    let key = SigningKey::generate("k1");
    let (server, url) = KeyServer::start(&[&key]).await;
    let app = app_with_jwks(&url, |_| {}).await;
    assert_eq!(status_with(&app, &key.sign(claims(json!({})))).await, 200);
    assert_eq!(server.fetches.load(Ordering::SeqCst), 1);

    for n in 0..5 {
        let made_up = SigningKey::generate(&format!("made-up-{n}"));
        assert_eq!(
            status_with(&app, &made_up.sign(claims(json!({})))).await,
            401
        );
    }

    assert_eq!(server.fetches.load(Ordering::SeqCst), 1, "no refresh storm");
}

#[tokio::test]
async fn cognito_access_tokens_are_checked_by_client_id_and_token_use() {
    let key = SigningKey::generate("k1");
    let (_server, url) = KeyServer::start(&[&key]).await;
    let app = app_with_jwks(&url, |auth| {
        auth.audience = None;
        auth.client_id = Some("app-client-1".into());
        auth.token_use = Some("access".into());
    })
    .await;
    let access = |extra: Value| {
        let mut base = json!({"aud": null, "client_id": "app-client-1", "token_use": "access"});
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        key.sign(claims(base))
    };

    assert_eq!(status_with(&app, &access(json!({}))).await, 200);
    assert_eq!(
        status_with(&app, &access(json!({"client_id": "another-app"}))).await,
        401
    );
    assert_eq!(
        status_with(&app, &access(json!({"token_use": "id"}))).await,
        401
    );
}

#[tokio::test]
async fn a_key_withdrawn_from_the_set_stops_counting_once_the_set_is_old() {
    let kept = SigningKey::generate("kept");
    let withdrawn = SigningKey::generate("withdrawn");
    let (server, url) = KeyServer::start(&[&kept, &withdrawn]).await;
    let app = app_with_jwks(&url, |auth| {
        auth.jwks_max_age_secs = 1;
        auth.jwks_min_refresh_secs = 1;
    })
    .await;
    assert_eq!(
        status_with(&app, &withdrawn.sign(claims(json!({})))).await,
        200
    );

    server.serve(&[&kept]);

    // No unknown kid ever asks for a refresh: the set's age alone makes it fetched again.
    let token = withdrawn.sign(claims(json!({})));
    until_status(&app, &token, 401, "the withdrawn key was trusted forever").await;
    assert_eq!(status_with(&app, &kept.sign(claims(json!({})))).await, 200);
}
