//! Configuration: a TOML file, then `MANGOO_*` environment variables on top, validated as a whole
//! before anything starts.
//!
//! Every validation failure names the offending key (`server.bind: ...`) so an operator can fix a
//! deploy from the error alone. Secrets live in [`Secret`], whose `Debug` never prints them.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Deserialize;

/// The whole configuration, as read from `mangoo.toml` plus the environment.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub cors: CorsConfig,
    pub database: DatabaseConfig,
    pub providers: ProvidersConfig,
    pub bots: Vec<BotConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on; `127.0.0.1:0` picks a free port (tests).
    pub bind: String,
    /// Peers whose X-Forwarded-For / X-Forwarded-Proto headers are believed: CIDRs or "*".
    pub trusted_proxies: Vec<String>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest accepted user message, in characters.
    pub max_message_chars: usize,
    /// Events buffered per stream between the producer and a slow client; beyond it the producer
    /// waits, which is what keeps memory per stream bounded.
    pub stream_buffer_events: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0:8000".into(),
            trusted_proxies: Vec::new(),
            max_body_bytes: 1024 * 1024,
            max_message_chars: 32 * 1024,
            stream_buffer_events: 64,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret. When absent, `mangoo serve` generates one for this run only.
    pub jwt_secret: Option<Secret>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Exact origins (`scheme://host[:port]`) allowed to call the API from a browser.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://mangoo.db".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersConfig {
    pub bedrock: Option<BedrockConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BedrockConfig {
    /// AWS region; when absent the standard AWS region chain decides.
    pub region: Option<String>,
    /// Endpoint override: VPC endpoints, local test servers.
    pub endpoint_url: Option<String>,
    /// Attempts for a request that fails before streaming (throttling, 5xx); 1 disables retries.
    pub max_attempts: u32,
    /// Seconds allowed to open the connection to Bedrock.
    pub connect_timeout_secs: u64,
}

impl Default for BedrockConfig {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            max_attempts: 3,
            connect_timeout_secs: 10,
        }
    }
}

/// One bot: what users pick with `bot_id`, bound to a provider and model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotConfig {
    pub id: String,
    pub provider: String,
    pub model: String,
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
}

fn default_max_tokens() -> u32 {
    4096
}

/// A secret string whose `Debug` and `Display` never reveal it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The providers this build knows how to talk to.
pub const KNOWN_PROVIDERS: &[&str] = &["bedrock"];

impl Config {
    /// Reads the file (if any), applies the process environment and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let config = match path {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        let env: Vec<(String, String)> = std::env::vars().collect();
        config.with_env(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Applies the `MANGOO_*` overrides (environment wins over the file), then validates.
    pub fn with_env<'a>(
        mut self,
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        for (key, value) in env {
            match key {
                "MANGOO_BIND" => self.server.bind = value.to_owned(),
                "MANGOO_DATABASE_URL" => self.database.url = value.to_owned(),
                "MANGOO_JWT_SECRET" => self.auth.jwt_secret = Some(Secret::new(value)),
                "MANGOO_ALLOWED_ORIGINS" => {
                    self.cors.allowed_origins = value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect();
                }
                _ => {}
            }
        }
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.bind_addr()?;
        for (i, proxy) in self.server.trusted_proxies.iter().enumerate() {
            if proxy != "*" {
                parse_cidr(proxy)
                    .map_err(|reason| invalid(format!("server.trusted_proxies[{i}]"), reason))?;
            }
        }
        if self.server.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024"));
        }
        if self.server.max_message_chars == 0 {
            return Err(invalid("server.max_message_chars", "must be at least 1"));
        }
        if self.server.stream_buffer_events == 0 {
            return Err(invalid("server.stream_buffer_events", "must be at least 1"));
        }
        if let Some(secret) = &self.auth.jwt_secret
            && secret.expose().is_empty()
        {
            return Err(invalid("auth.jwt_secret", "must not be empty"));
        }
        for (i, origin) in self.cors.allowed_origins.iter().enumerate() {
            validate_origin(origin)
                .map_err(|reason| invalid(format!("cors.allowed_origins[{i}]"), reason))?;
        }
        if !self.database.url.starts_with("sqlite:") {
            return Err(invalid(
                "database.url",
                "only sqlite: URLs are supported by this build (e.g. sqlite://mangoo.db)",
            ));
        }
        if let Some(bedrock) = &self.providers.bedrock {
            bedrock.validate()?;
        }
        self.validate_bots()
    }

    fn validate_bots(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for (i, bot) in self.bots.iter().enumerate() {
            let key = |field: &str| format!("bots[{i}].{field}");
            if bot.id.trim().is_empty() {
                return Err(invalid(key("id"), "must not be empty"));
            }
            if !seen.insert(bot.id.as_str()) {
                return Err(invalid(key("id"), format!("duplicate bot id '{}'", bot.id)));
            }
            if !KNOWN_PROVIDERS.contains(&bot.provider.as_str()) {
                return Err(invalid(
                    key("provider"),
                    format!(
                        "unknown provider '{}' (known: {})",
                        bot.provider,
                        KNOWN_PROVIDERS.join(", ")
                    ),
                ));
            }
            if bot.model.trim().is_empty() {
                return Err(invalid(key("model"), "must not be empty"));
            }
            if let Some(t) = bot.temperature
                && !(0.0..=2.0).contains(&t)
            {
                return Err(invalid(key("temperature"), "must be between 0 and 2"));
            }
            if bot.max_tokens == 0 {
                return Err(invalid(key("max_tokens"), "must be at least 1"));
            }
        }
        Ok(())
    }
}

impl ServerConfig {
    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.bind.parse().map_err(|_| {
            invalid(
                "server.bind",
                format!("'{}' is not an address like 0.0.0.0:8000", self.bind),
            )
        })
    }
}

impl BedrockConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(region) = &self.region
            && region.trim().is_empty()
        {
            return Err(invalid("providers.bedrock.region", "must not be empty"));
        }
        if let Some(url) = &self.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "providers.bedrock.endpoint_url",
                format!("'{url}' must start with http:// or https://"),
            ));
        }
        if self.max_attempts == 0 {
            return Err(invalid(
                "providers.bedrock.max_attempts",
                "must be at least 1",
            ));
        }
        if self.connect_timeout_secs == 0 {
            return Err(invalid(
                "providers.bedrock.connect_timeout_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Parses `10.0.0.0/8`, `::1/128` or a bare address (a /32 or /128).
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("'{text}' is not an IP address or CIDR"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("'{text}' has an invalid prefix length"))?,
        None => max,
    };
    Ok((addr, prefix))
}

fn validate_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Err(
            "a wildcard origin cannot be combined with credentials; list each origin".into(),
        );
    }
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .ok_or_else(|| format!("'{origin}' must start with http:// or https://"))?;
    if rest.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
        return Err(format!(
            "'{origin}' must be scheme://host[:port] with no path"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_the_file() {
        let config = Config::from_toml("[server]\nbind = \"127.0.0.1:1\"\n")
            .unwrap()
            .with_env([
                ("MANGOO_BIND", "127.0.0.1:2"),
                ("MANGOO_ALLOWED_ORIGINS", "http://a.test, http://b.test"),
            ])
            .unwrap();
        assert_eq!(config.server.bind, "127.0.0.1:2");
        assert_eq!(
            config.cors.allowed_origins,
            ["http://a.test", "http://b.test"]
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::from_toml("[server]\nbindd = \"x\"\n").unwrap_err();
        assert!(err.contains("bindd"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = Config::from_toml("[server]\nbind = \"nope\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().starts_with("server.bind:"), "{err}");
        let err = Config::from_toml("[[bots]]\nid = \"a\"\nprovider = \"nope\"\nmodel = \"m\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().starts_with("bots[0].provider:"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let config = Config::default()
            .with_env([("MANGOO_JWT_SECRET", "hunter2-hunter2")])
            .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(
            parse_cidr("10.0.0.0/8").unwrap(),
            ("10.0.0.0".parse().unwrap(), 8)
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nope").is_err());
    }
}
