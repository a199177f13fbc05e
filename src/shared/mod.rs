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
//! Nothing connects at construction: a server whose Redis is down starts, reports not ready, and
//! connects when Redis comes back.

pub mod limits;
pub mod tickets;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{AsyncConnectionConfig, Client, Cmd, ErrorKind, RedisError, RedisFuture, Value};
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
    client: Client,
    manager: RwLock<ConnectionManager>,
    /// When the manager was last replaced: at most once per [`REPLACE_AT_MOST_EVERY`].
    replaced_at: Mutex<Option<Instant>>,
    prefix: String,
    blocking: Arc<Semaphore>,
}

/// A storm of failing commands replaces the connection once, not once per command.
const REPLACE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

fn manager_for(client: &Client) -> Result<ConnectionManager, RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_lazy_with_config(client.clone(), config)
}

/// The shared connection as every short command uses it: the current manager, and a note to
/// the handle when a command fails in a way the manager does not recover from by itself.
pub struct SharedConnection {
    manager: ConnectionManager,
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
    pub fn new(url: &str, config: &RedisConfig) -> Result<Self, SharedError> {
        let client = Client::open(url)?;
        let manager = RwLock::new(manager_for(&client)?);
        Ok(Self(Arc::new(Connections {
            client,
            manager,
            replaced_at: Mutex::new(None),
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

    /// A server that turned replica (`READONLY`) or stopped answering (a timeout: the manager
    /// only reconnects after a broken socket) gets a new connection, resolved anew.
    fn note_failure(&self, e: &RedisError) {
        let read_only = matches!(
            e.kind(),
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        ) || e.code() == Some("READONLY");
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
        match manager_for(&self.0.client) {
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
    ) -> Result<Option<(MultiplexedConnection, OwnedSemaphorePermit)>, SharedError> {
        let Ok(permit) = self.0.blocking.clone().try_acquire_owned() else {
            return Ok(None);
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(block + RESPONSE_TIMEOUT));
        let conn = self
            .0
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Some((conn, permit)))
    }

    pub async fn ping(&self) -> Result<(), SharedError> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }
}
