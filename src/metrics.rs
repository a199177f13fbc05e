//! Prometheus metrics, one registry per server (no global recorder: two servers in one process —
//! the test suite — never mix their numbers). Names follow Prometheus conventions: the `mangoo_`
//! prefix, `_seconds` for durations, `_total` for counters (added by the encoder).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route template (`/api/v1/chats/{chat_id}/messages`), never the raw path.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `done`, `stopped`, `interrupted`, or the error code.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub provider: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub provider: String,
    pub model: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub provider: String,
    pub model: String,
    /// `input` or `output`.
    pub direction: String,
}

/// Tokens of each turn by bot, as the usage ledger records them (no user label: per-user
/// numbers are the ledger's, `GET /api/v1/admin/usage`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BotTokenLabels {
    pub bot: String,
    /// The provider that answered; `none` when no target did.
    pub provider: String,
    /// `input` or `output`.
    pub direction: String,
    /// `reported` by the provider, or `counted` by Mangoo when it reported nothing.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// Redis's `maxmemory-policy`, or `unknown` where `CONFIG` is not allowed.
    pub policy: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latencies from a millisecond to ten minutes.
fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0, 300.0, 600.0,
    ])
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub streams_open: Gauge,
    pub streams: Family<OutcomeLabels, Counter>,
    pub time_to_first_token: Histograms<UpstreamLabels>,
    pub inter_token_gap: Histograms<UpstreamLabels>,
    pub stream_duration: Histogram,
    pub upstream_latency: Histograms<UpstreamLabels>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub bot_tokens: Family<BotTokenLabels, Counter>,
    pub heartbeats: Counter,
    pub resumes: Counter,
    /// Answers' outcomes offered to storage again after it refused them (the database away).
    pub answer_store_retries: Counter,
    pub rate_limited: Family<ReasonLabels, Counter>,
    pub connections_open: Gauge,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub local_prompt_tokens: Counter,
    pub redis_used_memory: Gauge,
    pub redis_maxmemory_policy: Family<PolicyLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let histograms = || Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let metrics = Self {
            http_requests: Family::default(),
            streams_open: Gauge::default(),
            streams: Family::default(),
            time_to_first_token: histograms(),
            inter_token_gap: histograms(),
            stream_duration: latency_histogram(),
            upstream_latency: histograms(),
            upstream_errors: Family::default(),
            tokens: Family::default(),
            bot_tokens: Family::default(),
            heartbeats: Counter::default(),
            resumes: Counter::default(),
            answer_store_retries: Counter::default(),
            rate_limited: Family::default(),
            connections_open: Gauge::default(),
            connections_refused: Family::default(),
            local_prompt_tokens: Counter::default(),
            redis_used_memory: Gauge::default(),
            redis_maxmemory_policy: Family::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        registry.register(
            "mangoo_http_requests",
            "HTTP requests by route and status",
            m.http_requests.clone(),
        );
        registry.register(
            "mangoo_streams_open",
            "SSE streams open now",
            m.streams_open.clone(),
        );
        registry.register(
            "mangoo_streams",
            "Answers ended, by outcome",
            m.streams.clone(),
        );
        registry.register(
            "mangoo_time_to_first_token_seconds",
            "From calling the provider to its first token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "mangoo_inter_token_gap_seconds",
            "Time between two tokens of an answer",
            m.inter_token_gap.clone(),
        );
        registry.register(
            "mangoo_stream_duration_seconds",
            "Whole answers, from start to terminal event",
            m.stream_duration.clone(),
        );
        registry.register(
            "mangoo_upstream_latency_seconds",
            "From calling the provider to its accepting the request",
            m.upstream_latency.clone(),
        );
        registry.register(
            "mangoo_upstream_errors",
            "Provider failures by code",
            m.upstream_errors.clone(),
        );
        registry.register(
            "mangoo_tokens",
            "Tokens billed by providers",
            m.tokens.clone(),
        );
        registry.register(
            "mangoo_bot_tokens",
            "Tokens of every turn by bot and provider, as the usage ledger records them",
            m.bot_tokens.clone(),
        );
        registry.register(
            "mangoo_heartbeats",
            "Heartbeat comments sent",
            m.heartbeats.clone(),
        );
        registry.register(
            "mangoo_resumes",
            "Streams resumed by Last-Event-ID",
            m.resumes.clone(),
        );
        registry.register(
            "mangoo_answer_store_retries",
            "Times an answer's outcome was offered to storage again after the database refused it",
            m.answer_store_retries.clone(),
        );
        registry.register(
            "mangoo_rate_limited",
            "Requests refused by a limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "mangoo_connections_open",
            "Client connections open on the main listener",
            m.connections_open.clone(),
        );
        registry.register(
            "mangoo_connections_refused",
            "Client connections closed at once by a connection cap",
            m.connections_refused.clone(),
        );
        registry.register(
            "mangoo_local_prompt_tokens",
            "Prompt tokens the local model computed (cached prefixes excluded)",
            m.local_prompt_tokens.clone(),
        );
        registry.register(
            "mangoo_redis_used_memory_bytes",
            "Memory the shared Redis uses (INFO used_memory, summed over a cluster's nodes)",
            m.redis_used_memory.clone(),
        );
        registry.register(
            "mangoo_redis_maxmemory_policy",
            "1 for the shared Redis's eviction policy (anything but noeviction loses leases under memory pressure)",
            m.redis_maxmemory_policy.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn upstream(provider: &str, model: &str) -> UpstreamLabels {
        UpstreamLabels {
            provider: provider.to_owned(),
            model: model.to_owned(),
        }
    }

    pub fn observe(histogram: &Histogram, elapsed: Duration) {
        histogram.observe(elapsed.as_secs_f64());
    }
}
