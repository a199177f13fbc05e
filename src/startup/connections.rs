//! What each client connection may hold: a place under the global and per-address caps, and a
//! count of its requests in flight (open response bodies included), so that a connection with
//! nothing to do — an HTTP/2 client that sent its preface and nothing else, an HTTP/1.1
//! keep-alive left open — is closed after the idle timeout instead of holding a descriptor
//! forever.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

use crate::http::body_end::OnBodyEnd;
use crate::http::client_address::TrustedProxies;
use crate::metrics::{Metrics, ReasonLabels};

/// `[server]` limits on connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_per_address: usize,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Proxies carry many clients on their connections: the per-address cap does not apply.
    pub exempt: TrustedProxies,
}

/// Hands out connection places; a [`ConnectionPlace`] gives its place back when dropped.
pub struct ConnectionGate {
    limits: ConnectionLimits,
    open: Arc<OpenConnections>,
    gauge: Gauge,
    refused: Family<ReasonLabels, Counter>,
}

#[derive(Default)]
struct OpenConnections {
    total: AtomicUsize,
    by_address: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionGate {
    pub fn new(limits: ConnectionLimits, metrics: &Metrics) -> Self {
        Self {
            limits,
            open: Arc::default(),
            gauge: metrics.connections_open.clone(),
            refused: metrics.connections_refused.clone(),
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        self.limits.idle_timeout
    }

    /// A place for a new connection from `ip`, or `None` at a cap (the connection is closed).
    pub fn admit(&self, ip: IpAddr) -> Option<ConnectionPlace> {
        let counted = !self.limits.exempt.trusts(ip);
        let mut by_address = self
            .open
            .by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.open.total.load(Ordering::SeqCst) >= self.limits.max_connections {
            self.refuse("max_connections");
            return None;
        }
        if counted {
            let count = by_address.entry(ip).or_insert(0);
            if *count >= self.limits.max_per_address {
                self.refuse("max_connections_per_address");
                return None;
            }
            *count += 1;
        }
        self.open.total.fetch_add(1, Ordering::SeqCst);
        self.gauge.inc();
        Some(ConnectionPlace {
            ip: counted.then_some(ip),
            open: self.open.clone(),
            gauge: self.gauge.clone(),
        })
    }

    fn refuse(&self, reason: &str) {
        let labels = ReasonLabels {
            reason: reason.into(),
        };
        self.refused.get_or_create(&labels).inc();
    }
}

pub struct ConnectionPlace {
    /// Set when the connection counts against its address.
    ip: Option<IpAddr>,
    open: Arc<OpenConnections>,
    gauge: Gauge,
}

impl Drop for ConnectionPlace {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut by_address = self
                .open
                .by_address
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(count) = by_address.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    by_address.remove(&ip);
                }
            }
        }
        self.open.total.fetch_sub(1, Ordering::SeqCst);
        self.gauge.dec();
    }
}

/// The requests of one connection that are not finished: from the moment hyper hands one over
/// until its response body is done or dropped (an SSE stream counts for its whole life).
#[derive(Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    changed: Notify,
}

impl Activity {
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        Busy(self.clone())
    }

    /// Resolves once nothing has been in flight for `limit` in a row.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                changed.await;
                continue;
            }
            if tokio::time::timeout(limit, changed).await.is_err()
                && self.in_flight.load(Ordering::SeqCst) == 0
            {
                return;
            }
        }
    }
}

/// One request in flight; dropping it ends it.
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// A response body keeps its request counted as in flight until it is done or dropped.
impl OnBodyEnd for Busy {
    fn body_ended(self, _completed: bool) {}
}

/// How long the accept loop waits after an accept error (out of descriptors, say) before it tries
/// again: doubling from 5 ms to 1 s, so a persistent error costs a few wake-ups a second instead
/// of a core spinning on it, and the first success resets it.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    delay: Option<Duration>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    pub fn failed(&mut self) -> Duration {
        let next = self
            .delay
            .map_or(Self::FIRST, |delay| (delay * 2).min(Self::MAX));
        self.delay = Some(next);
        next
    }

    pub fn succeeded(&mut self) {
        self.delay = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: usize, per_address: usize, exempt: &[&str]) -> ConnectionGate {
        let limits = ConnectionLimits {
            max_connections: max,
            max_per_address: per_address,
            idle_timeout: Duration::from_secs(1),
            exempt: TrustedProxies::new(
                &exempt.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            ),
        };
        ConnectionGate::new(limits, &Metrics::new())
    }

    #[test]
    fn addresses_and_the_whole_server_are_capped_and_places_come_back() {
        let gate = gate(3, 2, &["10.0.0.1"]);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let first = gate.admit(a).unwrap();
        let _second = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "per-address cap");
        let _third = gate.admit(b).unwrap();
        assert!(gate.admit(b).is_none(), "global cap");
        drop(first);
        assert!(gate.admit(a).is_some());
    }

    #[test]
    fn trusted_proxies_are_not_held_to_the_per_address_cap() {
        let gate = gate(10, 1, &["10.0.0.1"]);
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let places: Vec<_> = (0..5).map(|_| gate.admit(proxy)).collect();
        assert!(places.iter().all(Option::is_some));
    }

    #[test]
    fn accept_errors_back_off_doubling_to_a_ceiling_and_reset_on_success() {
        let mut backoff = AcceptBackoff::default();
        let delays: Vec<_> = (0..10).map(|_| backoff.failed()).collect();
        assert_eq!(delays[0], Duration::from_millis(5));
        assert_eq!(delays[1], Duration::from_millis(10));
        assert!(delays.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(1));
        backoff.succeeded();
        assert_eq!(backoff.failed(), Duration::from_millis(5));
    }

    #[tokio::test]
    async fn a_connection_is_idle_only_once_nothing_is_in_flight() {
        use futures_util::FutureExt;
        let activity = Arc::new(Activity::default());
        let busy = activity.begin();
        assert!(
            activity.idle_for(Duration::ZERO).now_or_never().is_none(),
            "a request in flight: it waits for that to end"
        );
        drop(busy);
        let idle = activity.idle_for(Duration::from_millis(1));
        tokio::time::timeout(Duration::from_secs(20), idle)
            .await
            .expect("idle once the request ended");
    }
}
