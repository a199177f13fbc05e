//! Anthropic's Messages API with `stream: true`: `content_block_delta` text becomes our deltas,
//! usage comes from `message_start` (input) and `message_delta` (output), and `error` events
//! (`overloaded_error` and the rest) map onto the shared error kinds.

use serde::{Deserialize, Serialize};

use super::http_sse::{Dialect, answer_stream, api_key, client, cut_short, open_stream};
use super::{
    Admission, ChatProvider, ModelRequest, ProviderError, ProviderErrorKind, ProviderEvent,
    ProviderStream,
};
use crate::config::AnthropicConfig;
use crate::domain::TokenUsage;

pub const PROVIDER_NAME: &str = "anthropic";

pub struct AnthropicProvider {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
    version: String,
}

impl AnthropicProvider {
    pub fn new(settings: &AnthropicConfig) -> Self {
        let api_key = api_key(settings.api_key.as_ref(), "ANTHROPIC_API_KEY");
        Self {
            http: client(settings.connect_timeout_secs),
            url: format!("{}/v1/messages", settings.base_url.trim_end_matches('/')),
            api_key,
            version: settings.version.clone(),
        }
    }
}

#[derive(Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

/// The stream events we read; everything is optional because servers differ in what they fill.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        #[serde(default)]
        message: Option<MessageStart>,
    },
    ContentBlockDelta {
        #[serde(default)]
        delta: Option<Delta>,
    },
    MessageDelta {
        #[serde(default)]
        usage: Option<Usage>,
    },
    MessageStop,
    Error {
        #[serde(default)]
        error: Option<ErrorBody>,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageStart {
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct Usage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

#[async_trait::async_trait]
impl ChatProvider for AnthropicProvider {
    async fn stream(
        &self,
        request: ModelRequest,
        _admission: Admission,
    ) -> Result<ProviderStream, ProviderError> {
        let body = MessagesRequest {
            model: &request.model,
            max_tokens: request.max_tokens,
            stream: true,
            system: request.system_prompt.as_deref(),
            messages: request
                .messages
                .iter()
                .map(|m| WireMessage {
                    role: m.role.as_str(),
                    content: &m.content,
                })
                .collect(),
            temperature: request.temperature,
            top_p: request.top_p,
        };
        let mut call = self
            .http
            .post(&self.url)
            .header("anthropic-version", &self.version)
            .json(&body);
        if let Some(key) = &self.api_key {
            call = call.header("x-api-key", key);
        }
        let response = open_stream(PROVIDER_NAME, call).await?;
        Ok(answer_stream(PROVIDER_NAME, response, Messages::default()))
    }
}

/// Anthropic's events: text from `content_block_delta`, usage from `message_start` and
/// `message_delta`, the end at `message_stop`, failures from `error`.
#[derive(Default)]
struct Messages {
    usage: TokenUsage,
}

impl Dialect for Messages {
    fn read(
        &mut self,
        event: &eventsource_stream::Event,
        out: &mut Vec<ProviderEvent>,
    ) -> Result<bool, ProviderError> {
        // Unknown or unparsable events (pings, new event types) are skipped, not fatal.
        let Ok(parsed) = serde_json::from_str::<StreamEvent>(&event.data) else {
            return Ok(false);
        };
        match parsed {
            StreamEvent::ContentBlockDelta {
                delta: Some(Delta { text: Some(text) }),
            } if !text.is_empty() => out.push(ProviderEvent::TextDelta(text)),
            StreamEvent::MessageStart { message } => {
                let usage = message.and_then(|m| m.usage).unwrap_or_default();
                self.usage.input_tokens = usage.input_tokens.unwrap_or_default();
                self.usage.output_tokens = usage.output_tokens.unwrap_or_default();
            }
            StreamEvent::MessageDelta { usage: Some(usage) } => {
                if let Some(input) = usage.input_tokens {
                    self.usage.input_tokens = input;
                }
                if let Some(output) = usage.output_tokens {
                    self.usage.output_tokens = output;
                }
            }
            StreamEvent::MessageStop => {
                out.push(ProviderEvent::Usage(self.usage));
                return Ok(true);
            }
            StreamEvent::Error { error } => return Err(stream_error(error)),
            _ => {}
        }
        Ok(false)
    }

    fn at_end(&self) -> Result<(), ProviderError> {
        Err(cut_short("Anthropic"))
    }
}

fn stream_error(error: Option<ErrorBody>) -> ProviderError {
    let error = error.unwrap_or(ErrorBody {
        kind: "api_error".into(),
        message: "unknown error".into(),
    });
    let kind = match error.kind.as_str() {
        "overloaded_error" => ProviderErrorKind::Unavailable,
        "rate_limit_error" => ProviderErrorKind::Throttled,
        "invalid_request_error" | "not_found_error" | "request_too_large" => {
            ProviderErrorKind::InvalidRequest
        }
        "authentication_error" | "permission_error" => ProviderErrorKind::AccessDenied,
        "timeout_error" => ProviderErrorKind::Timeout,
        _ => ProviderErrorKind::Upstream,
    };
    ProviderError::from_upstream(
        kind,
        PROVIDER_NAME,
        format!("{}: {}", error.kind, error.message),
    )
}
