//! Tokens from an identity provider (Cognito, Auth0, Keycloak): RS256 / ES256, checked against the
//! provider's JSON Web Key Set.
//!
//! Keys are cached by `kid`. An unknown `kid` (a rotation) triggers a refresh, at most once per
//! `jwks_min_refresh_secs`, so a stream of made-up ids cannot make us hammer the provider. Each key
//! pins its algorithm (from its `alg`, else its type): a token whose header names another
//! algorithm is refused, and symmetric (`oct`) keys in a key set are ignored, so no public key can
//! ever be used as an HMAC secret.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::Deserialize;

use crate::auth::AuthError;
use crate::config::AuthConfig;

pub struct JwksVerifier {
    url: String,
    http: reqwest::Client,
    min_refresh: Duration,
    issuer: Option<String>,
    audience: Option<String>,
    client_id: Option<String>,
    token_use: Option<String>,
    max_age: Duration,
    keys: RwLock<KeySet>,
    /// Serialises refreshes and remembers when the last one ran.
    last_refresh: tokio::sync::Mutex<Option<Instant>>,
}

/// The keys of the last successful fetch. A refresh replaces them whole, so a key the provider
/// removed stops being trusted at the next refresh.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    fetched_at: Option<Instant>,
}

/// A key set larger than this is refused: a misconfigured or hostile URL must not make us
/// buffer without end (real ones are a few kilobytes).
const MAX_KEY_SET_BYTES: usize = 256 * 1024;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    token_use: Option<String>,
    /// Every other claim (the roles among them).
    #[serde(flatten, default)]
    other: serde_json::Map<String, serde_json::Value>,
}

impl JwksVerifier {
    pub fn new(url: &str, config: &AuthConfig) -> Self {
        crate::crypto::install_default_providers();
        Self {
            url: url.to_owned(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a reqwest client with static settings builds"),
            min_refresh: Duration::from_secs(config.jwks_min_refresh_secs),
            max_age: Duration::from_secs(config.jwks_max_age_secs),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            client_id: config.client_id.clone(),
            token_use: config.token_use.clone(),
            keys: RwLock::default(),
            last_refresh: tokio::sync::Mutex::new(None),
        }
    }

    /// The token's subject, if the token is signed by a key of the set and its claims fit.
    pub(crate) async fn verify(
        &self,
        token: &str,
        header: &Header,
    ) -> Result<crate::auth::Verified, AuthError> {
        let kid = header
            .kid
            .as_deref()
            .ok_or_else(|| AuthError::Invalid("the token names no key (kid)".into()))?;
        if self.is_stale() {
            self.refresh().await;
        }
        let (key, algorithm) = match self.key(kid) {
            Some(found) => found,
            None => {
                self.refresh().await;
                self.key(kid)
                    .ok_or_else(|| AuthError::Invalid(format!("unknown key id '{kid}'")))?
            }
        };
        if header.alg != algorithm {
            return Err(AuthError::Invalid(
                "the token's algorithm is not its key's".into(),
            ));
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &self.validation(algorithm))
            .map_err(crate::auth::decode_error)?
            .claims;
        self.check_cognito(&claims)?;
        Ok(crate::auth::Verified {
            sub: claims.sub,
            other: claims.other,
        })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = crate::auth::LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Cognito access tokens carry no `aud`; client_id is checked instead.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// Cognito: ID tokens name the app client in `aud`, access tokens in `client_id`.
    fn check_cognito(&self, claims: &Claims) -> Result<(), AuthError> {
        if let Some(expected) = &self.token_use
            && claims.token_use.as_deref() != Some(expected.as_str())
        {
            return Err(AuthError::Invalid(format!(
                "token_use must be '{expected}'"
            )));
        }
        if let Some(expected) = &self.client_id
            && self.audience.is_none()
            && claims.client_id.as_deref() != Some(expected.as_str())
        {
            return Err(AuthError::Invalid("the token is for another client".into()));
        }
        Ok(())
    }

    fn key(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        self.keys.read().ok()?.keys.get(kid).cloned()
    }

    /// Never fetched, or fetched longer ago than `jwks_max_age_secs`: keys are re-read even when
    /// every token names a known one, so a key the provider withdrew stops working.
    fn is_stale(&self) -> bool {
        self.keys
            .read()
            .map(|set| set.fetched_at.is_none_or(|at| at.elapsed() >= self.max_age))
            .unwrap_or(true)
    }

    /// Fetches the key set again, unless that was done less than `min_refresh` ago.
    async fn refresh(&self) {
        let mut last = self.last_refresh.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.min_refresh) {
            return;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "JWKS refreshed");
                if let Ok(mut set) = self.keys.write() {
                    *set = KeySet {
                        keys,
                        fetched_at: Some(Instant::now()),
                    };
                }
            }
            Err(e) => tracing::warn!("JWKS refresh failed: {e}"),
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
        let mut response = self
            .http
            .get(&self.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_KEY_SET_BYTES {
                return Err(format!(
                    "the key set is larger than {MAX_KEY_SET_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let (Some(kid), Some(algorithm)) = (&jwk.common.key_id, pinned_algorithm(jwk)) else {
                continue;
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid.clone(), (key, algorithm));
            }
        }
        Ok(keys)
    }
}

/// RS256 for RSA keys, ES256 for P-256 keys — or the key's own `alg` when it is one of those.
/// Anything else (symmetric keys above all) is not used.
fn pinned_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(by_type),
        Some(KeyAlgorithm::RS256) if by_type == Algorithm::RS256 => Some(by_type),
        Some(KeyAlgorithm::ES256) if by_type == Algorithm::ES256 => Some(by_type),
        Some(_) => None,
    }
}
