//! Language-model providers: one module per vendor behind the [`ChatProvider`] trait, dispatched
//! through the closed [`Provider`] enum. Providers know nothing of HTTP clients of ours, SSE or
//! storage: they turn a [`ModelRequest`] into a stream of [`ProviderEvent`]s, and every vendor's
//! failures into the same [`ProviderError`] kinds, so the stream pipeline treats them alike.

pub mod bedrock;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use futures_util::stream::BoxStream;

use crate::config::Config;
use crate::domain::{Role, TokenUsage};

pub use bedrock::BedrockProvider;

/// One conversation, ready for a model.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub model: String,
    pub system_prompt: Option<String>,
    /// Alternating user/assistant turns, first and last from the user.
    pub messages: Vec<ModelMessage>,
    pub temperature: Option<f32>,
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
        }
    }

    pub fn retryable(self) -> bool {
        !matches!(self, Self::InvalidRequest | Self::AccessDenied)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: ProviderErrorKind,
    /// Safe to show users: says what failed, never carries credentials.
    pub message: String,
}

impl ProviderError {
    pub fn new(kind: ProviderErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The contract every vendor module fulfils.
#[async_trait::async_trait]
pub trait ChatProvider: Send + Sync {
    /// Starts generating. Returns once the provider accepted the request; dropping the stream
    /// cancels the request upstream, which is how a gone client stops the spending.
    async fn stream(&self, request: ModelRequest) -> Result<ProviderStream, ProviderError>;
}

/// Every provider this build speaks. Closed on purpose: adding one is a deliberate change here.
pub enum Provider {
    Bedrock(BedrockProvider),
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Bedrock(_) => bedrock::PROVIDER_NAME,
        }
    }

    pub async fn stream(&self, request: ModelRequest) -> Result<ProviderStream, ProviderError> {
        match self {
            Provider::Bedrock(p) => p.stream(request).await,
        }
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The providers the configured bots use, each built once and shared by every request.
#[derive(Debug, Clone, Default)]
pub struct ProviderRegistry {
    providers: HashMap<String, Arc<Provider>>,
}

impl ProviderRegistry {
    pub async fn from_config(config: &Config) -> Self {
        let mut providers = HashMap::new();
        for bot in &config.bots {
            if providers.contains_key(&bot.provider) {
                continue;
            }
            // Validation already rejected unknown provider names.
            if bot.provider == bedrock::PROVIDER_NAME {
                let settings = config.providers.bedrock.clone().unwrap_or_default();
                let provider = Provider::Bedrock(BedrockProvider::new(&settings).await);
                providers.insert(bot.provider.clone(), Arc::new(provider));
            }
        }
        Self { providers }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Provider>> {
        self.providers.get(name).cloned()
    }
}
