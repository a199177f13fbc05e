//! Builds the whole server from a [`Config`] and runs it until told to stop.
//!
//! [`Application::build`] binds the listener itself, so tests ask for port 0 and read the real
//! port back; `main` and the tests start the server the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, random_secret};
use crate::chat::{ChatLimits, ChatService, StreamTimeouts};
use crate::config::{BotConfig, Config, ConfigError};
use crate::http::sse::SseSettings;
use crate::http::{AppState, router};
use crate::providers::ProviderRegistry;
use crate::store::{self, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: axum::Router,
    authenticator: Arc<Authenticator>,
    /// Set when the secret was generated for this run (none configured).
    generated_secret: bool,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Application {
    pub async fn build(mut config: Config) -> Result<Self, StartupError> {
        config.validate()?;
        if config.bots.is_empty() {
            config.bots.push(BotConfig::default_local());
        }
        let store = store::connect(&config.database.url).await?;
        let recovered = store.recover_abandoned_turns().await?;
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "answers left streaming by a previous run marked interrupted"
            );
        }
        let (secret, generated_secret) = match &config.auth.jwt_secret {
            Some(secret) => (secret.expose().to_owned(), false),
            None => (random_secret(), true),
        };
        if !generated_secret && secret.len() < 32 {
            tracing::warn!(
                "auth.jwt_secret is shorter than 32 bytes; HS256 needs a long random secret"
            );
        }
        let authenticator = Arc::new(Authenticator::hs256(secret.as_bytes()));
        if config.bots.is_empty() {
            tracing::warn!(
                "no [[bots]] configured: every chat request will answer 404 bot_not_found"
            );
        }
        let providers = ProviderRegistry::from_config(&config).await;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let chat = ChatService::new(
            store,
            providers,
            &config.bots,
            ChatLimits {
                max_message_chars: config.server.max_message_chars,
                stream_buffer_events: config.server.stream_buffer_events,
                timeouts: StreamTimeouts {
                    first_token: Duration::from_secs(config.streams.first_token_timeout_secs),
                    idle: Duration::from_secs(config.streams.idle_timeout_secs),
                    total: Duration::from_secs(config.streams.max_stream_secs),
                },
            },
            tasks.clone(),
            shutdown.clone(),
        );
        let state = AppState {
            chat: Arc::new(chat),
            auth: authenticator.clone(),
            max_body_bytes: config.server.max_body_bytes,
            sse: SseSettings {
                heartbeat: (config.server.heartbeat_secs > 0)
                    .then(|| Duration::from_secs(config.server.heartbeat_secs)),
                retry_ms: config.streams.retry_ms,
            },
        };
        let router = router(state, &config.cors.allowed_origins);
        let addr = config.server.bind_addr()?;
        let listener = TcpListener::bind(addr)
            .await
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
            shutdown,
            tasks,
        })
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

    /// Cancelling this token stops the server: open streams end with a retryable
    /// `server_shutting_down` error, answers are stored, and `run_until_stopped` returns.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        // Every event is a small write that must leave at once, not wait for an ACK (Nagle).
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("could not set TCP_NODELAY: {e}");
            }
        });
        let service = self
            .router
            .into_make_service_with_connect_info::<SocketAddr>();
        let shutdown = self.shutdown.clone();
        let served = axum::serve(listener, service)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        // Producers store their answers after their streams end; wait for every one of them.
        self.tasks.close();
        self.tasks.wait().await;
        served
    }
}
