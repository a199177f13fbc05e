//! Provider settings: `[providers.bedrock]`, `[providers.local]`, `[providers.anthropic]`,
//! `[providers.openai]`.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Secret, invalid};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersConfig {
    pub bedrock: Option<BedrockConfig>,
    pub local: LocalConfig,
    pub anthropic: Option<AnthropicConfig>,
    pub openai: Option<OpenAiConfig>,
}

/// The embedded model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// The GGUF file; `MANGOO_LOCAL_MODEL` wins. Default: the `mangoo model fetch` cache.
    pub model_path: Option<PathBuf>,
    /// Answers decoded at once, each on its own thread.
    pub concurrency: usize,
    /// Threads one answer's matrix products are split across; 0 means one per core.
    pub threads: usize,
    /// Answers that may wait for a decoding thread; beyond that, 503 with Retry-After.
    pub queue_size: usize,
    /// Places (decoding or waiting) one user may hold at once.
    pub max_queued_per_user: usize,
    /// The longest prompt (system prompt, history, message) evaluated; older turns are dropped
    /// to fit, and a message longer than this alone is refused.
    pub max_prompt_tokens: usize,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            model_path: None,
            concurrency: 1,
            threads: 0,
            queue_size: 8,
            max_queued_per_user: 2,
            // ~8,000 characters of English: a few seconds of prefill on one core.
            max_prompt_tokens: 2048,
        }
    }
}

/// Anthropic's Messages API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnthropicConfig {
    /// `ANTHROPIC_API_KEY` is used when absent.
    pub api_key: Option<Secret>,
    pub base_url: String,
    pub version: String,
    pub connect_timeout_secs: u64,
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            base_url: "https://api.anthropic.com".into(),
            version: "2023-06-01".into(),
            connect_timeout_secs: 10,
        }
    }
}

/// An OpenAI-compatible `/v1/chat/completions` server: OpenAI, Ollama, vLLM, llama.cpp, LM Studio.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// `OPENAI_API_KEY` is used when absent; local servers often need none.
    pub api_key: Option<Secret>,
    /// Up to and including `/v1`.
    pub base_url: String,
    pub connect_timeout_secs: u64,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            base_url: "https://api.openai.com/v1".into(),
            connect_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BedrockConfig {
    /// AWS region; when absent the standard AWS region chain decides.
    pub region: Option<String>,
    /// Endpoint override: VPC endpoints, local test servers.
    pub endpoint_url: Option<String>,
    /// Attempts for a request that fails before streaming (throttling, 5xx); 1 disables retries.
    pub max_attempts: u32,
    /// Seconds allowed to open the connection to Bedrock.
    pub connect_timeout_secs: u64,
}

impl Default for BedrockConfig {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            max_attempts: 3,
            connect_timeout_secs: 10,
        }
    }
}

impl BedrockConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(region) = &self.region
            && region.trim().is_empty()
        {
            return Err(invalid("providers.bedrock.region", "must not be empty"));
        }
        if let Some(url) = &self.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "providers.bedrock.endpoint_url",
                format!("'{url}' must start with http:// or https://"),
            ));
        }
        if self.max_attempts == 0 {
            return Err(invalid(
                "providers.bedrock.max_attempts",
                "must be at least 1",
            ));
        }
        if self.connect_timeout_secs == 0 {
            return Err(invalid(
                "providers.bedrock.connect_timeout_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
