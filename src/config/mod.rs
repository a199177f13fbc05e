//! Configuration: a TOML file, then the environment on top, validated as a whole before anything
//! starts. Layered with figment: every key can be set as `MANGOO_<SECTION>__<KEY>` (nested
//! sections joined by `__`, e.g. `MANGOO_PROVIDERS__LOCAL__QUEUE_SIZE=4`), as container platforms
//! configure services; the older short names (`MANGOO_BIND`, `MANGOO_DATABASE_URL`, ...) still
//! work and win over both.
//!
//! Every failure names the offending key (`server.bind: ...`) and, for a bad value from the
//! environment, its variable, so an operator can fix a deploy from the error alone. Secrets live
//! in [`Secret`], whose `Debug` never prints them.

mod providers;
mod validate;

pub use providers::{AnthropicConfig, BedrockConfig, LocalConfig, OpenAiConfig, ProvidersConfig};
pub use validate::{MIN_SECRET_BYTES, parse_cidr};

use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

/// Environment variables that configure Mangoo start with this.
pub const ENV_PREFIX: &str = "MANGOO_";

/// Every problem figment found, each with its key and where the value came from: the
/// environment variable to fix, or the file.
fn describe(error: figment::Error, file: Option<&str>) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            let origin = if from_env {
                let parts: Vec<String> = e.path.iter().map(|p| p.to_uppercase()).collect();
                format!(" (from {ENV_PREFIX}{})", parts.join("__"))
            } else {
                file.map(|f| format!(" (in {f})")).unwrap_or_default()
            };
            match key.is_empty() {
                true => format!("{}{origin}", e.kind),
                false => format!("{key}: {}{origin}", e.kind),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The whole configuration, as read from `mangoo.toml` plus the environment.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub rate_limit: RateLimitConfig,
    pub metrics: MetricsConfig,
    pub streams: StreamsConfig,
    pub auth: AuthConfig,
    pub cors: CorsConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub quotas: QuotasConfig,
    pub providers: ProvidersConfig,
    pub bots: Vec<BotConfig>,
}

/// What one user may store, and how much of a chat goes back to the model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasConfig {
    pub max_chats_per_user: u64,
    /// Bytes of message text over all of a user's chats.
    pub max_bytes_per_user: u64,
    pub max_turns_per_chat: u64,
    /// Characters of earlier turns sent to the provider with each new message (the latest turns
    /// that fit; the rest stay stored).
    pub max_history_chars: usize,
}

impl Default for QuotasConfig {
    fn default() -> Self {
        Self {
            max_chats_per_user: 1000,
            max_bytes_per_user: 50 * 1024 * 1024,
            max_turns_per_chat: 500,
            max_history_chars: 100_000,
        }
    }
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
    /// An SSE comment (`: ping`) goes out whenever a stream was quiet this long; 0 turns it off.
    pub heartbeat_secs: u64,
    /// On SIGTERM, how long running streams may go on before they are ended.
    pub drain_secs: u64,
    /// HTTPS on the main listener (ALPN h2 and http/1.1) instead of cleartext.
    pub tls: Option<TlsConfig>,
    /// Client connections open at once; past it new ones are closed on accept.
    pub max_connections: usize,
    /// Client connections one address may hold (trusted proxies are exempt).
    pub max_connections_per_address: usize,
    /// A connection with no request in flight (an open stream counts) is closed after this.
    pub idle_timeout_secs: u64,
    /// Connections the kernel may queue before they are accepted: a burst of clients connecting
    /// at once waits here instead of retrying its SYN (a second later). Linux caps it at
    /// `net.core.somaxconn`.
    pub listen_backlog: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0:8000".into(),
            trusted_proxies: Vec::new(),
            max_body_bytes: 1024 * 1024,
            max_message_chars: 32 * 1024,
            heartbeat_secs: 15,
            drain_secs: 30,
            tls: None,
            max_connections: 10_000,
            max_connections_per_address: 256,
            // Longer than load balancers' own idle timeout (60 s on ALB), so it is always the
            // balancer that closes a pooled connection, never Mangoo under a request in transit.
            idle_timeout_secs: 75,
            listen_backlog: 4096,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained requests per second, per user (or per client address when unauthenticated).
    pub requests_per_second: f64,
    /// Requests allowed at once on top of the sustained rate.
    pub burst: u32,
    /// Streams one user may have open at once.
    pub max_concurrent_streams: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 100.0,
            burst: 200,
            max_concurrent_streams: 4,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// When set, `/metrics` wants `Authorization: Bearer <this>`.
    pub bearer_token: Option<Secret>,
    /// When set, `/metrics` is served on this address instead of the main listener.
    pub listen: Option<String>,
    /// Every this many seconds, one log line (target `mangoo::gauges`) with the open streams and
    /// connections, for log-based metrics (CloudWatch metric filters); 0 = off.
    pub log_gauges_secs: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, the request's `request_id` and `user_id` as fields.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Seconds a target may take to send its first token before the next target is tried (or
    /// the stream ends with `upstream_first_token_timeout`).
    pub first_token_timeout_secs: u64,
    /// Seconds the provider may stay silent between two tokens.
    pub idle_timeout_secs: u64,
    /// Longest an answer may stream in all.
    pub max_stream_secs: u64,
    /// What a client's disconnect does to its answer.
    pub on_disconnect: DisconnectPolicy,
    /// Under "cancel": how long an answer goes on after its last listener left, for a reloaded
    /// page or a phone back from a tunnel to pick it up; cancelled only if nobody came back in
    /// that time. 0 cancels at once.
    pub disconnect_grace_secs: u64,
    /// Sent as the SSE `retry:` hint on the first event: how soon EventSource reconnects.
    pub retry_ms: u64,
    /// A client that takes no data for this long (its connection stuck with a full window, or
    /// gone without a word) is dropped: its answer ends as interrupted, or goes on under
    /// "continue". 0 leaves it to the operating system.
    pub stalled_client_secs: u64,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            first_token_timeout_secs: 60,
            idle_timeout_secs: 60,
            max_stream_secs: 600,
            on_disconnect: DisconnectPolicy::Cancel,
            disconnect_grace_secs: 30,
            retry_ms: 2000,
            stalled_client_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DisconnectPolicy {
    /// Stop the provider once nobody listens (after `disconnect_grace_secs`) and store the
    /// partial answer.
    Cancel,
    /// Generate to the end in the background, for a client that comes back.
    Continue,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret. When absent, `mangoo serve` generates one for this run only.
    pub jwt_secret: Option<Secret>,
    /// An identity provider's JSON Web Key Set: RS256 / ES256 tokens it signed are accepted too.
    pub jwks_url: Option<String>,
    /// Required `iss` of JWKS tokens.
    pub issuer: Option<String>,
    /// Required `aud` of JWKS tokens.
    pub audience: Option<String>,
    /// Cognito: the app client; checked against `client_id` (access tokens have no `aud`).
    pub client_id: Option<String>,
    /// Cognito: required `token_use` ("access" or "id").
    pub token_use: Option<String>,
    /// The key set is fetched again for an unknown key id at most this often.
    pub jwks_min_refresh_secs: u64,
    /// Keys older than this are fetched again before use, so withdrawn keys stop counting.
    pub jwks_max_age_secs: u64,
    /// The operator's role: tokens whose `roles_claim` holds it may read every user's usage
    /// (`GET /api/v1/admin/usage`). None: nobody may.
    pub admin_role: Option<String>,
    /// The claim that lists a token's roles: an array of strings, or one string of them
    /// separated by spaces or commas (Cognito: `cognito:groups`).
    pub roles_claim: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwks_url: None,
            issuer: None,
            audience: None,
            client_id: None,
            token_use: None,
            jwks_min_refresh_secs: 60,
            jwks_max_age_secs: 3600,
            admin_role: None,
            roles_claim: "roles".into(),
        }
    }
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
    /// `sqlite://file.db` (the default) or `postgres://user:pass@host:5432/db`.
    pub url: String,
    /// PostgreSQL: connections kept at most by this instance (SQLite has its own fixed layout).
    pub max_connections: u32,
    /// PostgreSQL: how long a request waits for a free connection before it fails.
    pub acquire_timeout_secs: u64,
    /// PostgreSQL: the password, when it is kept out of the URL (e.g. injected from a secrets
    /// manager as `MANGOO_DATABASE__PASSWORD`); it replaces any password the URL has.
    pub password: Option<Secret>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://mangoo.db".into(),
            max_connections: 16,
            acquire_timeout_secs: 5,
            password: None,
        }
    }
}

impl DatabaseConfig {
    pub fn is_postgres(&self) -> bool {
        self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")
    }
}

/// Shared state for several instances: set `url` and every instance pointed at the same Redis
/// (and the same PostgreSQL) behaves as one server. Unset: everything live stays in-process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:6379/0`, `rediss://` for TLS; `None` keeps live state in this process.
    /// `redis+cluster://` / `rediss+cluster://` is the same as `cluster = true`.
    pub url: Option<String>,
    /// The URL names one node (or the configuration endpoint) of a Redis Cluster: ElastiCache
    /// or Valkey Serverless, cluster-mode-enabled groups. The client learns the slots from it.
    pub cluster: bool,
    /// Every key Mangoo writes starts with this, so instances of different deployments (or
    /// tests) can share one Redis.
    pub key_prefix: String,
    /// Connections reserved for blocking reads of other instances' answers (one per listener
    /// following an answer generated elsewhere); past this, such listeners poll.
    pub max_blocking_readers: usize,
    /// How long an ended answer's keys (its events and its owner hash) stay in Redis, for
    /// listeners still reading its end and clients resuming it by `Last-Event-ID`; after that a
    /// resume replays it from the database. A deleted chat's keys go at once.
    pub keep_ended_secs: u64,
    /// The ACL user (`AUTH username password`); `None`: the URL's, else the default user.
    pub username: Option<String>,
    /// The AUTH token or the user's password, kept out of the URL so it can come from a secret
    /// (`MANGOO_REDIS__PASSWORD`); `None`: the URL's, if any.
    pub password: Option<Secret>,
}

impl RedisConfig {
    /// The URL the client opens and whether it names a cluster (`+cluster` taken off).
    pub fn endpoint(&self) -> Option<(String, bool)> {
        let url = self.url.as_deref()?;
        for scheme in ["redis", "rediss"] {
            if let Some(rest) = url.strip_prefix(&format!("{scheme}+cluster://")) {
                return Some((format!("{scheme}://{rest}"), true));
            }
        }
        Some((url.to_owned(), self.cluster))
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            cluster: false,
            key_prefix: "mangoo".into(),
            max_blocking_readers: 256,
            keep_ended_secs: 60,
            username: None,
            password: None,
        }
    }
}

/// One bot: what users pick with `bot_id`. Either one `provider` + `model`, or `targets` tried in
/// order until one starts answering.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotConfig {
    pub id: String,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    /// Bedrock region for the single-target form.
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
}

/// One provider and model a bot may answer with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub provider: String,
    pub model: String,
    /// Bedrock only: overrides `[providers.bedrock] region`.
    #[serde(default)]
    pub region: Option<String>,
}

impl BotConfig {
    /// The targets in order, whichever form the bot was written in.
    pub fn targets(&self) -> Vec<TargetConfig> {
        match (&self.provider, &self.model) {
            (Some(provider), Some(model)) => vec![TargetConfig {
                provider: provider.clone(),
                model: model.clone(),
                region: self.region.clone(),
            }],
            _ => self.targets.clone(),
        }
    }
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
    /// The file or the environment does not fit the configuration's shape.
    #[error("invalid configuration: {0}")]
    Parse(String),
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
pub const KNOWN_PROVIDERS: &[&str] = &["bedrock", "local", "anthropic", "openai"];

impl Config {
    /// Reads the file (if any), applies the process environment and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            // Read here rather than by figment: a named file that is missing is an error.
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            figment = figment.merge(Toml::string(&text));
        }
        let mut figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        // The bots are a top-level list, so they have no `SECTION__KEY` form: `MANGOO_BOTS` holds
        // them as a TOML array of inline tables (how a container platform passes them).
        if let Ok(bots) = std::env::var("MANGOO_BOTS") {
            figment = figment.merge(Toml::string(&format!("bots = {bots}")));
        }
        let file = path.map(|p| p.display().to_string());
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Parse(describe(e, file.as_deref())))?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        config.with_env(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| describe(e, None))
    }

    /// Applies the short `MANGOO_*` names of earlier releases (they win over the file and the
    /// `MANGOO_<SECTION>__<KEY>` form), then validates.
    pub fn with_env<'a>(
        mut self,
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        for (key, value) in env {
            match key {
                "MANGOO_BIND" => self.server.bind = value.to_owned(),
                "MANGOO_DATABASE_URL" => self.database.url = value.to_owned(),
                "MANGOO_REDIS_URL" => {
                    self.redis.url = (!value.is_empty()).then(|| value.to_owned());
                }
                "MANGOO_REDIS_CLUSTER" => self.redis.cluster = matches!(value, "1" | "true"),
                "MANGOO_JWT_SECRET" => self.auth.jwt_secret = Some(Secret::new(value)),
                "MANGOO_LOCAL_MODEL" if !value.is_empty() => {
                    self.providers.local.model_path = Some(PathBuf::from(value));
                }
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
    // Jail's closure type is figment's, error size included.
    #[allow(clippy::result_large_err)]
    fn every_key_can_come_from_the_environment_and_the_short_names_still_work() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("m.toml", "[server]\nheartbeat_secs = 5\ndrain_secs = 9\n")?;
            jail.set_env("MANGOO_SERVER__HEARTBEAT_SECS", "7");
            jail.set_env("MANGOO_STREAMS__ON_DISCONNECT", "continue");
            jail.set_env("MANGOO_PROVIDERS__LOCAL__QUEUE_SIZE", "3");
            jail.set_env("MANGOO_SERVER__TRUSTED_PROXIES", "[\"10.0.0.0/8\"]");
            jail.set_env(
                "MANGOO_AUTH__JWT_SECRET",
                "generic-form-secret-generic-form-secret",
            );
            jail.set_env("MANGOO_BIND", "127.0.0.1:9");
            jail.set_env(
                "MANGOO_BOTS",
                r#"[{ id = "default", provider = "bedrock", model = "us.anthropic.claude-x" }]"#,
            );
            let config = Config::load(Some(Path::new("m.toml"))).unwrap();
            assert_eq!(config.bots.len(), 1);
            assert_eq!(
                config.bots[0].model.as_deref(),
                Some("us.anthropic.claude-x")
            );
            assert_eq!(config.server.heartbeat_secs, 7, "the environment wins");
            assert_eq!(config.server.drain_secs, 9, "the file still counts");
            assert_eq!(config.streams.on_disconnect, DisconnectPolicy::Continue);
            assert_eq!(config.providers.local.queue_size, 3);
            assert_eq!(config.server.trusted_proxies, ["10.0.0.0/8"]);
            assert_eq!(config.server.bind, "127.0.0.1:9");
            assert_eq!(
                config.auth.jwt_secret.unwrap().expose(),
                "generic-form-secret-generic-form-secret"
            );

            jail.set_env("MANGOO_SERVER__HEARTBEAT_SECS", "often");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("MANGOO_SERVER__HEARTBEAT_SECS"), "{err}");
            jail.set_env("MANGOO_SERVER__HEARTBEAT_SECS", "7");
            jail.set_env("MANGOO_SERVER__BINDD", "x");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("bindd"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_local_models_thread_count_is_bounded() {
        let secret = "[auth]\njwt_secret = \"0123456789abcdef0123456789abcdef\"\n";
        let check = |threads: usize| {
            let toml = format!("{secret}[providers.local]\nthreads = {threads}\n");
            let config = Config::from_toml(&toml).unwrap();
            assert_eq!(config.providers.local.threads, threads);
            config.validate()
        };
        check(0).unwrap();
        check(2).unwrap();
        let err = check(100_000).unwrap_err().to_string();
        assert!(err.starts_with("providers.local.threads:"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::from_toml("[server]\nbindd = \"x\"\n").unwrap_err();
        assert!(err.contains("bindd"), "{err}");
    }

    #[test]
    fn database_and_redis_urls_are_checked_by_their_clients_and_errors_name_the_key() {
        let secret = "[auth]\njwt_secret = \"0123456789abcdef0123456789abcdef\"\n";
        let check = |toml: &str| {
            Config::from_toml(&format!("{secret}{toml}"))
                .unwrap()
                .validate()
        };
        for (toml, key) in [
            (
                "[database]\nurl = \"postgres://u@host:notaport/db\"\n",
                "database.url:",
            ),
            ("[database]\nurl = \"mysql://host/db\"\n", "database.url:"),
            ("[redis]\nurl = \"http://host:6379\"\n", "redis.url:"),
            ("[redis]\nurl = \"redis://host:notaport/0\"\n", "redis.url:"),
        ] {
            let err = check(toml).unwrap_err().to_string();
            assert!(err.starts_with(key), "{toml}: {err}");
        }
        let ok = "[database]\nurl = \"postgresql://u:p@db:5432/mangoo\"\n\
                  [redis]\nurl = \"rediss://cache:6380/1\"\n";
        check(ok).unwrap();
        let err = check("[database]\nurl = \"sqlite://m.db\"\npassword = \"p\"\n").unwrap_err();
        assert!(err.to_string().starts_with("database.password:"), "{err}");
        check("[database]\nurl = \"postgres://u@db/m\"\npassword = \"p\"\n").unwrap();
        // No secret with Redis is allowed (a warning at start): development mode still starts.
        Config::from_toml("[redis]\nurl = \"redis://cache:6379/0\"\n")
            .unwrap()
            .validate()
            .unwrap();
        let env = Config::default()
            .with_env([
                ("MANGOO_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("MANGOO_REDIS_URL", "redis://cache:6379/0"),
                ("MANGOO_DATABASE_URL", "postgres://u@db/mangoo"),
            ])
            .unwrap();
        assert_eq!(env.redis.url.as_deref(), Some("redis://cache:6379/0"));
        assert!(env.database.is_postgres());
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
    fn limits_must_be_positive() {
        for toml in [
            "[streams]\nidle_timeout_secs = 0\n",
            "[streams]\nmax_stream_secs = 0\n",
            "[rate_limit]\nburst = 0\n",
            "[rate_limit]\nrequests_per_second = 0.0\n",
            "[metrics]\nlisten = \"nope\"\n",
        ] {
            let err = Config::from_toml(toml).unwrap().validate().unwrap_err();
            let key = toml.lines().nth(1).unwrap().split(' ').next().unwrap();
            assert!(err.to_string().contains(key), "{toml} -> {err}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let config = Config::default()
            .with_env([(
                "MANGOO_JWT_SECRET",
                "hunter2-hunter2-hunter2-hunter2-hunter2",
            )])
            .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn auth_settings_that_would_let_strangers_in_are_refused() {
        let cases = [
            ("[auth]\njwt_secret = \"short\"\n", "auth.jwt_secret"),
            (
                "[auth]\njwks_url = \"http://idp.example/jwks\"\nissuer = \"i\"\naudience = \"a\"\n",
                "auth.jwks_url",
            ),
            (
                "[auth]\njwks_url = \"https://idp.example/jwks\"\naudience = \"a\"\n",
                "auth.issuer",
            ),
            (
                "[auth]\njwks_url = \"https://idp.example/jwks\"\nissuer = \"i\"\n",
                "auth.audience",
            ),
            (
                "[auth]\njwks_min_refresh_secs = 0\n",
                "auth.jwks_min_refresh_secs",
            ),
        ];
        for (toml, key) in cases {
            let err = Config::from_toml(toml).unwrap().validate().unwrap_err();
            assert!(err.to_string().starts_with(key), "{toml} -> {err}");
        }
        for ok in [
            "[auth]\njwks_url = \"http://127.0.0.1:9/jwks\"\nissuer = \"i\"\nclient_id = \"c\"\n",
            "[auth]\njwks_url = \"http://[::1]:9/jwks\"\nissuer = \"i\"\naudience = \"a\"\n",
            "[auth]\njwks_url = \"https://idp.example/jwks\"\nissuer = \"i\"\naudience = \"a\"\n",
        ] {
            Config::from_toml(ok).unwrap().validate().unwrap();
        }
        assert!(!validate::is_loopback_http(
            "http://127.0.0.1.evil.example/jwks"
        ));
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
