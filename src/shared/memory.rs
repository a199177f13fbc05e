//! Redis's memory, watched: its eviction policy and how much it uses.
//!
//! Under any policy but `noeviction`, a Redis short of memory deletes keys to make room. Managed
//! Redis defaults to `volatile-lru`, which evicts keys that have a TTL first, and every key
//! Mangoo relies on has one: answer leases (false take-overs), stream-cap places (the cap
//! bypassed), rate-limit state (the limit bypassed). A full Redis must refuse writes instead.
//! Mangoo then answers 503 and nothing is silently forgotten. So this warns loudly unless the
//! policy is `noeviction`, and exports both the policy and the used memory as metrics. Where
//! `CONFIG` is forbidden (ElastiCache renames it away), the policy is reported as `unknown` and
//! must be set in the parameter group (the CDK stack does).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Redis;
use crate::metrics::{Metrics, PolicyLabels};

/// How often the policy and the used memory are read again.
const EVERY: Duration = Duration::from_secs(15);

/// Watches Redis's memory until `stop` (the caller tracks it).
pub async fn watch(redis: Redis, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let policy = eviction_policy(&redis).await;
        if let Some(policy) = &policy
            && reported.as_ref() != Some(policy)
        {
            warn_about(policy);
            metrics.redis_maxmemory_policy.clear();
            let labels = PolicyLabels {
                policy: policy.clone(),
            };
            metrics.redis_maxmemory_policy.get_or_create(&labels).set(1);
            reported = Some(policy.clone());
        }
        if let Some(bytes) = used_memory(&redis).await {
            metrics.redis_used_memory.set(bytes);
        }
    }
}

fn warn_about(policy: &str) {
    match policy {
        "noeviction" => tracing::info!("redis maxmemory-policy is noeviction"),
        "unknown" => tracing::warn!(
            "could not read redis maxmemory-policy (CONFIG is not allowed here): make sure it \
             is noeviction, or a Redis short of memory deletes answer leases, stream-cap places \
             and rate-limit state"
        ),
        other => tracing::warn!(
            policy = other,
            "redis maxmemory-policy is {other}, not noeviction: a Redis short of memory will \
             delete answer leases (false take-overs), stream-cap places and rate-limit state \
             (limits bypassed); set maxmemory-policy noeviction"
        ),
    }
}

/// The policy, `unknown` when Redis refuses to say, `None` when Redis is unreachable.
async fn eviction_policy(redis: &Redis) -> Option<String> {
    let reply: Result<Vec<String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut redis.conn())
        .await;
    match reply {
        Ok(pair) => Some(pair.get(1).cloned().unwrap_or_else(|| "unknown".into())),
        Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => None,
        // Refused (ElastiCache: "unknown command"), or not allowed to this user.
        Err(_) => Some("unknown".into()),
    }
}

/// `used_memory` from `INFO memory`: summed over the nodes when a cluster answers per node.
async fn used_memory(redis: &Redis) -> Option<i64> {
    let reply: redis::Value = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut redis.conn())
        .await
        .ok()?;
    let mut total = 0;
    let mut found = false;
    for text in info_texts(&reply) {
        if let Some(bytes) = text
            .lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse::<i64>().ok())
        {
            total += bytes;
            found = true;
        }
    }
    found.then_some(total)
}

fn info_texts(reply: &redis::Value) -> Vec<String> {
    match reply {
        redis::Value::BulkString(bytes) => vec![String::from_utf8_lossy(bytes).into_owned()],
        redis::Value::VerbatimString { text, .. } => vec![text.clone()],
        redis::Value::SimpleString(text) => vec![text.clone()],
        redis::Value::Map(pairs) => pairs.iter().flat_map(|(_, v)| info_texts(v)).collect(),
        redis::Value::Array(values) => values.iter().flat_map(info_texts).collect(),
        _ => Vec::new(),
    }
}
