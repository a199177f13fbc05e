//! OpenAI-compatible `/v1/chat/completions` with `stream: true` and
//! `stream_options.include_usage`: OpenAI, Ollama, vLLM, llama.cpp server, LM Studio.
//!
//! Lenient with what such servers really send: an empty `finish_reason`, `usage: {}` or null,
//! chunks with no choices, errors as `event: error` or as `{"error": ...}` data, and a stream
//! that ends after a `finish_reason` without `data: [DONE]`.

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::http_sse::{api_key, client, events, open_stream};
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
        Ok(translate(open_stream(PROVIDER_NAME, call).await?))
    }
}

/// What one parsed upstream event means for the stream.
enum Step {
    Emit(ProviderEvent),
    Skip,
    /// `[DONE]`: the answer is complete.
    End,
    Fail(ProviderError),
}

fn translate(response: reqwest::Response) -> ProviderStream {
    struct State<S> {
        events: S,
        /// Deltas already split from one chunk, waiting to go out.
        pending: std::collections::VecDeque<ProviderEvent>,
        finish_seen: bool,
        finished: bool,
    }
    let state = State {
        events: Box::pin(events(PROVIDER_NAME, response)),
        pending: Default::default(),
        finish_seen: false,
        finished: false,
    };
    Box::pin(futures_util::stream::unfold(
        state,
        |mut state| async move {
            loop {
                if let Some(event) = state.pending.pop_front() {
                    return Some((Ok(event), state));
                }
                if state.finished {
                    return None;
                }
                let step = match state.events.next().await {
                    // Some servers close after the finish_reason without sending [DONE].
                    None if state.finish_seen => Step::End,
                    None => Step::Fail(ProviderError::new(
                        ProviderErrorKind::Connection,
                        "the server closed the stream before the answer was finished",
                    )),
                    Some(Err(e)) => Step::Fail(e),
                    Some(Ok(event)) => {
                        interpret(&event, &mut state.pending, &mut state.finish_seen)
                    }
                };
                match step {
                    Step::Emit(event) => return Some((Ok(event), state)),
                    Step::Skip => {}
                    Step::End => state.finished = true,
                    Step::Fail(e) => {
                        state.finished = true;
                        return Some((Err(e), state));
                    }
                }
            }
        },
    ))
}

fn interpret(
    event: &eventsource_stream::Event,
    pending: &mut std::collections::VecDeque<ProviderEvent>,
    finish_seen: &mut bool,
) -> Step {
    let data = event.data.trim();
    if data == "[DONE]" {
        return Step::End;
    }
    if event.event == "error" {
        let value = serde_json::from_str(data).unwrap_or(serde_json::Value::Null);
        return Step::Fail(stream_error(&value));
    }
    // Straight into our lenient struct: this runs for every token. Keep-alive comments and
    // unparsable lines are not worth failing an answer for.
    let Ok(chunk) = serde_json::from_str::<Chunk>(data) else {
        return Step::Skip;
    };
    if let Some(error) = &chunk.error {
        return Step::Fail(stream_error(&serde_json::json!({ "error": error })));
    }
    for choice in chunk.choices.unwrap_or_default() {
        if let Some(text) = choice
            .delta
            .and_then(|d| d.content)
            .filter(|t| !t.is_empty())
        {
            pending.push_back(ProviderEvent::TextDelta(text));
        }
        if choice.finish_reason.is_some_and(|r| !r.is_empty()) {
            *finish_seen = true;
        }
    }
    if let Some(usage) = chunk.usage
        && (usage.prompt_tokens.is_some() || usage.completion_tokens.is_some())
    {
        pending.push_back(ProviderEvent::Usage(TokenUsage {
            input_tokens: usage.prompt_tokens.unwrap_or_default(),
            output_tokens: usage.completion_tokens.unwrap_or_default(),
        }));
    }
    match pending.pop_front() {
        Some(event) => Step::Emit(event),
        None => Step::Skip,
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
