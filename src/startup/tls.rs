//! HTTPS with ALPN: `h2` for browsers talking straight to Mangoo (so they are not held to six
//! HTTP/1.1 connections per host, each SSE stream taking one), `http/1.1` for everyone else.
//!
//! This module loads the certificate; [`super::listener`] accepts the connections.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ConfigError;

/// Reads the certificate chain and key; every failure names the key of the file at fault.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, ConfigError> {
    let invalid = |key: &str, reason: String| ConfigError::Invalid {
        key: key.into(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            invalid(
                "server.tls.cert_file",
                format!("{}: {e}", cert_file.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(invalid(
            "server.tls.cert_file",
            "no certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        invalid(
            "server.tls.key_file",
            format!("{}: {e}", key_file.display()),
        )
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("server.tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            invalid(
                "server.tls.key_file",
                format!("does not fit the certificate: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
