//! The OpenAI Chat Completions wire format: the request as the official SDKs send it, turned
//! into a turn of a chat, and the answer's events as OpenAI's chunks (`chat.completion.chunk`,
//! `data: [DONE]`) or, unstreamed, one `chat.completion` object.

use serde::{Deserialize, Serialize};

use crate::chat::{TurnOptions, TurnRequest, split_conversation};
use crate::domain::{Role, TokenUsage};
use crate::events::{DoneEvent, EventKind, StreamEvent};
use crate::http::error::ApiError;
use crate::http::sse::{DATA_DONE, Framing, write_data};

/// `POST /v1/chat/completions`. Fields the API has and Mangoo does not use (`user`, `seed`,
/// `presence_penalty`, …) are accepted and ignored, as OpenAI-compatible servers do; the ones
/// that would change what the client gets back and Mangoo cannot do (`n` > 1, `tools`) are
/// refused.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CompletionRequest {
    /// A bot id (`GET /v1/models`).
    model: String,
    messages: Vec<RequestMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// Up to 4 sequences; the answer ends before the first of them.
    #[serde(default)]
    stop: Option<StopSequences>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    tools: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RequestMessage {
    /// `system`, `developer`, `user` or `assistant`.
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A part of a message's content; only `text` parts are understood.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

const MAX_STOP_SEQUENCES: usize = 4;

/// What the handler needs besides the turn itself.
pub struct Requested {
    pub turn: TurnRequest,
    pub stream: bool,
    pub include_usage: bool,
}

impl CompletionRequest {
    /// The turn it asks for: a new chat holding the conversation it brings, or, with `chat_id`,
    /// the next turn of that stored chat (whose history is what the model sees; the request's
    /// earlier messages are then the client's copy of it).
    pub fn into_turn(self, chat_id: Option<String>) -> Result<Requested, ApiError> {
        self.check_supported()?;
        let mut instructions = Vec::new();
        let mut conversation = Vec::new();
        for message in self.messages {
            let text = message.text()?;
            match message.role.as_str() {
                "system" | "developer" => instructions.push(text),
                "user" => conversation.push((Role::User, text)),
                "assistant" => conversation.push((Role::Assistant, text)),
                other => {
                    return Err(invalid(format!(
                        "messages: role '{other}' is not supported (system, developer, user, \
                         assistant)"
                    )));
                }
            }
        }
        let (earlier, question) = split_conversation(conversation)
            .ok_or_else(|| invalid("messages must end with a user message that has text"))?;
        let options = TurnOptions {
            instructions: Some(instructions.join("\n\n")).filter(|i| !i.trim().is_empty()),
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            stop: match self.stop {
                None => Vec::new(),
                Some(StopSequences::One(stop)) => vec![stop],
                Some(StopSequences::Many(stops)) => stops,
            },
        };
        check_options(&options)?;
        let mut turn = TurnRequest::new(self.model, question, chat_id);
        if turn.chat_id.is_none() {
            turn.earlier = earlier;
        }
        turn.options = options;
        Ok(Requested {
            turn,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }

    fn check_supported(&self) -> Result<(), ApiError> {
        if self.model.trim().is_empty() {
            return Err(invalid("model must name a bot (GET /v1/models)"));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(invalid("n: only one choice per request is supported"));
        }
        if self.tools.as_ref().is_some_and(|tools| !tools.is_empty()) {
            return Err(invalid("tools are not supported"));
        }
        Ok(())
    }
}

impl RequestMessage {
    fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(MessageContent::Text(text)) => Ok(text.clone()),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(piece)) => text.push_str(piece),
                        (kind, _) => {
                            return Err(invalid(format!(
                                "messages: content parts of type '{kind}' are not supported \
                                 (text only)"
                            )));
                        }
                    }
                }
                Ok(text)
            }
        }
    }
}

fn check_options(options: &TurnOptions) -> Result<(), ApiError> {
    if options.max_tokens == Some(0) {
        return Err(invalid("max_tokens must be at least 1"));
    }
    if options
        .temperature
        .is_some_and(|t| !(0.0..=2.0).contains(&t))
    {
        return Err(invalid("temperature must be between 0 and 2"));
    }
    if options.top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return Err(invalid("top_p must be between 0 and 1"));
    }
    if options.stop.len() > MAX_STOP_SEQUENCES {
        return Err(invalid("stop: at most 4 sequences"));
    }
    Ok(())
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message)
}

/// Who a completion is: the same id, time and model in every chunk, and in a resumed stream.
#[derive(Debug, Clone)]
pub struct Completion {
    /// `chatcmpl-` and the answer's message id.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The bot, as the request named it.
    pub model: String,
    /// An answer that used them all ended for `length`.
    pub max_tokens: u32,
}

impl Completion {
    pub fn new(message_id: &str, created_ms: i64, model: String, max_tokens: u32) -> Self {
        Self {
            id: format!("chatcmpl-{message_id}"),
            created: (created_ms.max(0) / 1000) as u64,
            model,
            max_tokens,
        }
    }

    /// OpenAI's reasons: `length` when the answer used every token it was allowed.
    fn finish_reason(&self, done: &DoneEvent) -> &'static str {
        match done.ran_out_of_tokens(self.max_tokens) {
            true => "length",
            false => "stop",
        }
    }
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    /// With `include_usage`: `null` on every chunk but the last, which has no choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl From<TokenUsage> for Usage {
    fn from(usage: TokenUsage) -> Self {
        Self {
            prompt_tokens: usage.input_tokens,
            completion_tokens: usage.output_tokens,
            total_tokens: usage.input_tokens + usage.output_tokens,
        }
    }
}

/// The stream's frames: each chunk an SSE event whose `id:` is the Mangoo event it carries, so
/// a client resuming with `Last-Event-ID` gets the rest and nothing twice. The role chunk is the
/// answer's `start`, a content chunk each `message`, the finish chunk its `done`; the usage chunk
/// and `[DONE]` follow the finish chunk without ids of their own.
pub struct CompletionFraming {
    pub completion: Completion,
    pub include_usage: bool,
}

impl CompletionFraming {
    fn chunk(&self, out: &mut Vec<u8>, id: Option<i64>, choice: Option<ChunkChoice<'_>>) {
        let choices: Vec<ChunkChoice<'_>> = choice.into_iter().collect();
        let chunk = Chunk {
            id: &self.completion.id,
            object: "chat.completion.chunk",
            created: self.completion.created,
            model: &self.completion.model,
            choices: &choices,
            usage: self.include_usage.then_some(None),
        };
        write_data(out, id, &chunk);
    }

    fn usage_chunk(&self, out: &mut Vec<u8>, usage: TokenUsage) {
        let chunk = Chunk {
            id: &self.completion.id,
            object: "chat.completion.chunk",
            created: self.completion.created,
            model: &self.completion.model,
            choices: &[],
            usage: Some(Some(usage.into())),
        };
        write_data(out, None, &chunk);
    }
}

fn choice<'a>(delta: Delta<'a>, finish_reason: Option<&'static str>) -> Option<ChunkChoice<'a>> {
    Some(ChunkChoice {
        index: 0,
        delta,
        logprobs: None,
        finish_reason,
    })
}

impl Framing for CompletionFraming {
    fn encode(&mut self, out: &mut Vec<u8>, event: &StreamEvent, retry_ms: Option<u64>) {
        if let Some(ms) = retry_ms {
            out.extend_from_slice(format!("retry: {ms}\n").as_bytes());
        }
        let id = Some(event.id);
        match &event.kind {
            EventKind::Start { .. } => {
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(""),
                };
                self.chunk(out, id, choice(delta, None));
            }
            EventKind::Content(text) => {
                let delta = Delta {
                    role: None,
                    content: Some(text),
                };
                self.chunk(out, id, choice(delta, None));
            }
            EventKind::Done(done) => {
                let delta = Delta {
                    role: None,
                    content: None,
                };
                let reason = self.completion.finish_reason(done);
                self.chunk(out, id, choice(delta, Some(reason)));
                if self.include_usage {
                    self.usage_chunk(out, done.usage);
                }
                out.extend_from_slice(DATA_DONE);
            }
            EventKind::Error(failure) => {
                let (_, body) = super::errors::failure_body(failure);
                write_data(out, id, &body);
                out.extend_from_slice(DATA_DONE);
            }
        }
    }
}

/// `stream: false`: the whole answer in one object.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CompletionBody {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<CompletionChoice>,
    usage: Usage,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CompletionChoice {
    index: u32,
    message: AnswerMessage,
    #[schema(value_type = Option<Object>)]
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AnswerMessage {
    role: &'static str,
    content: String,
    #[schema(value_type = Option<String>)]
    refusal: Option<()>,
}

impl Completion {
    pub fn body(self, text: String, done: &DoneEvent) -> CompletionBody {
        let finish_reason = self.finish_reason(done);
        CompletionBody {
            id: self.id,
            object: "chat.completion",
            created: self.created,
            model: self.model,
            choices: vec![CompletionChoice {
                index: 0,
                message: AnswerMessage {
                    role: "assistant",
                    content: text,
                    refusal: None,
                },
                logprobs: None,
                finish_reason,
            }],
            usage: done.usage.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> Result<Requested, ApiError> {
        serde_json::from_value::<CompletionRequest>(json)
            .expect("parses")
            .into_turn(None)
    }

    #[test]
    fn a_conversation_becomes_a_new_chat_with_its_history_and_instructions() {
        let requested = request(serde_json::json!({
            "model": "bot", "stream": true, "stream_options": {"include_usage": true},
            "max_completion_tokens": 7, "stop": "END",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "1"},
                {"role": "user", "content": [{"type": "text", "text": "tw"}, {"type": "text", "text": "o"}]}
            ]
        }))
        .expect("valid");
        assert!(requested.stream && requested.include_usage);
        let turn = requested.turn;
        assert_eq!(turn.message, "two");
        assert_eq!(turn.earlier.len(), 2);
        assert_eq!(turn.options.instructions.as_deref(), Some("Be brief."));
        assert_eq!(turn.options.max_tokens, Some(7));
        assert_eq!(turn.options.stop, ["END"]);
    }

    #[test]
    fn what_cannot_be_answered_is_refused() {
        for bad in [
            serde_json::json!({"model": "bot", "messages": []}),
            serde_json::json!({"model": "bot", "messages": [{"role": "assistant", "content": "hi"}]}),
            serde_json::json!({"model": "bot", "messages": [{"role": "tool", "content": "x"}]}),
            serde_json::json!({"model": "bot", "n": 2, "messages": [{"role": "user", "content": "x"}]}),
            serde_json::json!({"model": "bot", "temperature": 3, "messages": [{"role": "user", "content": "x"}]}),
            serde_json::json!({"model": "bot", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ] {
            assert!(request(bad.clone()).is_err(), "{bad}");
        }
    }
}
