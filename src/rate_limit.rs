//! Request rate limits (GCRA) and the cap on concurrent streams, per user — or per client address
//! for requests that are not authenticated, so guessing tokens is slow too.
//!
//! [`RateLimiter`] is the seam: [`MemoryRateLimiter`] is the in-process one; with shared state
//! `shared::limits` decides in one Lua script on Redis for every instance (and holds the stream
//! cap's places as expiring leases). Its keyed state is bounded: keys whose
//! limit has fully recovered carry no information and are swept out, and the table has a cap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a rate-limit check says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests the key may still make right now.
    pub remaining: u32,
    /// When refused: how long until one request is allowed again.
    pub retry_after: Duration,
    /// How long until the key's allowance is full again.
    pub reset_after: Duration,
}

/// A limiter that could not decide (a shared one: its server is unreachable).
#[derive(Debug, thiserror::Error)]
#[error("the rate limiter is unavailable: {0}")]
pub struct LimitError(pub String);

/// Async and fallible: a shared implementation asks a server on every request.
#[async_trait::async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    async fn check(&self, key: &str) -> Result<Decision, LimitError>;
    /// The burst: how many requests a fresh key may make at once.
    fn limit(&self) -> u32;
}

/// Keys kept at most; past this, recovered keys are swept and, if that is not enough, the
/// request is judged on a fresh state rather than growing the table.
const MAX_KEYS: usize = 100_000;

/// The generic cell rate algorithm: one "theoretical arrival time" per key.
pub struct MemoryRateLimiter {
    interval: Duration,
    burst: u32,
    arrivals: Mutex<HashMap<String, Instant>>,
}

impl MemoryRateLimiter {
    pub fn new(requests_per_second: f64, burst: u32) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / requests_per_second),
            burst: burst.max(1),
            arrivals: Mutex::default(),
        }
    }

    fn tolerance(&self) -> Duration {
        self.interval * self.burst
    }
}

#[async_trait::async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn check(&self, key: &str) -> Result<Decision, LimitError> {
        Ok(self.decide(key))
    }

    fn limit(&self) -> u32 {
        self.burst
    }
}

impl MemoryRateLimiter {
    fn decide(&self, key: &str) -> Decision {
        let now = Instant::now();
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        if arrivals.len() >= MAX_KEYS && !arrivals.contains_key(key) {
            arrivals.retain(|_, tat| *tat > now);
        }
        let tat = arrivals.get(key).copied().unwrap_or(now).max(now);
        let next = tat + self.interval;
        let ahead = next - now;
        let tolerance = self.tolerance();
        if ahead > tolerance {
            let backlog = tat - now;
            return Decision {
                allowed: false,
                remaining: 0,
                retry_after: ahead - tolerance,
                reset_after: backlog,
            };
        }
        if arrivals.len() < MAX_KEYS || arrivals.contains_key(key) {
            arrivals.insert(key.to_owned(), next);
        }
        let remaining = ((tolerance - ahead).as_secs_f64() / self.interval.as_secs_f64()) as u32;
        Decision {
            allowed: true,
            remaining,
            retry_after: Duration::ZERO,
            reset_after: ahead,
        }
    }
}

/// Open streams per user, capped. A [`StreamSlot`] is held by the stream's body; dropping it
/// (the stream ended or the client left) gives the place back.
#[derive(Debug, Clone)]
pub struct StreamSlots {
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl StreamSlots {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// A place for one more stream of `user`, or `None` at the cap.
    pub fn take(&self, user: &str) -> Option<StreamSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(user.to_owned()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(StreamSlot {
            user: user.to_owned(),
            open: self.open.clone(),
        })
    }
}

#[derive(Debug)]
pub struct StreamSlot {
    user: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.user); // no entry for users with nothing open
            }
        }
    }
}

/// The per-user cap on concurrent streams: counted in this process, or — with shared state —
/// as leases in Redis that every instance counts against.
#[derive(Clone)]
pub enum StreamCap {
    Local(StreamSlots),
    Shared(crate::shared::limits::StreamLeases),
}

impl StreamCap {
    /// A place for one more stream of `user`, or `None` at the cap.
    pub async fn take(&self, user: &str) -> Result<Option<StreamPlace>, LimitError> {
        match self {
            StreamCap::Local(slots) => Ok(slots.take(user).map(StreamPlace::Local)),
            StreamCap::Shared(leases) => Ok(leases.take(user).await?.map(StreamPlace::Shared)),
        }
    }
}

/// One stream's place under the cap, given back when dropped.
#[derive(Debug)]
pub enum StreamPlace {
    Local(StreamSlot),
    Shared(crate::shared::limits::StreamLease),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_requests_wait_for_the_rate() {
        let limiter = MemoryRateLimiter::new(1.0, 3);
        let decisions: Vec<_> = (0..4).map(|_| limiter.decide("alice")).collect();
        assert!(decisions[..3].iter().all(|d| d.allowed));
        assert_eq!(decisions[0].remaining, 2);
        assert_eq!(decisions[2].remaining, 0);
        assert!(!decisions[3].allowed);
        assert!(decisions[3].retry_after > Duration::from_millis(900));
        assert!(decisions[3].retry_after <= Duration::from_secs(1));
        assert!(limiter.decide("bob").allowed, "keys are independent");
    }

    #[test]
    fn stream_slots_are_capped_per_user_and_given_back_on_drop() {
        let slots = StreamSlots::new(2);
        let a = slots.take("alice").unwrap();
        let _b = slots.take("alice").unwrap();
        assert!(slots.take("alice").is_none());
        assert!(slots.take("bob").is_some());
        drop(a);
        assert!(slots.take("alice").is_some());
    }
}
