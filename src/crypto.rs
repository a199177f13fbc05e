//! One crypto library for the whole binary: ring. TLS (our listener, reqwest's upstream clients,
//! the AWS SDK's client) and JWT signatures all run on it; aws-lc, the other choice, is a long C
//! build that a first `cargo build` would pay for twice over (see the README's "First build").

/// Makes ring the process's default for rustls (reqwest, built with `rustls-no-provider`, takes
/// the default when a client is built) and for jsonwebtoken. Idempotent and cheap: every place
/// that builds an HTTP client or checks a token calls it first.
pub fn install_default_providers() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    crate::auth::install_crypto_provider();
}
