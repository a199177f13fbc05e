//! Who is on the other end of a request: the client's address (believing `X-Forwarded-For` only
//! from trusted proxies) and the request id (taken from a trusted proxy's `X-Request-Id`, else
//! generated). Computed once per request by the context middleware and kept in its extensions.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;

use crate::config::parse_cidr;

/// The peers whose forwarding headers are believed (`[server] trusted_proxies`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    any: bool,
    networks: Vec<(IpAddr, u8)>,
}

impl TrustedProxies {
    /// From the validated configuration: CIDRs, bare addresses or "*".
    pub fn new(entries: &[String]) -> Self {
        Self {
            any: entries.iter().any(|e| e == "*"),
            networks: entries.iter().filter_map(|e| parse_cidr(e).ok()).collect(),
        }
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.any
            || self
                .networks
                .iter()
                .any(|(network, prefix)| in_network(ip, *network, *prefix))
    }

    /// The client's address: the peer's own, unless the peer is a trusted proxy, in which case
    /// the right-most `X-Forwarded-For` entry that is not itself a trusted proxy (entries to its
    /// left were written by the client and prove nothing). With `"*"` every peer is one trusted
    /// hop and nothing more: the right-most entry, the one that hop appended, is the client.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|entry| parse_forwarded(entry.trim()))
            .collect();
        if self.any {
            return forwarded.last().copied().unwrap_or(peer);
        }
        // Every entry is a trusted proxy: the left-most is as far as the chain can be believed.
        forwarded
            .iter()
            .rev()
            .find(|ip| !self.trusts(**ip))
            .or(forwarded.first())
            .copied()
            .unwrap_or(peer)
    }

    /// True when `"*"` is configured, which start-up warns about.
    pub fn trusts_any_peer(&self) -> bool {
        self.any
    }
}

/// `203.0.113.7`, `[2001:db8::1]:443` or `203.0.113.7:5000`.
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

fn in_network(ip: IpAddr, network: IpAddr, prefix: u8) -> bool {
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V4(_)) => ip
            .to_ipv4_mapped()
            .is_some_and(|v4| in_network(IpAddr::V4(v4), network, prefix)),
        _ => false,
    }
}

/// A request id from a trusted proxy is kept when it looks like one a proxy makes — 1 to 64
/// letters, digits and `-_.:` (nginx's `$request_id`, HAProxy's `unique-id`, a UUID, an AWS
/// trace id's parts) — so nothing odd reaches the logs; otherwise one is made.
pub fn request_id(trusted_peer: bool, headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .filter(|_| trusted_peer)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_sane_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

fn is_sane_request_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// What the context middleware learned about a request.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub client_ip: IpAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", xff.parse().unwrap());
        headers
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_peers() {
        let proxies = TrustedProxies::new(&["10.0.0.0/8".into()]);
        let from_proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "198.51.100.9".parse().unwrap();
        let xff = headers("1.1.1.1, 203.0.113.7, 10.0.0.5");
        assert_eq!(
            proxies.client_ip(from_proxy, &xff),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(proxies.client_ip(stranger, &xff), stranger);
        assert_eq!(proxies.client_ip(from_proxy, &HeaderMap::new()), from_proxy);
    }

    #[test]
    fn a_wildcard_trusts_everyone_and_networks_match_by_prefix() {
        assert!(TrustedProxies::new(&["*".into()]).trusts("8.8.8.8".parse().unwrap()));
        let loopback = TrustedProxies::new(&["127.0.0.1".into(), "::1".into()]);
        assert!(loopback.trusts("127.0.0.1".parse().unwrap()));
        assert!(!loopback.trusts("127.0.0.2".parse().unwrap()));
        assert!(loopback.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!TrustedProxies::default().trusts("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn a_wildcard_is_one_hop_so_the_client_cannot_pick_its_address() {
        let any = TrustedProxies::new(&["*".into()]);
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        // The client wrote "6.6.6.6"; the proxy appended the address it saw.
        let xff = headers("6.6.6.6, 203.0.113.7");
        assert_eq!(
            any.client_ip(peer, &xff),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(any.client_ip(peer, &HeaderMap::new()), peer);
    }

    #[test]
    fn request_ids_come_from_trusted_peers_only() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(request_id(true, &headers), "abc-123");
        assert_ne!(request_id(false, &headers), "abc-123");
        headers.insert("x-request-id", "has space".parse().unwrap());
        assert_ne!(request_id(true, &headers), "has space");
        for odd in ["<script>", "a\"b", "{\"json\":1}", &"x".repeat(65)] {
            headers.insert("x-request-id", odd.parse().unwrap());
            assert_ne!(request_id(true, &headers), odd);
        }
        let haproxy = "7F000001:8296_7F00001E:1F90_4F7B0A69_0003:790A";
        headers.insert("x-request-id", haproxy.parse().unwrap());
        assert_eq!(request_id(true, &headers), haproxy);
    }
}
