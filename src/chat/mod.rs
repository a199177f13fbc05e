//! The chat service: everything between an authenticated request and the provider. It checks the
//! request against the bots and the caller's chats, stores the user's turn, starts the answer's
//! producer ([`turn`]) on the tracked task set and returns a [`TurnStream`] of events for the HTTP
//! edge to encode. Handlers call this, never a provider.

pub mod events;
mod turn;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::auth::UserId;
use crate::config::BotConfig;
use crate::domain::Role;
use crate::providers::{
    Admission, ModelMessage, ModelRequest, ProviderError, ProviderRegistry, Target,
};
use crate::store::{
    BegunTurn, ChatCursor, ChatRecord, ChatStore, MessageRecord, NewTurn, StoreError,
};
use events::StreamEvent;

/// What a user asks for.
#[derive(Debug, Clone)]
pub struct TurnRequest {
    pub bot_id: String,
    pub message: String,
    /// Continue this chat; `None` starts a new one.
    pub chat_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("unknown bot '{0}'")]
    BotNotFound(String),
    /// Also what another user's chat looks like: its existence is not revealed.
    #[error("chat not found")]
    ChatNotFound,
    #[error("this chat already has an answer in progress")]
    ChatBusy,
    #[error("message must not be empty")]
    EmptyMessage,
    #[error("message is longer than {max} characters")]
    MessageTooLong { max: usize },
    #[error("bot '{0}' has no provider available")]
    ProviderMissing(String),
    /// No target of the bot can take the request now (e.g. the local model's queue is full).
    #[error("{0}")]
    Refused(ProviderError),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Limits the service enforces on every turn.
#[derive(Debug, Clone, Copy)]
pub struct ChatLimits {
    pub max_message_chars: usize,
    pub stream_buffer_events: usize,
    pub timeouts: StreamTimeouts,
}

/// How long an answer may take, at each stage. Each one that passes cancels the provider request.
#[derive(Debug, Clone, Copy)]
pub struct StreamTimeouts {
    /// From calling a target to its first token (then the next target is tried).
    pub first_token: Duration,
    /// Between two tokens.
    pub idle: Duration,
    /// For the whole answer.
    pub total: Duration,
}

pub struct ChatService {
    store: Arc<dyn ChatStore>,
    providers: ProviderRegistry,
    bots: HashMap<String, BotConfig>,
    limits: ChatLimits,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Answers being generated, by chat id, each with the token that stops it when its chat is
    /// deleted.
    active: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

/// One page of a user's chats.
#[derive(Debug, Clone)]
pub struct ChatPage {
    pub chats: Vec<ChatRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<ChatCursor>,
}

impl ChatService {
    pub fn new(
        store: Arc<dyn ChatStore>,
        providers: ProviderRegistry,
        bots: &[BotConfig],
        limits: ChatLimits,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            providers,
            bots: bots.iter().map(|b| (b.id.clone(), b.clone())).collect(),
            limits,
            tasks,
            shutdown,
            active: Arc::default(),
        }
    }

    pub fn store(&self) -> &Arc<dyn ChatStore> {
        &self.store
    }

    /// Stores the user's message, starts the answer and returns its events. Every error here
    /// happens before anything is streamed.
    pub async fn start_turn(
        &self,
        user: &UserId,
        request: TurnRequest,
    ) -> Result<TurnStream, ChatError> {
        self.check_message(&request.message)?;
        let bot = self
            .bots
            .get(&request.bot_id)
            .ok_or_else(|| ChatError::BotNotFound(request.bot_id.clone()))?;
        let targets: Vec<Target> = bot
            .targets()
            .iter()
            .filter_map(|t| self.providers.resolve(t))
            .collect();
        if targets.is_empty() {
            return Err(ChatError::ProviderMissing(bot.id.clone()));
        }
        if self.shutdown.is_cancelled() {
            return Err(ChatError::ShuttingDown);
        }
        let messages = self.conversation(user, &request).await?;
        // Admission comes before anything is stored: a refused request leaves no trace.
        let (start, admission) = admit_first(&targets)?;
        let new_turn = NewTurn {
            new_chat: request.chat_id.is_none(),
            chat_id: request.chat_id.unwrap_or_else(|| new_id("chat")),
            user_id: user.as_str().to_owned(),
            bot_id: bot.id.clone(),
            user_message_id: new_id("msg"),
            assistant_message_id: new_id("msg"),
            message: request.message,
        };
        let (deleted, begun) = self.begin(&new_turn).await?;
        let (tx, rx) = mpsc::channel(self.limits.stream_buffer_events);
        let client_gone = CancellationToken::new();
        let producer = turn::Turn {
            chat_id: new_turn.chat_id,
            assistant_message_id: new_turn.assistant_message_id,
            last_event_id: begun.last_event_id,
            targets,
            start,
            admission,
            request: ModelRequest {
                model: String::new(),
                system_prompt: bot.system_prompt.clone(),
                messages,
                temperature: bot.temperature,
                top_p: bot.top_p,
                max_tokens: bot.max_tokens,
            },
            timeouts: self.limits.timeouts,
            store: self.store.clone(),
            events: tx,
            client_gone: client_gone.clone(),
            deleted,
            shutdown: self.shutdown.clone(),
            deadline: tokio::time::Instant::now(),
        };
        self.spawn_producer(producer);
        Ok(TurnStream {
            events: rx,
            _cancel_on_drop: client_gone.drop_guard(),
        })
    }

    /// What the model sees: the chat's earlier turns (after checking the caller owns it), then
    /// the new message.
    async fn conversation(
        &self,
        user: &UserId,
        request: &TurnRequest,
    ) -> Result<Vec<ModelMessage>, ChatError> {
        let mut messages = match &request.chat_id {
            Some(chat_id) => {
                self.owned_chat(user, chat_id).await?;
                model_history(&self.store.list_messages(chat_id).await?)
            }
            None => Vec::new(),
        };
        messages.push(ModelMessage {
            role: Role::User,
            content: request.message.clone(),
        });
        Ok(messages)
    }

    /// Claims the chat for this answer and stores the turn's first half. Returns the token that
    /// stops the answer if the chat is deleted.
    async fn begin(&self, turn: &NewTurn) -> Result<(CancellationToken, BegunTurn), ChatError> {
        let deleted = self.claim_chat(&turn.chat_id)?;
        match self.store.begin_turn(turn).await {
            Ok(begun) => Ok((deleted, begun)),
            Err(e) => {
                self.release_chat(&turn.chat_id);
                Err(match e {
                    StoreError::ChatNotFound => ChatError::ChatNotFound,
                    StoreError::ChatBusy => ChatError::ChatBusy,
                    other => ChatError::Store(other),
                })
            }
        }
    }

    /// Runs the producer on the tracked task set, so shutdown waits for it to store its answer.
    fn spawn_producer(&self, producer: turn::Turn) {
        let active = self.active.clone();
        let chat_id = producer.chat_id.clone();
        self.tasks.spawn(async move {
            producer.run().await;
            active.lock().expect("active-turns lock").remove(&chat_id);
        });
    }

    pub async fn list_chats(
        &self,
        user: &UserId,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<ChatPage, ChatError> {
        // One extra row tells whether another page exists without a count query.
        let mut chats = self
            .store
            .list_chats(user.as_str(), limit + 1, cursor)
            .await?;
        let next = if chats.len() > limit as usize {
            chats.truncate(limit as usize);
            chats.last().map(|c| ChatCursor {
                updated_at_ms: c.updated_at_ms,
                id: c.id.clone(),
            })
        } else {
            None
        };
        Ok(ChatPage { chats, next })
    }

    pub async fn messages(
        &self,
        user: &UserId,
        chat_id: &str,
    ) -> Result<(ChatRecord, Vec<MessageRecord>), ChatError> {
        let chat = self.owned_chat(user, chat_id).await?;
        let messages = self.store.list_messages(chat_id).await?;
        Ok((chat, messages))
    }

    /// Deletes a chat of the caller, stopping its answer first if one is being generated.
    pub async fn delete_chat(&self, user: &UserId, chat_id: &str) -> Result<(), ChatError> {
        self.owned_chat(user, chat_id).await?;
        if let Some(token) = self.active.lock().expect("active-turns lock").get(chat_id) {
            token.cancel();
        }
        if self.store.delete_chat(chat_id, user.as_str()).await? {
            Ok(())
        } else {
            Err(ChatError::ChatNotFound)
        }
    }

    async fn owned_chat(&self, user: &UserId, chat_id: &str) -> Result<ChatRecord, ChatError> {
        match self.store.get_chat(chat_id).await? {
            Some(chat) if chat.user_id == user.as_str() => Ok(chat),
            _ => Err(ChatError::ChatNotFound),
        }
    }

    fn check_message(&self, message: &str) -> Result<(), ChatError> {
        if message.trim().is_empty() {
            return Err(ChatError::EmptyMessage);
        }
        let max = self.limits.max_message_chars;
        if message.len() > max && message.chars().count() > max {
            return Err(ChatError::MessageTooLong { max });
        }
        Ok(())
    }

    /// One answer at a time per chat in this process; the store enforces it across processes.
    fn claim_chat(&self, chat_id: &str) -> Result<CancellationToken, ChatError> {
        let mut active = self.active.lock().expect("active-turns lock");
        if active.contains_key(chat_id) {
            return Err(ChatError::ChatBusy);
        }
        let token = CancellationToken::new();
        active.insert(chat_id.to_owned(), token.clone());
        Ok(token)
    }

    fn release_chat(&self, chat_id: &str) {
        self.active
            .lock()
            .expect("active-turns lock")
            .remove(chat_id);
    }
}

/// The first target that can take the request, with the place it granted.
fn admit_first(targets: &[Target]) -> Result<(usize, Admission), ChatError> {
    let mut refusal = None;
    for (index, target) in targets.iter().enumerate() {
        match target.provider.admit() {
            Ok(admission) => return Ok((index, admission)),
            Err(e) => refusal = Some(e),
        }
    }
    Err(ChatError::Refused(refusal.expect("targets is not empty")))
}

/// The earlier turns a model sees: each user message with its answer. A question whose answer
/// failed empty is left out, because providers require user and assistant to alternate.
fn model_history(messages: &[MessageRecord]) -> Vec<ModelMessage> {
    let mut history = Vec::new();
    let mut question: Option<&str> = None;
    for message in messages {
        match message.role {
            Role::User => question = Some(&message.content),
            Role::Assistant => {
                if let Some(q) = question.take()
                    && !message.content.trim().is_empty()
                {
                    history.push(ModelMessage {
                        role: Role::User,
                        content: q.to_owned(),
                    });
                    history.push(ModelMessage {
                        role: Role::Assistant,
                        content: message.content.clone(),
                    });
                }
            }
        }
    }
    history
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The events of one answer. Dropping it (the client went away) cancels the answer.
pub struct TurnStream {
    events: mpsc::Receiver<StreamEvent>,
    _cancel_on_drop: DropGuard,
}

impl Stream for TurnStream {
    type Item = StreamEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<StreamEvent>> {
        self.events.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MessageStatus;

    fn message(role: Role, content: &str) -> MessageRecord {
        MessageRecord {
            id: new_id("msg"),
            chat_id: "chat-1".into(),
            role,
            content: content.into(),
            status: MessageStatus::Complete,
            error_code: None,
            usage: None,
            created_at_ms: 0,
        }
    }

    #[test]
    fn history_keeps_answered_turns_and_drops_failed_ones() {
        let history = model_history(&[
            message(Role::User, "one"),
            message(Role::Assistant, "1"),
            message(Role::User, "two"),
            message(Role::Assistant, ""),
            message(Role::User, "three"),
            message(Role::Assistant, "3"),
        ]);
        let texts: Vec<_> = history.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["one", "1", "three", "3"]);
        assert_eq!(history[0].role, Role::User);
        assert_eq!(history[1].role, Role::Assistant);
    }
}
