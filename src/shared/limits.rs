//! Limits shared by every instance: the request rate (GCRA) and the per-user cap on concurrent
//! streams, both decided inside Redis on Redis's own clock (`TIME`), so clock skew between
//! instances cannot hand out extra requests.
//!
//! Stream places are leases, never counters: a sorted set per user, one member per open stream,
//! scored by when it expires. A [`StreamLeases`] keeper renews the leases this instance holds and
//! gives back the ones dropped; an instance that dies stops renewing, and its places free
//! themselves within [`LEASE_TTL`]. (INCR/DECR counters would keep a dead instance's places
//! forever.)

use std::collections::HashMap;
use std::time::Duration;

use redis::Script;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Redis;
use crate::rate_limit::{Decision, LimitError, RateLimiter};

/// GCRA, one "theoretical arrival time" per key, in microseconds of Redis time. Returns
/// `{allowed, remaining, retry_after_us, reset_after_us}`.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local ahead = new_tat - now
if ahead > tolerance then
  return {0, 0, ahead - tolerance, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(ahead / 1000))
return {1, math.floor((tolerance - ahead) / interval), 0, ahead}
";

pub struct RedisRateLimiter {
    redis: Redis,
    interval_us: u64,
    burst: u32,
    script: Script,
}

impl RedisRateLimiter {
    pub fn new(redis: Redis, requests_per_second: f64, burst: u32) -> Self {
        Self {
            redis,
            interval_us: (1_000_000.0 / requests_per_second).round().max(1.0) as u64,
            burst: burst.max(1),
            script: Script::new(GCRA),
        }
    }
}

#[async_trait::async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn check(&self, key: &str) -> Result<Decision, LimitError> {
        let (allowed, remaining, retry_us, reset_us): (i64, i64, i64, i64) = self
            .script
            .key(self.redis.key(&format!("rate:{key}")))
            .arg(self.interval_us)
            .arg(self.burst)
            .invoke_async(&mut self.redis.conn())
            .await
            .map_err(|e| LimitError(e.to_string()))?;
        let micros = |us: i64| Duration::from_micros(us.max(0) as u64);
        Ok(Decision {
            allowed: allowed == 1,
            remaining: remaining.clamp(0, i64::from(u32::MAX)) as u32,
            retry_after: micros(retry_us),
            reset_after: micros(reset_us),
        })
    }

    fn limit(&self) -> u32 {
        self.burst
    }
}

/// How long a stream place outlives the last renewal of the instance holding it.
pub const LEASE_TTL: Duration = Duration::from_secs(30);
const RENEW_EVERY: Duration = Duration::from_secs(10);

/// Prunes expired places, then takes one if fewer than the cap are held.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Pushes a held place's expiry out (only if it is still there: a lapsed one stays gone).
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

enum LeaseChange {
    Held { key: String, id: String },
    Released { key: String, id: String },
}

/// Per-user stream places across instances. Cheap to clone.
#[derive(Clone)]
pub struct StreamLeases {
    redis: Redis,
    max: usize,
    changes: mpsc::Sender<LeaseChange>,
    /// [`TAKE`], hashed once rather than at every stream's start.
    take: std::sync::Arc<Script>,
}

/// Changes queued for the keeper at most; a release that finds the queue full is left to expire.
const CHANGES: usize = 4096;

impl StreamLeases {
    /// The leases and their keeper, which runs until `stop` (the caller tracks it).
    pub fn new(
        redis: Redis,
        max: usize,
        stop: CancellationToken,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (changes, queued) = mpsc::channel(CHANGES);
        let keeper = keep(redis.clone(), queued, stop);
        (
            Self {
                redis,
                max,
                changes,
                take: std::sync::Arc::new(Script::new(TAKE)),
            },
            keeper,
        )
    }

    /// A place for one more stream of `user`, or `None` at the cap.
    pub async fn take(&self, user: &str) -> Result<Option<StreamLease>, LimitError> {
        let key = self.redis.key(&format!("streams:{user}"));
        let id = uuid::Uuid::new_v4().simple().to_string();
        let taken: i64 = self
            .take
            .key(&key)
            .arg(&id)
            .arg(LEASE_TTL.as_millis() as u64)
            .arg(self.max)
            .invoke_async(&mut self.redis.conn())
            .await
            .map_err(|e| LimitError(e.to_string()))?;
        if taken == 0 {
            return Ok(None);
        }
        let held = LeaseChange::Held {
            key: key.clone(),
            id: id.clone(),
        };
        if self.changes.send(held).await.is_err() {
            // The keeper is gone (shutting down): the place holds for its TTL, then frees.
            tracing::debug!("stream lease taken while the keeper is stopping");
        }
        Ok(Some(StreamLease {
            key,
            id,
            changes: self.changes.clone(),
        }))
    }
}

/// One stream's place; dropping it gives the place back.
#[derive(Debug)]
pub struct StreamLease {
    key: String,
    id: String,
    changes: mpsc::Sender<LeaseChange>,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        let released = LeaseChange::Released {
            key: std::mem::take(&mut self.key),
            id: std::mem::take(&mut self.id),
        };
        // Never blocks a drop: a full queue means the lease simply expires.
        let _ = self.changes.try_send(released);
    }
}

/// Renews every held lease each [`RENEW_EVERY`] in one pipelined round trip, and gives back
/// released ones as they come.
async fn keep(redis: Redis, mut changes: mpsc::Receiver<LeaseChange>, stop: CancellationToken) {
    let mut held: HashMap<String, String> = HashMap::new();
    let renewal = Script::new(RENEW);
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            change = changes.recv() => match change {
                Some(LeaseChange::Held { key, id }) => { held.insert(id, key); }
                Some(LeaseChange::Released { key, id }) => {
                    held.remove(&id);
                    release(&redis, &key, &id).await;
                }
                None => break,
            },
            _ = tick.tick() => renew(&redis, &renewal, &held).await,
        }
    }
    // Give back what was released meanwhile; the rest expires by itself.
    while let Ok(change) = changes.try_recv() {
        if let LeaseChange::Released { key, id } = change {
            release(&redis, &key, &id).await;
        }
    }
}

async fn release(redis: &Redis, key: &str, id: &str) {
    let removed: Result<i64, _> = redis::cmd("ZREM")
        .arg(key)
        .arg(id)
        .query_async(&mut redis.conn())
        .await;
    if let Err(e) = removed {
        tracing::warn!("could not give back a stream place (it expires by itself): {e}");
    }
}

async fn renew(redis: &Redis, script: &Script, held: &HashMap<String, String>) {
    if held.is_empty() {
        return;
    }
    let ttl = LEASE_TTL.as_millis() as u64;
    // One call per place, all in flight together on the multiplexed connection (as fast as a
    // pipeline, and each routed to its own slot in a cluster, where a pipeline must not span
    // slots).
    let renewals = held.iter().map(|(id, key)| async move {
        let mut conn = redis.conn();
        script
            .key(key)
            .arg(id)
            .arg(ttl)
            .invoke_async::<()>(&mut conn)
            .await
    });
    let renewed: Result<Vec<()>, _> = futures_util::future::try_join_all(renewals).await;
    if let Err(e) = renewed {
        tracing::warn!("could not renew stream places: {e}");
    }
}
