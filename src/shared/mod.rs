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
//!   queueing requests while Redis is away;
//! - dedicated connections for blocking reads (`XREAD BLOCK`), never the multiplexed one: a
//!   blocked command would hold up every command queued behind it. They are capped
//!   (`max_blocking_readers`); past the cap a reader polls instead.
//!
//! Nothing connects at construction: a server whose Redis is down starts, reports not ready, and
//! connects when Redis comes back.

pub mod limits;
pub mod tickets;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    manager: ConnectionManager,
    prefix: String,
    blocking: Arc<Semaphore>,
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
}

impl Redis {
    /// The client, ready to connect on first use (no I/O here).
    pub fn new(url: &str, config: &RedisConfig) -> Result<Self, SharedError> {
        let client = Client::open(url)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
        Ok(Self(Arc::new(Connections {
            client,
            manager,
            prefix: config.key_prefix.clone(),
            blocking: Arc::new(Semaphore::new(config.max_blocking_readers)),
        })))
    }

    /// The multiplexed connection, for short commands only.
    pub fn conn(&self) -> ConnectionManager {
        self.0.manager.clone()
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
