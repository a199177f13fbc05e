//! Who is calling: JSON Web Tokens, HS256 with the configured secret, and RS256 / ES256 from an
//! identity provider's key set when `[auth] jwks_url` is set ([`crate::jwks`]). Knows nothing of
//! HTTP; `http::extract` finds the token.
//!
//! Each validation is pinned to one algorithm and built by us, never from the token's own header,
//! so `alg: none` and algorithm-confusion tokens fail like any forgery.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The authenticated user: the token's `sub`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Verifies and (for development and scripts) issues tokens with one shared secret.
#[derive(Clone)]
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    jwks: Option<std::sync::Arc<crate::jwks::JwksVerifier>>,
}

impl Authenticator {
    pub fn hs256(secret: &[u8]) -> Self {
        // jsonwebtoken needs a process-wide crypto backend; installing twice is harmless.
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            jwks: None,
        }
    }

    /// Also accept RS256 / ES256 tokens signed by the identity provider's key set.
    pub fn with_jwks(mut self, jwks: crate::jwks::JwksVerifier) -> Self {
        self.jwks = Some(std::sync::Arc::new(jwks));
        self
    }

    /// The token's user. The header only routes the token to a verifier; each verifier then
    /// insists on its own algorithm.
    pub async fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(decode_error)?;
        let sub = match (header.alg, &self.jwks) {
            (Algorithm::RS256 | Algorithm::ES256, Some(jwks)) => {
                jwks.verify(token, &header).await?
            }
            _ => return self.verify_hs256(token),
        };
        user_id(sub)
    }

    /// HS256 with the shared secret: what `mangoo token` issues.
    pub fn verify_hs256(&self, token: &str) -> Result<UserId, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(decode_error)?;
        user_id(data.claims.sub)
    }

    pub fn issue(&self, sub: &str, ttl: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: sub.to_owned(),
            exp: now + ttl.as_secs(),
            iat: Some(now),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding of plain claims cannot fail")
    }
}

fn user_id(sub: String) -> Result<UserId, AuthError> {
    if sub.trim().is_empty() || sub.len() > 256 {
        return Err(AuthError::Invalid("sub must be 1 to 256 bytes".into()));
    }
    Ok(UserId(sub))
}

pub(crate) fn decode_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
        _ => AuthError::Invalid(e.to_string()),
    }
}

/// A fresh random secret for a run that configured none (48 bytes, URL-safe base64).
pub fn random_secret() -> String {
    use base64::Engine;
    let bytes: [u8; 48] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Parses `90s`, `15m`, `1h`, `7d` or plain seconds.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 90s, 15m, 1h or 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("'{text}' has an unknown unit (use s, m, h or d)")),
    };
    if secs == 0 {
        return Err("the ttl must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[tokio::test]
    async fn issued_tokens_verify() {
        let auth = Authenticator::hs256(b"0123456789abcdef0123456789abcdef");
        let token = auth.issue("alice", Duration::from_secs(60));
        assert_eq!(auth.verify(&token).await.unwrap().as_str(), "alice");
    }

    #[tokio::test]
    async fn other_secrets_and_alg_none_are_rejected() {
        let auth = Authenticator::hs256(b"0123456789abcdef0123456789abcdef");
        let other = Authenticator::hs256(b"another-secret-another-secret-xx");
        assert!(
            auth.verify(&other.issue("alice", Duration::from_secs(60)))
                .await
                .is_err()
        );
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64(br#"{"sub":"alice","exp":99999999999}"#);
        assert!(auth.verify(&format!("{header}.{claims}.")).await.is_err());
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("0s").is_err());
    }
}
