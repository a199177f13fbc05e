//! Who is calling: JSON Web Tokens, HS256 with the configured secret, and RS256 / ES256 from an
//! identity provider's key set when `[auth] jwks_url` is set ([`jwks`]). Knows nothing of
//! HTTP; `http::extract` finds the token.
//!
//! Each validation is pinned to one algorithm and built by us, never from the token's own header,
//! so `alg: none` and algorithm-confusion tokens fail like any forgery.

mod crypto;
pub mod jwks;
pub mod tickets;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The authenticated user: the token's `sub`, and whether its claims carry the operator role
/// (`[auth] admin_role`). Two tokens of one user are the same user, whatever their roles.
#[derive(Debug, Clone)]
pub struct UserId {
    sub: String,
    admin: bool,
}

impl PartialEq for UserId {
    fn eq(&self, other: &Self) -> bool {
        self.sub == other.sub
    }
}

impl Eq for UserId {}

impl std::hash::Hash for UserId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.sub.hash(state);
    }
}

impl UserId {
    pub fn as_str(&self) -> &str {
        &self.sub
    }

    /// The token carried the configured operator role: it may read every user's usage.
    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// A user named by a trusted record (a ticket this server issued), not by a request. Such
    /// a record carries no roles.
    pub(crate) fn from_trusted(sub: String) -> Self {
        UserId { sub, admin: false }
    }
}

/// Which claim names a token's roles, and which role is the operator's.
#[derive(Debug, Clone)]
pub struct AdminRole {
    pub claim: String,
    pub role: String,
}

impl AdminRole {
    /// Whether `claims` grant the role: the claim is a list of roles (`"roles": ["admin"]`,
    /// Cognito's `cognito:groups`) or one string of them separated by spaces or commas.
    fn granted(&self, claims: &serde_json::Map<String, serde_json::Value>) -> bool {
        match claims.get(&self.claim) {
            Some(serde_json::Value::Array(roles)) => {
                roles.iter().any(|r| r.as_str() == Some(self.role.as_str()))
            }
            Some(serde_json::Value::String(roles)) => {
                roles.split([' ', ',']).any(|r| r == self.role)
            }
            _ => false,
        }
    }
}

/// Why a request is not authenticated. What a client is told is the variant's plain message; the
/// detail of an invalid token (which check failed, the JWT library's own words) is for the log.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token has expired")]
    Expired,
    #[error("invalid token")]
    Invalid(String),
    #[error("the stream ticket is unknown, used or expired")]
    BadTicket,
}

impl AuthError {
    /// What went wrong, for the log only.
    pub fn detail(&self) -> &str {
        match self {
            AuthError::Invalid(detail) => detail,
            AuthError::Missing => "no token",
            AuthError::Expired => "expired",
            AuthError::BadTicket => "bad ticket",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    /// Every other claim (the roles among them).
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    other: serde_json::Map<String, serde_json::Value>,
}

/// What a verified token says about its user.
pub(crate) struct Verified {
    pub sub: String,
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Verifies tokens: HS256 with the shared secret (unless an identity provider is the only
/// issuer), RS256 / ES256 from the identity provider's key set when one is configured.
#[derive(Clone)]
pub struct Authenticator {
    hs256: Option<Hs256>,
    jwks: Option<std::sync::Arc<crate::auth::jwks::JwksVerifier>>,
    admin: Option<std::sync::Arc<AdminRole>>,
}

/// The shared-secret half: what `mangoo token` issues.
#[derive(Clone)]
struct Hs256 {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Authenticator {
    pub fn hs256(secret: &[u8]) -> Self {
        install_crypto_provider();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        Self {
            hs256: Some(Hs256 {
                encoding: EncodingKey::from_secret(secret),
                decoding: DecodingKey::from_secret(secret),
                validation,
            }),
            jwks: None,
            admin: None,
        }
    }

    /// Only the identity provider's tokens: with a key set and no configured secret, there is
    /// no HS256 at all (a generated secret would be a second, unmanaged way in).
    pub fn jwks_only(jwks: crate::auth::jwks::JwksVerifier) -> Self {
        install_crypto_provider();
        Self {
            hs256: None,
            jwks: Some(std::sync::Arc::new(jwks)),
            admin: None,
        }
    }

    /// Tokens whose claims carry this role are the operator's.
    pub fn with_admin_role(mut self, admin: AdminRole) -> Self {
        self.admin = Some(std::sync::Arc::new(admin));
        self
    }

    /// Also accept RS256 / ES256 tokens signed by the identity provider's key set.
    pub fn with_jwks(mut self, jwks: crate::auth::jwks::JwksVerifier) -> Self {
        self.jwks = Some(std::sync::Arc::new(jwks));
        self
    }

    /// The token's user. The header only routes the token to a verifier; each verifier then
    /// insists on its own algorithm.
    pub async fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(decode_error)?;
        let verified = match (header.alg, &self.jwks) {
            (Algorithm::RS256 | Algorithm::ES256, Some(jwks)) => {
                jwks.verify(token, &header).await?
            }
            _ => return self.verify_hs256(token),
        };
        self.user_id(verified)
    }

    /// HS256 with the shared secret: what `mangoo token` issues.
    pub fn verify_hs256(&self, token: &str) -> Result<UserId, AuthError> {
        let hs256 = self.hs256.as_ref().ok_or_else(|| {
            AuthError::Invalid("HS256 is off: only the identity provider's tokens count".into())
        })?;
        let data = jsonwebtoken::decode::<Claims>(token, &hs256.decoding, &hs256.validation)
            .map_err(decode_error)?;
        self.user_id(Verified {
            sub: data.claims.sub,
            other: data.claims.other,
        })
    }

    fn user_id(&self, verified: Verified) -> Result<UserId, AuthError> {
        let sub = verified.sub;
        if sub.trim().is_empty() || sub.len() > 256 {
            return Err(AuthError::Invalid("sub must be 1 to 256 bytes".into()));
        }
        let admin = self
            .admin
            .as_ref()
            .is_some_and(|admin| admin.granted(&verified.other));
        Ok(UserId { sub, admin })
    }

    pub fn has_hs256(&self) -> bool {
        self.hs256.is_some()
    }

    /// A token for `sub`, signed with the shared secret; `None` when HS256 is off.
    pub fn issue(&self, sub: &str, ttl: Duration) -> Option<String> {
        let hs256 = self.hs256.as_ref()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: sub.to_owned(),
            exp: now + ttl.as_secs(),
            iat: Some(now),
            other: serde_json::Map::new(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &hs256.encoding).ok()
    }
}

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// jsonwebtoken needs a process-wide crypto backend; installing twice is harmless.
pub(crate) fn install_crypto_provider() {
    let _ = crypto::RING_PROVIDER.install_default();
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
        let token = auth.issue("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&token).await.unwrap().as_str(), "alice");
    }

    #[tokio::test]
    async fn other_secrets_and_alg_none_are_rejected() {
        let auth = Authenticator::hs256(b"0123456789abcdef0123456789abcdef");
        let other = Authenticator::hs256(b"another-secret-another-secret-xx");
        assert!(
            auth.verify(&other.issue("alice", Duration::from_secs(60)).unwrap())
                .await
                .is_err()
        );
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64(br#"{"sub":"alice","exp":99999999999}"#);
        assert!(auth.verify(&format!("{header}.{claims}.")).await.is_err());
    }

    #[tokio::test]
    async fn tokens_not_yet_valid_are_rejected() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let auth = Authenticator::hs256(secret);
        let far_future = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let claims = serde_json::json!({"sub": "alice", "exp": far_future + 60, "nbf": far_future});
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap();
        assert!(auth.verify(&token).await.is_err());
    }

    #[tokio::test]
    async fn failures_tell_the_client_nothing_of_the_library() {
        let auth = Authenticator::hs256(b"0123456789abcdef0123456789abcdef");
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let err = auth.verify(&format!("{header}.e30.")).await.unwrap_err();
        assert_eq!(err.to_string(), "invalid token");
        assert!(!err.detail().is_empty());
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("0s").is_err());
    }
}
