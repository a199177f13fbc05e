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
use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use tokio::sync::Notify;
use tokio::time::Instant;
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

/// The places this instance holds, and the ones given back but not yet removed from Redis.
/// Shared by the leases and their keeper; a drop never waits and never loses a release: it only
/// moves the place from one map to the other (both bounded by the places taken, at most the
/// cap per user times this instance's streams).
type Released = (String, String, Instant);

#[derive(Default)]
struct Places {
    held: HashMap<String, String>,
    /// `(key, id, when released)`.
    released: Vec<Released>,
}

#[derive(Default)]
struct Ledger {
    places: std::sync::Mutex<Places>,
    released: Notify,
}

impl Ledger {
    fn places(&self) -> std::sync::MutexGuard<'_, Places> {
        self.places.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Per-user stream places across instances. Cheap to clone.
#[derive(Clone)]
pub struct StreamLeases {
    redis: Redis,
    max: usize,
    ledger: Arc<Ledger>,
    /// [`TAKE`], hashed once rather than at every stream's start.
    take: Arc<Script>,
}

impl StreamLeases {
    /// The leases and their keeper, which runs until `stop` (the caller tracks it).
    pub fn new(
        redis: Redis,
        max: usize,
        stop: CancellationToken,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let ledger = Arc::new(Ledger::default());
        let keeper = keep(redis.clone(), ledger.clone(), stop);
        (
            Self {
                redis,
                max,
                ledger,
                take: Arc::new(Script::new(TAKE)),
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
        self.ledger.places().held.insert(id.clone(), key.clone());
        Ok(Some(StreamLease {
            key,
            id,
            ledger: self.ledger.clone(),
        }))
    }
}

/// One stream's place; dropping it gives the place back.
pub struct StreamLease {
    key: String,
    id: String,
    ledger: Arc<Ledger>,
}

impl std::fmt::Debug for StreamLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamLease").field("id", &self.id).finish()
    }
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        let key = std::mem::take(&mut self.key);
        let id = std::mem::take(&mut self.id);
        let mut places = self.ledger.places();
        // No longer renewed from here on, so even a release Redis never gets frees the place
        // within LEASE_TTL.
        places.held.remove(&id);
        places.released.push((key, id, Instant::now()));
        drop(places);
        self.ledger.released.notify_one();
    }
}

/// Renews every held lease each [`RENEW_EVERY`], all in flight together, and gives back
/// released ones as they come. A release that fails is tried again at the next renewal, until
/// the place would have expired anyway.
async fn keep(redis: Redis, ledger: Arc<Ledger>, stop: CancellationToken) {
    let renewal = Script::new(RENEW);
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retrying: Vec<Released> = Vec::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = ledger.released.notified() => {}
            _ = tick.tick() => {
                let held: Vec<_> = ledger.places().held.clone().into_iter().collect();
                renew(&redis, &renewal, &held).await;
                retrying = give_back(&redis, std::mem::take(&mut retrying)).await;
            }
        }
        let released = std::mem::take(&mut ledger.places().released);
        retrying.extend(give_back(&redis, released).await);
    }
    // Give back what was released meanwhile; the rest expires by itself.
    let released = std::mem::take(&mut ledger.places().released);
    give_back(&redis, released).await;
}

/// Removes released places from Redis; returns those to try again (not yet expired by then).
async fn give_back(redis: &Redis, released: Vec<Released>) -> Vec<Released> {
    let attempts = released.into_iter().map(|(key, id, at)| async move {
        let settled = release(redis, &key, &id).await || at.elapsed() >= LEASE_TTL;
        (!settled).then_some((key, id, at))
    });
    futures_util::future::join_all(attempts)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// True once Redis no longer holds the place.
async fn release(redis: &Redis, key: &str, id: &str) -> bool {
    let removed: Result<i64, _> = redis::cmd("ZREM")
        .arg(key)
        .arg(id)
        .query_async(&mut redis.conn())
        .await;
    if let Err(e) = &removed {
        tracing::warn!(
            "could not give back a stream place (tried again, and it expires by itself): {e}"
        );
    }
    removed.is_ok()
}

async fn renew(redis: &Redis, script: &Script, held: &[(String, String)]) {
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
