//! Shared state for several instances, in Redis: what one process used to keep in memory — the
//! stream log of live answers, who owns each answer, stop requests, rate-limit state, stream-cap
//! leases and stream tickets — lives here when `[redis] url` is set, so N identical instances
//! behind any load balancer behave as one server.
//!
//! Every key starts with `[redis] key_prefix`; a chat's keys carry its id as a hash tag
//! (`prefix:chat:{id}:…`) so the scripts that touch several of them stay on one Redis Cluster
//! slot. Two kinds of connection:
//! - one multiplexed, self-reconnecting connection ([`ConnectionManager`]) for every short
//!   command, pipelined by the client; it fails fast (a response timeout, one retry) instead of
//!   queueing requests while Redis is away. It reconnects by itself after a broken socket, but
//!   not when its server became a replica (every write answers `READONLY`; after a failover the
//!   DNS name points elsewhere) nor when the server stopped answering: on those errors it is
//!   replaced by a new one, which resolves the name again ([`SharedConnection`] notices them);
//! - dedicated connections for blocking reads (`XREAD BLOCK`), never the multiplexed one: a
//!   blocked command would hold up every command queued behind it. They are capped
//!   (`max_blocking_readers`); past the cap a reader polls instead.
//!
//! With `[redis] cluster = true` (or a `redis+cluster://` URL) both kinds are cluster connections
//! instead: they learn the slots from the node named, route each command by its key and follow
//! `MOVED` through failovers and resharding. Every command and script Mangoo sends touches keys
//! of one slot; nothing is pipelined across keys.
//!
//! Every socket has TCP keepalive and a user timeout, so a dependency that vanished without a
//! reset (a black-holed route, a NAT that forgot the flow) is noticed in seconds, not minutes.
//!
//! Nothing connects at construction: a server whose Redis is down starts, reports not ready, and
//! connects when Redis comes back.

pub mod limits;
pub mod memory;
pub mod tickets;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, IntoConnectionInfo, RedisError, RedisFuture,
    Value,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::RedisConfig;

/// Redis could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct SharedError(pub String);

impl From<redis::RedisError> for SharedError {
    fn from(e: redis::RedisError) -> Self {
        SharedError(e.to_string())
    }
}

/// How long one short command may take before it counts as a failure (Redis answers in well
/// under a millisecond; this is about a server that went away).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The handle every shared component uses. Cheap to clone (one pointer).
#[derive(Clone)]
pub struct Redis(Arc<Connections>);

struct Connections {
    client: Endpoint,
    manager: RwLock<Link>,
    /// When the manager was last replaced: at most once per [`REPLACE_AT_MOST_EVERY`].
    replaced_at: Mutex<Option<Instant>>,
    /// When a command last failed for want of Redis (I/O, timeout, refusal, `READONLY`).
    troubled_at: Mutex<Option<Instant>>,
    prefix: String,
    blocking: Arc<Semaphore>,
}

/// A storm of failing commands replaces the connection once, not once per command.
const REPLACE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// What the handle connects to: one server (or a primary behind a DNS name), or a cluster.
#[allow(clippy::large_enum_variant)] // one per process
enum Endpoint {
    Single(Client),
    Cluster(ClusterClient),
}

/// `redis.username` / `redis.password` over whatever the URL says: the password comes from a
/// secret (an environment variable), the URL from plain configuration.
fn with_credentials(info: redis::ConnectionInfo, config: &RedisConfig) -> redis::ConnectionInfo {
    let mut settings = info.redis_settings().clone();
    if let Some(username) = &config.username {
        settings = settings.set_username(username);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password.expose());
    }
    info.set_redis_settings(settings)
}

/// A socket to a peer that vanished without a reset fails after this long unacknowledged.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

fn tcp_settings() -> TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(TCP_USER_TIMEOUT)
}

impl Endpoint {
    fn open(url: &str, cluster: bool, config: &RedisConfig) -> Result<Self, RedisError> {
        let info = url.into_connection_info()?.set_tcp_settings(tcp_settings());
        let info = with_credentials(info, config);
        if !cluster {
            return Ok(Self::Single(Client::open(info)?));
        }
        let client = ClusterClientBuilder::new([info])
            .tcp_settings(tcp_settings())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            // Through a failover the cluster takes a few seconds to name a new primary; the
            // redirects and retries meanwhile are bounded as a whole.
            .overall_response_timeout(Some(RESPONSE_TIMEOUT * 2))
            .build()?;
        Ok(Self::Cluster(client))
    }

    /// The shared, multiplexed link; connects on first use.
    fn link(&self) -> Result<Link, RedisError> {
        match self {
            Self::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                Ok(Link::Single(ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    config,
                )?))
            }
            Self::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(RESPONSE_TIMEOUT);
                Ok(Link::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ))
            }
        }
    }

    /// A link of its own for blocking reads; its response timeout covers the block.
    async fn blocking_link(&self, block: Duration) -> Result<Link, RedisError> {
        let timeout = block + RESPONSE_TIMEOUT;
        match self {
            Self::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(timeout));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Link::Dedicated(conn))
            }
            Self::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(timeout);
                let conn = client.get_async_connection_with_config(config).await?;
                Ok(Link::Cluster(conn))
            }
        }
    }
}

/// A connection of one of the kinds above, as the commands see it.
#[derive(Clone)]
pub enum Link {
    Single(ConnectionManager),
    Dedicated(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Dedicated(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Dedicated(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Dedicated(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The shared connection as every short command uses it: the current manager, and a note to
/// the handle when a command fails in a way the manager does not recover from by itself.
pub struct SharedConnection {
    manager: Link,
    owner: Redis,
}

impl SharedConnection {
    /// Errors come two ways: the command's (I/O, timeout) and the server's reply, which is a
    /// value here and becomes an error only when the caller converts it.
    fn noted<T: Replies>(&self, result: Result<T, RedisError>) -> Result<T, RedisError> {
        match &result {
            Err(e) => self.owner.note_failure(e),
            Ok(replies) => {
                if let Some(Value::ServerError(e)) = replies.first_error() {
                    self.owner.note_failure(&RedisError::from(e.clone()));
                }
            }
        }
        result
    }
}

/// The replies of a command or of a pipeline.
trait Replies {
    fn first_error(&self) -> Option<&Value>;
}

impl Replies for Value {
    fn first_error(&self) -> Option<&Value> {
        matches!(self, Value::ServerError(_)).then_some(self)
    }
}

impl Replies for Vec<Value> {
    fn first_error(&self) -> Option<&Value> {
        self.iter().find(|v| matches!(v, Value::ServerError(_)))
    }
}

impl ConnectionLike for SharedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.manager.req_packed_command(cmd).await;
            self.noted(result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self
                .manager
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.noted(result)
        })
    }

    fn get_db(&self) -> i64 {
        self.manager.get_db()
    }
}

/// The keys of one chat's live answer, all in the chat's hash slot.
#[derive(Debug, Clone)]
pub struct ChatKeys {
    /// Hash: `state` (claimed, live, done), `fence`, `message_id`, `first_id`, `stop`.
    pub answer: String,
    /// String holding the owner's fence, with the lease's expiry.
    pub lease: String,
    /// Stream: the answer's events, entry id `<event id>-0`.
    pub log: String,
    /// Sorted set: the answer's listeners on instances other than the producer's, each scored
    /// by when its presence expires (Redis time, ms).
    pub listeners: String,
}

impl Redis {
    /// The client, ready to connect on first use (no I/O here).
    pub fn new(url: &str, cluster: bool, config: &RedisConfig) -> Result<Self, SharedError> {
        let client = Endpoint::open(url, cluster, config)?;
        let manager = RwLock::new(client.link()?);
        Ok(Self(Arc::new(Connections {
            client,
            manager,
            replaced_at: Mutex::new(None),
            troubled_at: Mutex::new(None),
            prefix: config.key_prefix.clone(),
            blocking: Arc::new(Semaphore::new(config.max_blocking_readers)),
        })))
    }

    /// The multiplexed connection, for short commands only.
    pub fn conn(&self) -> SharedConnection {
        let manager = self.0.manager.read().unwrap_or_else(|p| p.into_inner());
        SharedConnection {
            manager: manager.clone(),
            owner: self.clone(),
        }
    }

    /// Whether every command has reached Redis for at least `span`. After an outage every
    /// lease in Redis may have lapsed while its producer, alive, could not renew it: an
    /// instance that was cut off too cannot tell a dead producer from one that is reconnecting,
    /// so it takes nothing over until a lease's length has passed with Redis reachable.
    pub fn steady_for(&self, span: Duration) -> bool {
        let troubled_at = self.0.troubled_at.lock().unwrap_or_else(|p| p.into_inner());
        troubled_at.is_none_or(|at| at.elapsed() >= span)
    }

    /// A server that turned replica (`READONLY`) or stopped answering (a timeout: the manager
    /// only reconnects after a broken socket) gets a new connection, resolved anew.
    fn note_failure(&self, e: &RedisError) {
        let read_only = matches!(
            e.kind(),
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        ) || e.code() == Some("READONLY");
        let unreachable = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal();
        if read_only || unreachable {
            *self.0.troubled_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        if !(read_only || e.is_timeout()) {
            return;
        }
        {
            let mut replaced_at = self.0.replaced_at.lock().unwrap_or_else(|p| p.into_inner());
            if replaced_at.is_some_and(|at| at.elapsed() < REPLACE_AT_MOST_EVERY) {
                return;
            }
            *replaced_at = Some(Instant::now());
        }
        match self.0.client.link() {
            Ok(fresh) => {
                tracing::warn!("redis connection replaced after: {e}");
                *self.0.manager.write().unwrap_or_else(|p| p.into_inner()) = fresh;
            }
            Err(e) => tracing::warn!("could not replace the redis connection: {e}"),
        }
    }

    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.0.prefix)
    }

    pub fn chat_keys(&self, chat_id: &str) -> ChatKeys {
        let base = format!("{}:chat:{{{chat_id}}}", self.0.prefix);
        ChatKeys {
            answer: format!("{base}:answer"),
            lease: format!("{base}:lease"),
            log: format!("{base}:log"),
            listeners: format!("{base}:listeners"),
        }
    }

    /// A connection of its own for blocking reads, while one of the capped places is free; its
    /// response timeout is off (a `BLOCK` read waits on purpose; the caller bounds the block).
    pub async fn blocking_connection(
        &self,
        block: Duration,
    ) -> Result<Option<(Link, OwnedSemaphorePermit)>, SharedError> {
        let Ok(permit) = self.0.blocking.clone().try_acquire_owned() else {
            return Ok(None);
        };
        let link = self.0.client.blocking_link(block).await?;
        Ok(Some((link, permit)))
    }

    pub async fn ping(&self) -> Result<(), SharedError> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }
}
