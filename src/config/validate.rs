//! Validation of a loaded [`Config`]: every failure names its key, so an operator can fix a
//! deploy from the error alone.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use super::{AuthConfig, BotConfig, Config, ConfigError, KNOWN_PROVIDERS, ServerConfig, invalid};

impl Config {
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
        if self.server.listen_backlog == 0 {
            return Err(invalid("server.listen_backlog", "must be at least 1"));
        }
        self.validate_limits()?;
        self.auth.validate()?;
        for (i, origin) in self.cors.allowed_origins.iter().enumerate() {
            validate_origin(origin)
                .map_err(|reason| invalid(format!("cors.allowed_origins[{i}]"), reason))?;
        }
        self.validate_storage()?;
        if let Some(bedrock) = &self.providers.bedrock {
            bedrock.validate()?;
        }
        self.validate_providers()?;
        self.validate_bots()
    }

    /// The database and Redis URLs are parsed here, by the clients that will use them, so a typo
    /// stops the start with the key's name instead of surfacing as a connection error later.
    fn validate_storage(&self) -> Result<(), ConfigError> {
        let url = &self.database.url;
        if self.database.is_postgres() {
            url.parse::<sqlx::postgres::PgConnectOptions>()
                .map_err(|e| invalid("database.url", format!("not a PostgreSQL URL: {e}")))?;
        } else if url.starts_with("sqlite:") {
            url.parse::<sqlx::sqlite::SqliteConnectOptions>()
                .map_err(|e| invalid("database.url", format!("not a SQLite URL: {e}")))?;
        } else {
            return Err(invalid(
                "database.url",
                "must be sqlite://file.db or postgres://user:pass@host:5432/db",
            ));
        }
        if self.database.password.is_some() && !self.database.is_postgres() {
            return Err(invalid("database.password", "is for PostgreSQL URLs only"));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if self.database.acquire_timeout_secs == 0 {
            return Err(invalid(
                "database.acquire_timeout_secs",
                "must be at least 1",
            ));
        }
        if let Some((url, cluster)) = self.redis.endpoint() {
            let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
            if !scheme_ok {
                return Err(invalid(
                    "redis.url",
                    "must be redis://host:6379/0 or rediss://… (redis+cluster:// for a cluster)",
                ));
            }
            let client = redis::Client::open(url.as_str())
                .map_err(|e| invalid("redis.url", format!("not a Redis URL: {e}")))?;
            if cluster && client.get_connection_info().redis_settings().db() != 0 {
                return Err(invalid(
                    "redis.url",
                    "a Redis Cluster has only database 0 (drop the /N from the URL)",
                ));
            }
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "redis.key_prefix",
                "must be non-empty, without braces or spaces",
            ));
        }
        if self.redis.max_blocking_readers == 0 {
            return Err(invalid("redis.max_blocking_readers", "must be at least 1"));
        }
        if self.redis.keep_ended_secs == 0 {
            return Err(invalid("redis.keep_ended_secs", "must be at least 1"));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let positive = [
            (
                "streams.first_token_timeout_secs",
                self.streams.first_token_timeout_secs,
            ),
            ("streams.idle_timeout_secs", self.streams.idle_timeout_secs),
            ("streams.max_stream_secs", self.streams.max_stream_secs),
            ("server.max_connections", self.server.max_connections as u64),
            (
                "server.max_connections_per_address",
                self.server.max_connections_per_address as u64,
            ),
            ("server.idle_timeout_secs", self.server.idle_timeout_secs),
            ("quotas.max_chats_per_user", self.quotas.max_chats_per_user),
            ("quotas.max_bytes_per_user", self.quotas.max_bytes_per_user),
            ("quotas.max_turns_per_chat", self.quotas.max_turns_per_chat),
            ("rate_limit.burst", u64::from(self.rate_limit.burst)),
            (
                "rate_limit.max_concurrent_streams",
                self.rate_limit.max_concurrent_streams as u64,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let rate = self.rate_limit.requests_per_second;
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(invalid(
                "rate_limit.requests_per_second",
                "must be a positive number",
            ));
        }
        if let Some(listen) = &self.metrics.listen
            && listen.parse::<SocketAddr>().is_err()
        {
            return Err(invalid(
                "metrics.listen",
                format!("'{listen}' is not an address like 127.0.0.1:9090"),
            ));
        }
        Ok(())
    }

    fn validate_providers(&self) -> Result<(), ConfigError> {
        const MAX_LOCAL_THREADS: usize = 256;
        let local = &self.providers.local;
        for (key, value) in [
            ("providers.local.concurrency", local.concurrency),
            (
                "providers.local.max_queued_per_user",
                local.max_queued_per_user,
            ),
            ("providers.local.max_prompt_tokens", local.max_prompt_tokens),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        // Each is an OS thread, started when the model loads.
        if local.threads > MAX_LOCAL_THREADS {
            return Err(invalid(
                "providers.local.threads",
                format!("must be at most {MAX_LOCAL_THREADS} (0 means one per core)"),
            ));
        }
        let urls = [
            (
                "providers.anthropic.base_url",
                self.providers.anthropic.as_ref().map(|a| &a.base_url),
            ),
            (
                "providers.openai.base_url",
                self.providers.openai.as_ref().map(|o| &o.base_url),
            ),
        ];
        for (key, url) in urls {
            if let Some(url) = url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(invalid(
                    key,
                    format!("'{url}' must start with http:// or https://"),
                ));
            }
        }
        Ok(())
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
            validate_targets(bot, &key)?;
            if let Some(t) = bot.temperature
                && !(0.0..=2.0).contains(&t)
            {
                return Err(invalid(key("temperature"), "must be between 0 and 2"));
            }
            if let Some(p) = bot.top_p
                && !(p > 0.0 && p <= 1.0)
            {
                return Err(invalid(key("top_p"), "must be in (0, 1]"));
            }
            if bot.max_tokens == 0 {
                return Err(invalid(key("max_tokens"), "must be at least 1"));
            }
        }
        Ok(())
    }
}

fn validate_targets(bot: &BotConfig, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    match (&bot.provider, &bot.model, bot.targets.is_empty()) {
        (Some(_), Some(_), true) => {}
        (None, None, false) => {}
        (Some(_), Some(_), false) => {
            return Err(invalid(
                key("targets"),
                "give either provider + model or targets, not both",
            ));
        }
        (None, None, true) => {
            return Err(invalid(
                key("provider"),
                "give provider + model, or targets",
            ));
        }
        (Some(_), None, _) => return Err(invalid(key("model"), "is required with provider")),
        (None, Some(_), _) => return Err(invalid(key("provider"), "is required with model")),
    }
    for (j, target) in bot.targets().iter().enumerate() {
        let field = |name: &str| {
            if bot.targets.is_empty() {
                key(name)
            } else {
                key(&format!("targets[{j}].{name}"))
            }
        };
        if !KNOWN_PROVIDERS.contains(&target.provider.as_str()) {
            return Err(invalid(
                field("provider"),
                format!(
                    "unknown provider '{}' (known: {})",
                    target.provider,
                    KNOWN_PROVIDERS.join(", ")
                ),
            ));
        }
        if target.model.trim().is_empty() {
            return Err(invalid(field("model"), "must not be empty"));
        }
        if target.region.is_some() && target.provider != "bedrock" {
            return Err(invalid(field("region"), "only applies to bedrock targets"));
        }
    }
    Ok(())
}

/// HS256 secrets shorter than this are refused: a short secret can be guessed offline from any
/// one token.
pub const MIN_SECRET_BYTES: usize = 32;

impl AuthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(secret) = &self.jwt_secret
            && secret.expose().len() < MIN_SECRET_BYTES
        {
            return Err(invalid(
                "auth.jwt_secret",
                format!(
                    "must be at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -base64 48`)"
                ),
            ));
        }
        if self.jwks_min_refresh_secs == 0 {
            return Err(invalid("auth.jwks_min_refresh_secs", "must be at least 1"));
        }
        if self.jwks_max_age_secs == 0 {
            return Err(invalid("auth.jwks_max_age_secs", "must be at least 1"));
        }
        if self
            .admin_role
            .as_deref()
            .is_some_and(|r| r.trim().is_empty())
        {
            return Err(invalid(
                "auth.admin_role",
                "must not be empty (leave it out instead)",
            ));
        }
        if self.roles_claim.trim().is_empty() {
            return Err(invalid("auth.roles_claim", "must name a claim"));
        }
        let Some(url) = &self.jwks_url else {
            return Ok(());
        };
        if !url.starts_with("https://") && !is_loopback_http(url) {
            return Err(invalid(
                "auth.jwks_url",
                format!("'{url}' must be https:// (plain http only on loopback)"),
            ));
        }
        if self.issuer.as_deref().is_none_or(|i| i.trim().is_empty()) {
            return Err(invalid(
                "auth.issuer",
                "is required with jwks_url: tokens of any other issuer must not count",
            ));
        }
        let has = |value: &Option<String>| value.as_deref().is_some_and(|v| !v.trim().is_empty());
        if !has(&self.audience) && !has(&self.client_id) {
            return Err(invalid(
                "auth.audience",
                "audience (or, for Cognito access tokens, client_id) is required with jwks_url",
            ));
        }
        Ok(())
    }
}

/// `http://127.0.0.1:…`, `http://[::1]…` or `http://localhost…`: a key set served on this host.
pub(super) fn is_loopback_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
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
