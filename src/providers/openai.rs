//! OpenAI-compatible `/v1/chat/completions` with `stream: true` and
//! `stream_options.include_usage`: OpenAI, Ollama, vLLM, llama.cpp server, LM Studio.
//!
//! Lenient with what such servers really send: an empty `finish_reason`, `usage: {}` or null,
//! chunks with no choices, errors as `event: error` or as `{"error": ...}` data, and a stream
//! that ends after a `finish_reason` without `data: [DONE]`.

use serde::{Deserialize, Serialize};

use super::http_sse::{Dialect, answer_stream, api_key, client, cut_short, open_stream};
use super::{
    Admission, ChatProvider, ModelRequest, ProviderError, ProviderErrorKind, ProviderEvent,
    ProviderStream,
};
use crate::config::OpenAiConfig;
use crate::domain::TokenUsage;

pub const PROVIDER_NAME: &str = "openai";

pub struct OpenAiProvider {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
}

impl OpenAiProvider {
    pub fn new(settings: &OpenAiConfig) -> Self {
        let api_key = api_key(settings.api_key.as_ref(), "OPENAI_API_KEY");
        Self {
            http: client(settings.connect_timeout_secs),
            url: format!(
                "{}/chat/completions",
                settings.base_url.trim_end_matches('/')
            ),
            api_key,
        }
    }
}

#[derive(Serialize)]
struct CompletionRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    stream: bool,
    stream_options: StreamOptions,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Deserialize, Default)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

#[async_trait::async_trait]
impl ChatProvider for OpenAiProvider {
    async fn stream(
        &self,
        request: ModelRequest,
        _admission: Admission,
    ) -> Result<ProviderStream, ProviderError> {
        let system = request.system_prompt.as_deref().map(|content| WireMessage {
            role: "system",
            content,
        });
        let messages = system
            .into_iter()
            .chain(request.messages.iter().map(|m| WireMessage {
                role: m.role.as_str(),
                content: &m.content,
            }))
            .collect();
        let body = CompletionRequest {
            model: &request.model,
            messages,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            top_p: request.top_p,
        };
        let mut call = self.http.post(&self.url).json(&body);
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key);
        }
        let response = open_stream(PROVIDER_NAME, call).await?;
        Ok(answer_stream(
            PROVIDER_NAME,
            response,
            Completions::default(),
        ))
    }
}

/// Chat-completion chunks as compatible servers really send them: text and usage may share a
/// chunk, `[DONE]` ends the answer, and some servers close after the `finish_reason` without it.
#[derive(Default)]
struct Completions {
    finish_seen: bool,
}

impl Dialect for Completions {
    fn read(
        &mut self,
        event: &eventsource_stream::Event,
        out: &mut Vec<ProviderEvent>,
    ) -> Result<bool, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(true);
        }
        if event.event == "error" {
            let value = serde_json::from_str(data).unwrap_or(serde_json::Value::Null);
            return Err(stream_error(&value));
        }
        // Straight into our lenient struct: this runs for every token. Keep-alive comments and
        // unparsable lines are not worth failing an answer for.
        let Ok(chunk) = serde_json::from_str::<Chunk>(data) else {
            return Ok(false);
        };
        if let Some(error) = &chunk.error {
            return Err(stream_error(&serde_json::json!({ "error": error })));
        }
        for choice in chunk.choices.unwrap_or_default() {
            if let Some(text) = choice
                .delta
                .and_then(|d| d.content)
                .filter(|t| !t.is_empty())
            {
                out.push(ProviderEvent::TextDelta(text));
            }
            if choice.finish_reason.is_some_and(|r| !r.is_empty()) {
                self.finish_seen = true;
            }
        }
        if let Some(usage) = chunk.usage
            && (usage.prompt_tokens.is_some() || usage.completion_tokens.is_some())
        {
            out.push(ProviderEvent::Usage(TokenUsage {
                input_tokens: usage.prompt_tokens.unwrap_or_default(),
                output_tokens: usage.completion_tokens.unwrap_or_default(),
            }));
        }
        Ok(false)
    }

    fn at_end(&self) -> Result<(), ProviderError> {
        match self.finish_seen {
            true => Ok(()),
            false => Err(cut_short("the server")),
        }
    }
}

/// `{"error": {"message", "type", "code"}}` (OpenAI), `{"error": "text"}` or `{"message": ...}`
/// (others).
fn stream_error(value: &serde_json::Value) -> ProviderError {
    let error = value.get("error").unwrap_or(value);
    let message = error
        .get("message")
        .and_then(|m| m.as_str())
        .or_else(|| error.as_str())
        .unwrap_or("unknown error");
    let label = [error.get("type"), error.get("code")]
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let kind = if label.contains("rate_limit") {
        ProviderErrorKind::Throttled
    } else if label.contains("overloaded") || label.contains("unavailable") {
        ProviderErrorKind::Unavailable
    } else if label.contains("invalid_request") || label.contains("context_length") {
        ProviderErrorKind::InvalidRequest
    } else {
        ProviderErrorKind::Upstream
    };
    let label = if label.is_empty() { "error" } else { &label };
    ProviderError::from_upstream(kind, PROVIDER_NAME, format!("{label}: {message}"))
}
