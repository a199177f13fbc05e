//! The index of live answers that the sweep reads: one sorted set, each chat scored by when its
//! answer's lease ends (roughly: producers refresh it every few renewals).
//!
//! It is an index, not the truth. The truth is each chat's own hash and lease, and no script can
//! touch both those and this set in a Redis Cluster (they live in different slots). So the
//! index may drift: an unmark lost with its connection, an entry written by hand, a hash that
//! expired or was evicted. The sweep corrects what it reads. An entry with no live answer behind
//! it is removed, and one whose owner still holds the lease is pushed back. Only entries whose
//! answers really lapsed are left for the sweep to take over, so stale entries never stand in
//! front of a dead instance's answers.

use redis::Script;

use super::{LEASE_TTL, millis, now_ms, unavailable};
use crate::shared::Redis;
use crate::stream_log::LogError;

/// Entries read per sweep at most; whatever is left waits for the next sweep.
const SWEEP_PAGE: usize = 1000;

/// `KEYS[1]` the answer's hash, `KEYS[2]` its lease: `0` nothing live (no hash, or ended, or a
/// claim that never opened and lapsed), `1` its owner holds the lease, `2` live and lapsed.
const LIVENESS: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
if redis.call('HGET', KEYS[1], 'state') == 'live' then return 2 end
return 0
";

/// Removes `ARGV[1]` from the index `KEYS[1]` only if its score is still `ARGV[2]`. If a new
/// answer marked the chat since it was read, the entry stays.
const REMOVE_IF_UNCHANGED: &str = r"
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
";

/// What the chat's own keys say about an index entry.
enum Liveness {
    Gone,
    Held,
    Lapsed,
}

#[derive(Clone)]
pub(super) struct LiveIndex {
    redis: Redis,
    key: String,
}

struct Scripts {
    liveness: Script,
    remove_if_unchanged: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        liveness: Script::new(LIVENESS),
        remove_if_unchanged: Script::new(REMOVE_IF_UNCHANGED),
    })
}

impl LiveIndex {
    pub fn new(redis: Redis) -> Self {
        let key = redis.key("live");
        Self { redis, key }
    }

    /// Marks the chat's answer as live until `now + LEASE_TTL`.
    pub async fn mark(&self, chat_id: &str) {
        let until = now_ms() + millis(LEASE_TTL);
        let marked: Result<i64, _> = redis::cmd("ZADD")
            .arg(&self.key)
            .arg(until)
            .arg(chat_id)
            .query_async(&mut self.redis.conn())
            .await;
        if let Err(e) = marked {
            tracing::debug!("could not mark a live answer for the sweep: {e}");
        }
    }

    pub async fn unmark(&self, chat_id: &str) {
        let removed: Result<i64, _> = redis::cmd("ZREM")
            .arg(&self.key)
            .arg(chat_id)
            .query_async(&mut self.redis.conn())
            .await;
        if let Err(e) = removed {
            tracing::debug!("could not unmark a live answer: {e}");
        }
    }

    /// The chats whose answers' leases really lapsed, after correcting every entry that is due.
    pub async fn lapsed(&self) -> Result<Vec<String>, LogError> {
        let due: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(&self.key)
            .arg("-inf")
            .arg(now_ms())
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(SWEEP_PAGE)
            .query_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)?;
        let mut lapsed = Vec::new();
        for (chat_id, score) in due {
            match self.liveness(&chat_id).await? {
                Liveness::Gone => self.remove_if_unchanged(&chat_id, score).await?,
                Liveness::Held => self.mark(&chat_id).await,
                Liveness::Lapsed => lapsed.push(chat_id),
            }
        }
        Ok(lapsed)
    }

    async fn liveness(&self, chat_id: &str) -> Result<Liveness, LogError> {
        let keys = self.redis.chat_keys(chat_id);
        let code: i64 = scripts()
            .liveness
            .key(&keys.answer)
            .key(&keys.lease)
            .invoke_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)?;
        Ok(match code {
            1 => Liveness::Held,
            2 => Liveness::Lapsed,
            _ => Liveness::Gone,
        })
    }

    async fn remove_if_unchanged(&self, chat_id: &str, score: f64) -> Result<(), LogError> {
        let _: i64 = scripts()
            .remove_if_unchanged
            .key(&self.key)
            .arg(chat_id)
            .arg(score)
            .invoke_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
