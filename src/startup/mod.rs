//! Builds the whole server from a [`Config`] and runs it until told to stop.
//!
//! [`Application::build`] binds the listener itself, so tests ask for port 0 and read the real
//! port back; `main` and the tests start the server the same way.

mod connections;
pub mod listener;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::jwks::JwksVerifier;
use crate::auth::tickets::{TicketBook, Tickets};
use crate::auth::{Authenticator, random_secret};
use crate::chat::{ChatLimits, ChatService, StreamTimeouts};
use crate::config::{BotConfig, Config, ConfigError};
use crate::http::client_address::TrustedProxies;
use crate::http::sse::SseSettings;
use crate::http::{AppState, metrics_router, router};
use crate::metrics::Metrics;
use crate::providers::ProviderRegistry;
use crate::rate_limit::{MemoryRateLimiter, RateLimiter, StreamCap, StreamSlots};
use crate::shared::limits::{RedisRateLimiter, StreamLeases};
use crate::shared::tickets::RedisTickets;
use crate::shared::{Redis, SharedError};
use crate::store::{self, ChatStore, StorageQuota, StoreError};
use crate::stream_log::EventLog;
use crate::stream_log::memory::MemoryLog;
use crate::stream_log::redis::RedisLog;
use connections::{ConnectionGate, ConnectionLimits};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot set up shared state: {0}")]
    Shared(#[from] SharedError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the chat service keeps its state in: the chats, and the live answers' events; with
/// shared state, the Redis that limits and tickets live in too.
pub struct Backends {
    pub store: Arc<dyn ChatStore>,
    pub log: Arc<dyn EventLog>,
    pub shared: Option<Redis>,
}

/// Work that lives as long as the server: the shared log's writers, the stream-place keeper, the
/// sweep for abandoned answers. Stopped and awaited after the drain.
#[derive(Clone, Default)]
struct Background {
    tasks: TaskTracker,
    stop: CancellationToken,
}

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: axum::Router,
    authenticator: Arc<Authenticator>,
    /// Set when the secret was generated for this run (none configured).
    generated_secret: bool,
    shutdown: CancellationToken,
    chat: Arc<ChatService>,
    drain: Duration,
    stalled_client: Option<Duration>,
    /// `[metrics] listen`: a second listener that serves only `/metrics`.
    metrics_listener: Option<(TcpListener, axum::Router)>,
    /// `[server.tls]`: serve HTTPS (ALPN h2, http/1.1) instead of cleartext.
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// The connection caps and idle timeout of the main listener.
    gate: ConnectionGate,
    background: Background,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        config.validate()?;
        // Before the database connects (TLS to PostgreSQL); build_in installs it again for
        // callers of build_with, which is a no-op here.
        crate::crypto::install_default_providers();
        let shared = match config.redis.endpoint() {
            Some((url, cluster)) => Some(Redis::new(&url, cluster, &config.redis)?),
            None => None,
        };
        let background = Background::default();
        let log: Arc<dyn EventLog> = match &shared {
            Some(redis) => Arc::new(RedisLog::new(
                redis.clone(),
                background.tasks.clone(),
                Duration::from_secs(config.redis.keep_ended_secs),
            )),
            None => Arc::new(MemoryLog::default()),
        };
        let backends = Backends {
            store: store::connect(&config.database).await?,
            log,
            shared,
        };
        Self::build_in(config, backends, background).await
    }

    /// Like [`Application::build`], on backends given instead of the configured ones: the seam
    /// a test uses to put a failing store or log under the real server.
    pub async fn build_with(config: Config, backends: Backends) -> Result<Self, StartupError> {
        Self::build_in(config, backends, Background::default()).await
    }

    async fn build_in(
        mut config: Config,
        backends: Backends,
        background: Background,
    ) -> Result<Self, StartupError> {
        let Backends { store, log, shared } = backends;
        config.validate()?;
        crate::crypto::install_default_providers();
        if config.bots.is_empty() {
            config.bots.push(default_local_bot());
        }
        // With a shared log, another instance may be generating any streaming answer right now;
        // abandoned ones are concluded through their lapsed leases instead.
        if !log.is_shared() {
            recover_abandoned_turns(&store, &background).await?;
        }
        let (authenticator, generated_secret) = authenticator(&config);
        if generated_secret && shared.is_some() {
            tracing::warn!(
                "redis.url is set but auth.jwt_secret is not: this instance signs with a secret of \
                 its own, so the other instances refuse its tokens (and it theirs); set \
                 auth.jwt_secret (or auth.jwks_url) for a cluster"
            );
        }
        let authenticator = Arc::new(authenticator);
        let proxies = TrustedProxies::new(&config.server.trusted_proxies);
        if proxies.trusts_any_peer() {
            tracing::warn!(
                "server.trusted_proxies = [\"*\"]: every peer is taken for one proxy hop and \
                 X-Forwarded-For's right-most entry for the client; list the proxies' networks instead"
            );
        }
        let metrics = Arc::new(Metrics::new());
        let providers = ProviderRegistry::from_config(&config, &metrics).await;
        let chat = Arc::new(ChatService::new(
            store,
            log,
            providers,
            &config.bots,
            chat_limits(&config),
            TaskTracker::new(),
            metrics.clone(),
        ));
        let gate = ConnectionGate::new(connection_limits(&config, proxies.clone()), &metrics);
        let state = app_state(
            &config,
            chat.clone(),
            authenticator.clone(),
            metrics.clone(),
            shared.as_ref(),
            &background,
        );
        if config.metrics.log_gauges_secs > 0 {
            let every = Duration::from_secs(config.metrics.log_gauges_secs);
            background
                .tasks
                .spawn(log_gauges(metrics.clone(), every, background.stop.clone()));
        }
        if let Some(redis) = &shared {
            let watch = crate::shared::memory::watch(
                redis.clone(),
                metrics.clone(),
                background.stop.clone(),
            );
            background.tasks.spawn(watch);
        }
        let sweeper = chat.clone();
        let stop = background.stop.clone();
        background
            .tasks
            .spawn(async move { sweeper.sweep_abandoned(stop).await });
        let metrics_listener = match &config.metrics.listen {
            Some(listen) => Some((bind(listen).await?, metrics_router(state.clone()))),
            None => None,
        };
        let router = router(
            state,
            &config.cors.allowed_origins,
            proxies,
            metrics_listener.is_none(),
        );
        let tls = match &config.server.tls {
            Some(tls) => Some(tls::server_config(&tls.cert_file, &tls.key_file)?),
            None => None,
        };
        let addr = config.server.bind_addr()?;
        let listener = listen(addr, config.server.listen_backlog)
            .map_err(|source| StartupError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;
        Ok(Self {
            listener,
            local_addr,
            router,
            authenticator,
            generated_secret,
            shutdown: CancellationToken::new(),
            chat,
            drain: Duration::from_secs(config.server.drain_secs),
            stalled_client: (config.streams.stalled_client_secs > 0)
                .then(|| Duration::from_secs(config.streams.stalled_client_secs)),
            metrics_listener,
            tls,
            gate,
            background,
        })
    }

    /// Where `/metrics` is served when `[metrics] listen` moved it off the main listener.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn authenticator(&self) -> Arc<Authenticator> {
        self.authenticator.clone()
    }

    pub fn generated_secret(&self) -> bool {
        self.generated_secret
    }

    /// Whether HS256 tokens (`mangoo token`) are accepted.
    pub fn hs256_enabled(&self) -> bool {
        self.authenticator.has_hs256()
    }

    /// Cancelling this token starts a graceful shutdown: `/readyz` answers 503 and new streams are
    /// refused at once; running answers go on for up to `drain_secs`, then each still running ends
    /// with a retryable `server_shutting_down`; everything is stored and `run_until_stopped`
    /// returns. No connection holds the exit hostage.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let chat = self.chat.clone();
        let background = self.background.clone();
        let served = self.serve_and_drain().await;
        background.stop.cancel();
        background.tasks.close();
        background.tasks.wait().await;
        // Every answer is stored by now; writes still queued commit before the process ends.
        chat.store().close().await;
        served
    }

    async fn serve_and_drain(self) -> std::io::Result<()> {
        let close_http = CancellationToken::new();
        let stalled_client = self.stalled_client;
        let tune = move |tcp: &mut tokio::net::TcpStream| tune_connection(tcp, stalled_client);
        // Cleartext HTTP/1.1 + h2c, or HTTPS (ALPN h2 / http/1.1).
        let server = listener::serve(
            self.listener,
            self.tls,
            self.router,
            self.gate,
            close_http.clone(),
            tune,
        );
        // The metrics listener lives exactly as long as the main one.
        let metrics = async move {
            match self.metrics_listener {
                Some((listener, router)) => axum::serve(listener, router).await,
                None => std::future::pending().await,
            }
        };
        let server = async move {
            tokio::select! {
                served = server => served,
                served = metrics => served,
            }
        };
        tokio::pin!(server);
        tokio::select! {
            served = &mut server => return served,
            () = self.shutdown.cancelled() => {}
        }
        tracing::info!(drain_secs = self.drain.as_secs(), "draining");
        let drained = async {
            self.chat.drain(self.drain).await;
            // Every answer is stored and every stream has its terminal event; now stop accepting
            // and let the last bytes go out.
            close_http.cancel();
            tokio::time::sleep(CLOSE_GRACE).await;
        };
        tokio::select! {
            served = &mut server => served,
            () = drained => {
                tracing::warn!("connections still open after the drain; closing them");
                Ok(())
            }
        }
    }
}

/// The gauges as a log line now and then, where only logs are collected (CloudWatch turns
/// `open_streams` into a metric with a filter; see deploy/aws).
async fn log_gauges(metrics: Arc<Metrics>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        // The tick first: the first one is immediate, so a server stopped at once still logs
        // its gauges once.
        tokio::select! {
            biased;
            _ = tick.tick() => tracing::info!(
                target: "mangoo::gauges",
                open_streams = metrics.streams_open.get(),
                open_connections = metrics.connections_open.get(),
                "gauges"
            ),
            () = stop.cancelled() => return,
        }
    }
}

/// Marks the answers a previous run left streaming as interrupted. With the database away at
/// start, this waits for it in the background (new turns in those chats are refused as busy
/// meanwhile) instead of keeping the server from starting.
async fn recover_abandoned_turns(
    store: &Arc<dyn ChatStore>,
    background: &Background,
) -> Result<(), StartupError> {
    let report = |recovered: u64| {
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "answers left streaming by a previous run marked interrupted"
            );
        }
    };
    let first_try = tokio::time::timeout(Duration::from_secs(2), store.recover_abandoned_turns())
        .await
        .unwrap_or_else(|_| Err(StoreError::Unavailable("no answer within 2 s".into())));
    match first_try {
        Ok(recovered) => report(recovered),
        Err(StoreError::Unavailable(_)) => {
            let (store, stop) = (store.clone(), background.stop.clone());
            background.tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                    if let Ok(recovered) = store.recover_abandoned_turns().await {
                        return report(recovered);
                    }
                }
            });
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// The bot served when none are configured: the embedded model. Built here rather than in
/// `config`, which knows nothing of the providers.
fn default_local_bot() -> BotConfig {
    BotConfig {
        id: "default".into(),
        provider: Some(crate::providers::local::PROVIDER_NAME.into()),
        model: Some(crate::providers::local::MODEL_NAME.into()),
        region: None,
        targets: Vec::new(),
        system_prompt: None,
        temperature: Some(0.7),
        top_p: Some(0.9),
        max_tokens: 512,
    }
}

/// Trusted proxies carry many clients on their connections: the per-address cap exempts them.
fn connection_limits(config: &Config, proxies: TrustedProxies) -> ConnectionLimits {
    let server = &config.server;
    ConnectionLimits {
        max_connections: server.max_connections,
        max_per_address: server.max_connections_per_address,
        idle_timeout: Duration::from_secs(server.idle_timeout_secs),
        exempt: proxies,
    }
}

/// HS256 with the configured secret; with no secret, a generated one for this run — unless an
/// identity provider is configured, in which case HS256 is off (the second flag says whether a
/// secret was generated).
fn authenticator(config: &Config) -> (Authenticator, bool) {
    let (authenticator, generated) = verifiers(config);
    let authenticator = match &config.auth.admin_role {
        Some(role) => authenticator.with_admin_role(crate::auth::AdminRole {
            claim: config.auth.roles_claim.clone(),
            role: role.clone(),
        }),
        None => authenticator,
    };
    (authenticator, generated)
}

fn verifiers(config: &Config) -> (Authenticator, bool) {
    let jwks = config
        .auth
        .jwks_url
        .as_ref()
        .map(|url| JwksVerifier::new(url, &config.auth));
    match (&config.auth.jwt_secret, jwks) {
        (Some(secret), jwks) => {
            let hs256 = Authenticator::hs256(secret.expose().as_bytes());
            let authenticator = match jwks {
                Some(jwks) => hs256.with_jwks(jwks),
                None => hs256,
            };
            (authenticator, false)
        }
        (None, Some(jwks)) => (Authenticator::jwks_only(jwks), false),
        (None, None) => (Authenticator::hs256(random_secret().as_bytes()), true),
    }
}

fn chat_limits(config: &Config) -> ChatLimits {
    let streams = &config.streams;
    let quotas = &config.quotas;
    ChatLimits {
        max_message_chars: config.server.max_message_chars,
        unheard_grace: match streams.on_disconnect {
            crate::config::DisconnectPolicy::Cancel => {
                Some(Duration::from_secs(streams.disconnect_grace_secs))
            }
            crate::config::DisconnectPolicy::Continue => None,
        },
        quota: StorageQuota {
            max_chats: quotas.max_chats_per_user,
            max_bytes: quotas.max_bytes_per_user,
            max_turns: quotas.max_turns_per_chat,
        },
        max_history_chars: quotas.max_history_chars,
        checkpoint_every: config.redis.url.is_none().then_some(Duration::from_secs(1)),
        timeouts: StreamTimeouts {
            first_token: Duration::from_secs(streams.first_token_timeout_secs),
            idle: Duration::from_secs(streams.idle_timeout_secs),
            total: Duration::from_secs(streams.max_stream_secs),
        },
    }
}

/// The limits and tickets: in this process, or shared through Redis.
fn app_state(
    config: &Config,
    chat: Arc<ChatService>,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    shared: Option<&Redis>,
    background: &Background,
) -> AppState {
    let limits = &config.rate_limit;
    let (rate, burst, max_streams) = (
        limits.requests_per_second,
        limits.burst,
        limits.max_concurrent_streams,
    );
    let (limiter, streams, tickets): (Arc<dyn RateLimiter>, StreamCap, Arc<dyn Tickets>) =
        match shared {
            Some(redis) => {
                let (leases, keeper) =
                    StreamLeases::new(redis.clone(), max_streams, background.stop.clone());
                background.tasks.spawn(keeper);
                (
                    Arc::new(RedisRateLimiter::new(redis.clone(), rate, burst)),
                    StreamCap::Shared(leases),
                    Arc::new(RedisTickets::new(redis.clone())),
                )
            }
            None => (
                Arc::new(MemoryRateLimiter::new(rate, burst)),
                StreamCap::Local(StreamSlots::new(max_streams)),
                Arc::new(TicketBook::default()),
            ),
        };
    AppState {
        chat,
        auth,
        max_body_bytes: config.server.max_body_bytes,
        limiter,
        streams,
        tickets,
        sse: SseSettings {
            heartbeat: (config.server.heartbeat_secs > 0)
                .then(|| Duration::from_secs(config.server.heartbeat_secs)),
            retry_ms: config.streams.retry_ms,
            metrics: metrics.clone(),
        },
        metrics_token: config.metrics.bearer_token.clone(),
        metrics,
    }
}

/// The main listener, with room in its accept queue for a burst of connections (tokio's `bind`
/// asks for 1,024). SO_REUSEADDR as `bind` sets it: a restart does not wait out TIME_WAIT.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn bind(addr: &str) -> Result<TcpListener, StartupError> {
    let addr: SocketAddr = addr.parse().map_err(|_| ConfigError::Invalid {
        key: "metrics.listen".into(),
        reason: format!("'{addr}' is not an address"),
    })?;
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })
}

/// Every event is a small write that must leave at once, not wait for an ACK (Nagle). And a client
/// that stops taking data must not pin its stream forever: TCP_USER_TIMEOUT makes the kernel
/// drop a connection whose data stays unacknowledged, or unsent behind a zero window, that long.
/// Heartbeats keep data flowing, so a live but quiet client never trips it.
fn tune_connection(tcp: &mut tokio::net::TcpStream, stalled_client: Option<Duration>) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("could not set TCP_NODELAY: {e}");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = stalled_client;
    #[cfg(target_os = "linux")]
    if let Some(limit) = stalled_client
        && let Err(e) = socket2::SockRef::from(&*tcp).set_tcp_user_timeout(Some(limit))
    {
        tracing::debug!("could not set TCP_USER_TIMEOUT: {e}");
    }
}

/// After the drain, how long connections get to take their last bytes before they are dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
