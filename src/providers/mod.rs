//! Language-model providers: one module per vendor behind the [`ChatProvider`] trait, dispatched
//! through the closed [`Provider`] enum. Providers know nothing of HTTP clients of ours, SSE or
//! storage: they turn a [`ModelRequest`] into a stream of [`ProviderEvent`]s, and every vendor's
//! failures into the same [`ProviderError`] kinds, so the stream pipeline treats them alike.

pub mod anthropic;
pub mod bedrock;
mod http_sse;
pub mod local;
pub mod openai;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use futures_util::stream::BoxStream;

use crate::config::{Config, TargetConfig};
use crate::domain::{Role, TokenUsage};

pub use anthropic::AnthropicProvider;
pub use bedrock::BedrockProvider;
pub use local::LocalProvider;
pub use openai::OpenAiProvider;

/// One conversation, ready for a model.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub model: String,
    pub system_prompt: Option<String>,
    /// Alternating user/assistant turns, first and last from the user.
    pub messages: Vec<ModelMessage>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMessage {
    pub role: Role,
    pub content: String,
}

/// What a provider streams back.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderEvent {
    /// A piece of the answer's text, to be sent on the moment it arrives.
    TextDelta(String),
    /// Token accounting; may arrive after the last delta.
    Usage(TokenUsage),
}

pub type ProviderStream = BoxStream<'static, Result<ProviderEvent, ProviderError>>;

/// Provider failures, vendor-neutral. Each kind has one public error code and one retry verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderErrorKind {
    /// The provider refused for rate or quota: worth retrying later.
    Throttled,
    /// The provider rejected the request itself (validation, unknown model): retrying won't help.
    InvalidRequest,
    /// Our credentials may not use this model.
    AccessDenied,
    /// The provider or the connection to it took too long.
    Timeout,
    /// The provider said it is temporarily unable to serve.
    Unavailable,
    /// We could not reach the provider, or lost the connection mid-answer.
    Connection,
    /// Anything else that went wrong upstream.
    Upstream,
    /// The connection to the provider could not be opened in time.
    ConnectTimeout,
    /// The provider accepted the request but sent no token in time.
    FirstTokenTimeout,
    /// The provider went silent between two tokens for too long.
    IdleTimeout,
    /// The answer ran past the longest a stream may last.
    StreamTooLong,
    /// Our own capacity for this provider is taken (the local model's queue is full).
    Overloaded,
    /// The model cannot serve at all (the local model is not downloaded or failed to load).
    ModelUnavailable,
}

impl ProviderErrorKind {
    pub fn code(self) -> &'static str {
        match self {
            Self::Throttled => "upstream_throttled",
            Self::InvalidRequest => "upstream_invalid_request",
            Self::AccessDenied => "upstream_access_denied",
            Self::Timeout => "upstream_timeout",
            Self::Unavailable => "upstream_unavailable",
            Self::Connection => "upstream_connection_error",
            Self::Upstream => "upstream_error",
            Self::ConnectTimeout => "upstream_connect_timeout",
            Self::FirstTokenTimeout => "upstream_first_token_timeout",
            Self::IdleTimeout => "upstream_idle_timeout",
            Self::StreamTooLong => "stream_too_long",
            Self::Overloaded => "overloaded",
            Self::ModelUnavailable => "model_unavailable",
        }
    }

    pub fn retryable(self) -> bool {
        !matches!(
            self,
            Self::InvalidRequest
                | Self::AccessDenied
                | Self::ModelUnavailable
                | Self::StreamTooLong
        )
    }

    /// The plain words a client gets for this kind of failure at `provider`.
    pub fn describe(self, provider: &str) -> String {
        match self {
            Self::Throttled => format!("{provider} is limiting requests; retry shortly"),
            Self::InvalidRequest => format!("{provider} rejected the request"),
            Self::AccessDenied => format!("this server may not use the model at {provider}"),
            Self::Timeout => format!("{provider} did not answer in time"),
            Self::Unavailable => format!("{provider} is temporarily unavailable"),
            Self::Connection => format!("the connection to {provider} failed or was lost"),
            Self::ConnectTimeout => format!("could not connect to {provider} in time"),
            Self::FirstTokenTimeout => format!("{provider} sent no token in time"),
            Self::IdleTimeout => format!("{provider} went silent in the middle of the answer"),
            Self::StreamTooLong => "the answer took longer than a stream may last".into(),
            Self::Overloaded => format!("{provider} is busy with other answers; retry shortly"),
            Self::ModelUnavailable => format!("the {provider} model is not available"),
            Self::Upstream => format!("{provider} failed to answer"),
        }
    }

    /// The kind an HTTP status from a provider means, for providers spoken to over HTTP.
    pub fn from_status(status: u16) -> Self {
        match status {
            429 => Self::Throttled,
            401 | 403 => Self::AccessDenied,
            408 | 504 => Self::Timeout,
            503 | 529 => Self::Unavailable,
            400..=499 => Self::InvalidRequest,
            _ => Self::Upstream,
        }
    }
}

/// A provider failure. `message` is what the client is told: our own words, never the
/// upstream's (those can carry account ids, role ARNs, file paths or the prompt itself), which
/// travel in `detail` to the log.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: ProviderErrorKind,
    /// Safe to show users: says what failed, never carries credentials or upstream text.
    pub message: String,
    /// For the log only: what the upstream (or the local model) said.
    pub detail: Option<String>,
}

impl ProviderError {
    pub fn new(kind: ProviderErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            detail: None,
        }
    }

    /// An upstream's own failure: the client learns its kind at `provider`, the log its words.
    pub fn from_upstream(
        kind: ProviderErrorKind,
        provider: &str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            message: kind.describe(provider),
            detail: Some(detail.into()),
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The detail for a log line (empty when there is none).
    pub fn detail(&self) -> &str {
        self.detail.as_deref().unwrap_or_default()
    }
}

/// A place reserved for one request before its response starts. Most providers need none; the
/// local model hands out one of its bounded queue places, freed when the answer ends.
#[derive(Debug, Default)]
pub struct Admission {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The user's share of those places.
    _share: Option<crate::rate_limit::StreamSlot>,
}

impl Admission {
    pub fn with_permit(
        permit: tokio::sync::OwnedSemaphorePermit,
        share: crate::rate_limit::StreamSlot,
    ) -> Self {
        Self {
            _permit: Some(permit),
            _share: Some(share),
        }
    }
}

/// The contract every vendor module fulfils.
#[async_trait::async_trait]
pub trait ChatProvider: Send + Sync {
    /// Checks, before anything is streamed, that this provider can take one more request from
    /// `user`.
    fn admit(&self, _user: &str) -> Result<Admission, ProviderError> {
        Ok(Admission::default())
    }

    /// Starts generating. Returns once the provider accepted the request; dropping the stream
    /// cancels the request upstream, which is how a gone client stops the spending.
    async fn stream(
        &self,
        request: ModelRequest,
        admission: Admission,
    ) -> Result<ProviderStream, ProviderError>;
}

/// Every provider this build speaks. Closed on purpose: adding one is a deliberate change here.
pub enum Provider {
    Bedrock(BedrockProvider),
    Local(LocalProvider),
    Anthropic(AnthropicProvider),
    OpenAi(OpenAiProvider),
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Bedrock(_) => bedrock::PROVIDER_NAME,
            Provider::Local(_) => local::PROVIDER_NAME,
            Provider::Anthropic(_) => anthropic::PROVIDER_NAME,
            Provider::OpenAi(_) => openai::PROVIDER_NAME,
        }
    }

    fn inner(&self) -> &dyn ChatProvider {
        match self {
            Provider::Bedrock(p) => p,
            Provider::Local(p) => p,
            Provider::Anthropic(p) => p,
            Provider::OpenAi(p) => p,
        }
    }

    pub fn admit(&self, user: &str) -> Result<Admission, ProviderError> {
        self.inner().admit(user)
    }

    pub async fn stream(
        &self,
        request: ModelRequest,
        admission: Admission,
    ) -> Result<ProviderStream, ProviderError> {
        self.inner().stream(request, admission).await
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A bot's target with its provider resolved.
#[derive(Debug, Clone)]
pub struct Target {
    pub provider: Arc<Provider>,
    pub model: String,
}

/// Which client serves a target: one per provider, and for Bedrock one per region.
type ClientKey = (String, Option<String>);

/// The providers the configured bots use, each built once and shared by every request.
#[derive(Debug, Clone, Default)]
pub struct ProviderRegistry {
    providers: HashMap<ClientKey, Arc<Provider>>,
}

impl ProviderRegistry {
    pub async fn from_config(config: &Config, metrics: &crate::metrics::Metrics) -> Self {
        let mut providers = HashMap::new();
        for target in config.bots.iter().flat_map(|b| b.targets()) {
            if let std::collections::hash_map::Entry::Vacant(slot) =
                providers.entry(client_key(&target))
            {
                slot.insert(Arc::new(build_provider(config, &target, metrics).await));
            }
        }
        Self { providers }
    }

    pub fn resolve(&self, target: &TargetConfig) -> Option<Target> {
        self.providers
            .get(&client_key(target))
            .map(|provider| Target {
                provider: provider.clone(),
                model: target.model.clone(),
            })
    }
}

fn client_key(target: &TargetConfig) -> ClientKey {
    (target.provider.clone(), target.region.clone())
}

async fn build_provider(
    config: &Config,
    target: &TargetConfig,
    metrics: &crate::metrics::Metrics,
) -> Provider {
    let providers = &config.providers;
    // Validation already rejected unknown provider names.
    match target.provider.as_str() {
        bedrock::PROVIDER_NAME => {
            let mut settings = providers.bedrock.clone().unwrap_or_default();
            if target.region.is_some() {
                settings.region = target.region.clone();
            }
            Provider::Bedrock(BedrockProvider::new(&settings).await)
        }
        anthropic::PROVIDER_NAME => Provider::Anthropic(AnthropicProvider::new(
            &providers.anthropic.clone().unwrap_or_default(),
        )),
        openai::PROVIDER_NAME => Provider::OpenAi(OpenAiProvider::new(
            &providers.openai.clone().unwrap_or_default(),
        )),
        _ => Provider::Local(LocalProvider::new(
            &providers.local,
            metrics.local_prompt_tokens.clone(),
        )),
    }
}
