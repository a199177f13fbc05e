//! The chat service: everything between an authenticated request and the provider. It checks the
//! request against the bots and the caller's chats, stores the user's turn, starts the answer's
//! producer ([`turn`]) on the tracked task set and hands the HTTP edge a stream of events to
//! encode — for a new answer, or for one a client reconnects to ([`ChatService::resume`]).
//! Handlers call this, never a provider.

mod checkpoint;
mod control;
mod history;
mod manage;
mod recovery;
mod replay;
mod stops;
mod turn;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, BoxStream};
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::UserId;
use crate::config::BotConfig;
use crate::domain::Role;
use crate::events::{StreamEvent, StreamFailure};
use crate::metrics::Metrics;
use crate::providers::{
    Admission, ModelMessage, ModelRequest, ProviderError, ProviderRegistry, Target,
};
use crate::rate_limit::StreamPlace;
use crate::store::{
    BegunTurn, ChatCursor, ChatRecord, ChatStore, EarlierMessage, FinishedTurn, NewTurn, QuotaKind,
    StorageQuota, StoreError,
};
use crate::stream_log::{
    AnswerSignals, Audience, Claim, ClaimError, EventLog, LogError, StopOutcome,
};
pub use control::StopCause;
use control::{ActiveAnswer, ActiveAnswers};
pub use history::split_conversation;
pub use manage::{MAX_SEARCH_CHARS, MAX_TITLE_CHARS, MessagePage, PagePosition, SearchPage};

/// The events a client receives: a new answer, or the rest of one it reconnects to.
pub type EventStream = BoxStream<'static, StreamEvent>;

/// What a user asks for.
#[derive(Debug, Clone)]
pub struct TurnRequest {
    pub bot_id: String,
    pub message: String,
    /// Continue this chat; `None` starts a new one.
    pub chat_id: Option<String>,
    /// Start a new chat (under `chat_id` when given: an id its client chose, as the AI SDK's
    /// `useChat` does) instead of continuing one.
    pub create_chat: bool,
    /// A new chat's history, brought by the client (question and answer pairs, in order): stored
    /// before `message` and sent to the model with it. Ignored when `chat_id` continues a chat.
    pub earlier: Vec<EarlierMessage>,
    pub options: TurnOptions,
}

impl TurnRequest {
    /// A message for a bot, in a new chat or the next turn of `chat_id`, with the bot's settings.
    pub fn new(bot_id: String, message: String, chat_id: Option<String>) -> Self {
        Self {
            bot_id,
            message,
            create_chat: chat_id.is_none(),
            chat_id,
            earlier: Vec::new(),
            options: TurnOptions::default(),
        }
    }
}

/// What a request may change of its bot's settings for one answer (the OpenAI API's parameters).
/// The bot's values are the defaults and `max_tokens` its ceiling.
#[derive(Debug, Clone, Default)]
pub struct TurnOptions {
    /// The request's own instructions, sent after the bot's system prompt (not stored).
    pub instructions: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// The answer ends before the first of these (see [`stops`]).
    pub stop: Vec<String>,
}

/// A new answer: the chat and message it is stored as, and its events.
pub struct StartedTurn {
    pub chat_id: String,
    pub message_id: String,
    /// The most tokens the answer may have (the request's or the bot's).
    pub max_tokens: u32,
    pub events: EventStream,
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
    #[error("message not found")]
    MessageNotFound,
    #[error("a title must have 1 to {max} characters")]
    InvalidTitle { max: usize },
    #[error("{0}")]
    InvalidSearch(String),
    #[error("message must not be empty")]
    EmptyMessage,
    #[error("message is longer than {max} characters")]
    MessageTooLong { max: usize },
    #[error("bot '{0}' has no provider available")]
    ProviderMissing(String),
    #[error("{}", quota_message(*.0))]
    QuotaExceeded(QuotaKind),
    /// No target of the bot can take the request now (e.g. the local model's queue is full).
    #[error("{0}")]
    Refused(ProviderError),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("only an operator (a token with the configured admin role) may see every user's usage")]
    NotOperator,
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Limits and policies the service applies to every turn.
#[derive(Debug, Clone, Copy)]
pub struct ChatLimits {
    pub max_message_chars: usize,
    pub timeouts: StreamTimeouts,
    /// How long an answer nobody listens to goes on before it is cancelled; `None`: to the end
    /// (the "continue" disconnect policy).
    pub unheard_grace: Option<Duration>,
    pub quota: StorageQuota,
    /// Characters of earlier turns sent to a provider with a new message; older turns beyond
    /// it are left out (they stay stored).
    pub max_history_chars: usize,
    /// Save a streaming answer's text this often (see [`checkpoint`]); `None` where the stream
    /// log outlives the process (Redis).
    pub checkpoint_every: Option<Duration>,
}

/// How long a readiness check waits for each dependency.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// The most earlier messages read for a turn's history, however short they are.
const HISTORY_MESSAGES: u32 = 200;

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

/// What users see of a bot.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct BotInfo {
    pub id: String,
    /// The first target's provider and model.
    pub provider: String,
    pub model: String,
}

pub struct ChatService {
    bot_order: Vec<BotInfo>,
    store: Arc<dyn ChatStore>,
    log: Arc<dyn EventLog>,
    providers: ProviderRegistry,
    bots: HashMap<String, BotConfig>,
    limits: ChatLimits,
    tasks: TaskTracker,
    /// Cancelled when the server starts draining: new answers are refused.
    draining: CancellationToken,
    active: ActiveAnswers,
    metrics: Arc<Metrics>,
    recovery: recovery::Recovery,
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
        log: Arc<dyn EventLog>,
        providers: ProviderRegistry,
        bots: &[BotConfig],
        limits: ChatLimits,
        tasks: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Self {
        let bot_order = bots
            .iter()
            .map(|b| {
                let first = b.targets().into_iter().next();
                BotInfo {
                    id: b.id.clone(),
                    provider: first
                        .as_ref()
                        .map(|t| t.provider.clone())
                        .unwrap_or_default(),
                    model: first.map(|t| t.model).unwrap_or_default(),
                }
            })
            .collect();
        let recovery = recovery::Recovery {
            store: store.clone(),
            log: log.clone(),
        };
        Self {
            bot_order,
            recovery,
            store,
            log,
            providers,
            bots: bots.iter().map(|b| (b.id.clone(), b.clone())).collect(),
            limits,
            tasks,
            draining: CancellationToken::new(),
            active: ActiveAnswers::default(),
            metrics,
        }
    }

    pub fn bots(&self) -> Vec<BotInfo> {
        self.bot_order.clone()
    }

    pub fn limits(&self) -> &ChatLimits {
        &self.limits
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Graceful shutdown: refuses new answers at once, lets running ones go on for up to
    /// `window`, then ends the rest (each gets a retryable `server_shutting_down`) and waits
    /// until every answer is stored.
    pub async fn drain(&self, window: Duration) {
        self.draining.cancel();
        self.tasks.close();
        if tokio::time::timeout(window, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::info!("drain window over: ending the answers still running");
            self.active.stop_all(StopCause::Shutdown);
            self.tasks.wait().await;
        }
    }

    pub fn store(&self) -> &Arc<dyn ChatStore> {
        &self.store
    }

    /// The dependencies that do not answer right now, by name (`database`, `redis`); each
    /// failure's cause is logged.
    pub async fn unreachable_dependencies(&self) -> Vec<&'static str> {
        let database = answers_in_time(self.store.ping());
        let log = answers_in_time(self.log.ping());
        let (database, log) = tokio::join!(database, log);
        let mut unreachable = Vec::new();
        if let Err(e) = database {
            tracing::warn!("readiness: the database does not answer: {e}");
            unreachable.push("database");
        }
        if let Err(e) = log {
            tracing::warn!("readiness: redis does not answer: {e}");
            unreachable.push("redis");
        }
        unreachable
    }

    /// Stores the user's message, starts the answer and returns its events. Every error here
    /// happens before anything is streamed.
    /// `slot` is the user's place among their concurrent streams; the producer holds it until
    /// the answer is generated, whoever still listens.
    pub async fn start_turn(
        &self,
        user: &UserId,
        request: TurnRequest,
        slot: StreamPlace,
    ) -> Result<StartedTurn, ChatError> {
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
        if self.is_draining() {
            return Err(ChatError::ShuttingDown);
        }
        let messages = self.conversation(user, &request).await?;
        // Admission comes before anything is stored: a refused request leaves no trace.
        let (start, admission) = admit_first(&targets, user.as_str())?;
        let options = request.options;
        let new_turn = NewTurn {
            new_chat: request.create_chat,
            chat_id: request.chat_id.unwrap_or_else(|| new_id("chat")),
            user_id: user.as_str().to_owned(),
            bot_id: bot.id.clone(),
            user_message_id: new_id("msg"),
            assistant_message_id: new_id("msg"),
            message: request.message,
            earlier: request.earlier,
            quota: self.limits.quota,
        };
        let claim = self.claim(&new_turn.chat_id).await?;
        let (answer, begun) = match self.begin(&new_turn, claim).await {
            Ok(begun) => begun,
            Err(e) => {
                self.log.release(&new_turn.chat_id, claim).await;
                return Err(e);
            }
        };
        let opened = self
            .open_log(&new_turn, claim, begun.last_event_id, &answer.audience)
            .await;
        let (signals, events) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                self.abandon(&new_turn, begun.last_event_id).await;
                self.log.release(&new_turn.chat_id, claim).await;
                return Err(ChatError::Log(e));
            }
        };
        // Shared: if this producer is taken over (its lease lapsed), its listeners here follow
        // the answer on to the conclusion in the shared log.
        let events = match self.log.is_shared() {
            true => {
                self.recovery
                    .clone()
                    .watch(new_turn.chat_id.clone(), begun.last_event_id, events)
            }
            false => events,
        };
        let listener = answer.audience.listen(events);
        let started = StartedTurn {
            chat_id: new_turn.chat_id.clone(),
            message_id: new_turn.assistant_message_id.clone(),
            max_tokens: options
                .max_tokens
                .map_or(bot.max_tokens, |m| m.min(bot.max_tokens)),
            events: Box::pin(listener),
        };
        let progress = turn::Progress::new(begun.last_event_id);
        let aftermath = turn::Aftermath {
            chat_id: new_turn.chat_id.clone(),
            assistant_message_id: new_turn.assistant_message_id.clone(),
            store: self.store.clone(),
            log: self.log.clone(),
            progress: progress.clone(),
            metrics: self.metrics.clone(),
        };
        let producer = turn::Turn {
            chat_id: new_turn.chat_id,
            user_id: new_turn.user_id,
            bot_id: new_turn.bot_id,
            assistant_message_id: new_turn.assistant_message_id,
            last_event_id: begun.last_event_id,
            targets,
            start,
            admission,
            request: ModelRequest {
                model: String::new(),
                system_prompt: system_prompt(bot.system_prompt.as_deref(), options.instructions),
                messages,
                temperature: options.temperature.or(bot.temperature),
                top_p: options.top_p.or(bot.top_p),
                max_tokens: started.max_tokens,
            },
            stops: options.stop,
            timeouts: self.limits.timeouts,
            store: self.store.clone(),
            log: self.log.clone(),
            control: answer.control,
            signals,
            audience: answer.audience,
            deadline: tokio::time::Instant::now(),
            metrics: self.metrics.clone(),
            progress,
            draining: self.draining.clone(),
            _slot: slot,
        };
        self.spawn_producer(producer, aftermath);
        Ok(started)
    }

    /// What the model sees: the chat's earlier turns (after checking the caller owns it), then
    /// the new message.
    async fn conversation(
        &self,
        user: &UserId,
        request: &TurnRequest,
    ) -> Result<Vec<ModelMessage>, ChatError> {
        let continued = request.chat_id.as_ref().filter(|_| !request.create_chat);
        let mut messages = match continued {
            Some(chat_id) => {
                let (_, earlier) = self
                    .store
                    .chat_history(chat_id, user.as_str(), HISTORY_MESSAGES)
                    .await?
                    .ok_or(ChatError::ChatNotFound)?;
                history::within_budget(
                    history::model_history(&earlier),
                    self.limits.max_history_chars,
                )
            }
            None => history::within_budget(
                history::brought_history(&request.earlier),
                self.limits.max_history_chars,
            ),
        };
        messages.push(ModelMessage {
            role: Role::User,
            content: request.message.clone(),
        });
        Ok(messages)
    }

    /// Claims the chat in the stream log (across instances, with shared state). An answer
    /// abandoned by a dead instance is concluded first, so the chat takes the new turn.
    async fn claim(&self, chat_id: &str) -> Result<Claim, ChatError> {
        match self.log.claim(chat_id).await {
            Ok(claim) => Ok(claim),
            Err(ClaimError::Orphaned) => {
                self.recovery.conclude_if_orphaned(chat_id).await?;
                self.log.claim(chat_id).await.map_err(claim_error)
            }
            Err(e) => Err(claim_error(e)),
        }
    }

    /// Claims the chat in this process and stores the turn's first half. With the chat claimed
    /// in the shared log, an answer storage still holds as streaming has no producer left (the
    /// shared state lost it): it is concluded and the turn tried once more.
    async fn begin(
        &self,
        turn: &NewTurn,
        claim: Claim,
    ) -> Result<(ActiveAnswer, BegunTurn), ChatError> {
        let answer = self
            .active
            .claim(&turn.chat_id, self.limits.unheard_grace)
            .ok_or(ChatError::ChatBusy)?;
        let mut begun = self.store.begin_turn(turn).await;
        if matches!(begun, Err(StoreError::ChatBusy))
            && claim != Claim::LOCAL
            && self.recovery.conclude_stored(&turn.chat_id).await?
        {
            begun = self.store.begin_turn(turn).await;
        }
        match begun {
            Ok(begun) => Ok((answer, begun)),
            Err(e) => {
                self.active.release(&turn.chat_id);
                Err(match e {
                    StoreError::ChatNotFound => ChatError::ChatNotFound,
                    StoreError::ChatBusy => ChatError::ChatBusy,
                    StoreError::QuotaExceeded(kind) => ChatError::QuotaExceeded(kind),
                    other => ChatError::Store(other),
                })
            }
        }
    }

    /// Starts the answer's log and listens to it before the producer starts, so the asker sees
    /// every event from `start` on.
    async fn open_log(
        &self,
        turn: &NewTurn,
        claim: Claim,
        after_id: i64,
        audience: &Arc<Audience>,
    ) -> Result<(AnswerSignals, BoxStream<'static, StreamEvent>), LogError> {
        let chat_id = &turn.chat_id;
        let message_id = &turn.assistant_message_id;
        let signals = self
            .log
            .open(chat_id, claim, message_id, after_id + 1, audience)
            .await?;
        let events = self
            .log
            .follow(chat_id, after_id)
            .await?
            .ok_or_else(|| LogError("the log just opened is not there".into()))?;
        Ok((signals, events))
    }

    /// Undoes a begun turn that cannot be streamed: the answer is stored as failed (nothing was
    /// sent) and the chat is free again.
    async fn abandon(&self, turn: &NewTurn, last_event_id: i64) {
        let failure = StreamFailure::new(
            "the answer could not be started",
            "service_unavailable",
            true,
        );
        let record = FinishedTurn::failed(
            &turn.chat_id,
            &turn.assistant_message_id,
            Vec::new(),
            &failure,
            last_event_id,
        );
        if let Err(e) = self.store.finish_turn(record).await {
            tracing::error!(chat_id = %turn.chat_id, "could not store the abandoned turn: {e}");
        }
        self.active.release(&turn.chat_id);
    }

    /// Runs the producer on the tracked task set, so shutdown waits for it to store its answer.
    /// However it ends — done, failed, panicked, or dropped with the runtime — the chat's claim
    /// is released; after a panic the aftermath stores the answer and ends its listeners.
    fn spawn_producer(&self, producer: turn::Turn, aftermath: turn::Aftermath) {
        let claim = control::ClaimGuard::new(self.active.clone(), producer.chat_id.clone());
        // The producer's log lines keep the request's id and user.
        let span = tracing::Span::current();
        let checkpoints = self.limits.checkpoint_every.map(|every| {
            checkpoint::save_while_streaming(
                self.store.clone(),
                producer.assistant_message_id.clone(),
                producer.progress.clone(),
                every,
            )
        });
        let over = producer.progress.over.clone();
        // Made here and boxed, not in the task: a value moved into an async block and then into
        // a future it awaits takes room twice in every open stream's task (5.6 KiB → 1.4 KiB
        // for the task, plus the 1.2 KiB box; docs/benchmarks.md, issue #26).
        let run = Box::pin(producer.run());
        let task = async move {
            let _claim = claim;
            let producing = async {
                let ran = std::panic::AssertUnwindSafe(run).catch_unwind().await;
                over.cancel(); // however it ended, the saver stops with it
                ran
            };
            // The saver runs beside the producer in the same task and ends with it.
            let (ran, ()) = tokio::join!(producing, async {
                if let Some(checkpoints) = checkpoints {
                    checkpoints.await;
                }
            });
            if ran.is_err() {
                let cleanup = std::panic::AssertUnwindSafe(aftermath.after_panic());
                if cleanup.catch_unwind().await.is_err() {
                    tracing::error!("ending a panicked answer panicked too");
                }
            }
        }
        .instrument(span);
        self.tasks.spawn(task);
    }

    /// The events of the chat's latest answer after `after_id` (from its start when `None`):
    /// live while it is generated here, from storage once it is stored. `None` when there is
    /// nothing left to send.
    pub async fn resume(
        &self,
        user: &UserId,
        chat_id: &str,
        after_id: Option<i64>,
    ) -> Result<Option<EventStream>, ChatError> {
        self.owned_chat(user, chat_id).await?;
        self.metrics.resumes.inc();
        let after = after_id.unwrap_or(0);
        let local = self.active.get(chat_id);
        if (local.is_some() || self.log.is_shared())
            && let Some(events) = self.log.follow(chat_id, after).await?
        {
            // Shared: the answer may be generated elsewhere, or taken over while we listen.
            let events = match self.log.is_shared() {
                true => self
                    .recovery
                    .clone()
                    .watch(chat_id.to_owned(), after, events),
                false => events,
            };
            return Ok(Some(match local {
                Some(answer) => Box::pin(answer.audience.listen(events)),
                None => events,
            }));
        }
        let messages = self.store.recent_messages(chat_id, 2).await?;
        let Some(latest) = messages.iter().rev().find(|m| m.role == Role::Assistant) else {
            return Ok(None);
        };
        let events = replay::events_after(chat_id, latest, after_id.unwrap_or(0));
        Ok((!events.is_empty()).then(|| stream::iter(events).boxed()))
    }

    /// A chat request that arrives with a Last-Event-ID is a reconnection (EventSource repeats
    /// the URL it was opened with), never a new question: it resumes the chat that request
    /// started, found by its id or as the caller's latest chat with this bot whose last question
    /// is this message. Nothing is asked twice; `None` when there is nothing to resume.
    pub async fn reconnect(
        &self,
        user: &UserId,
        request: &TurnRequest,
        after_id: i64,
    ) -> Result<Option<EventStream>, ChatError> {
        let candidates = match &request.chat_id {
            Some(chat_id) => vec![self.owned_chat(user, chat_id).await?],
            None => self.store.list_chats(user.as_str(), 5, None).await?,
        };
        for chat in candidates.iter().filter(|c| c.bot_id == request.bot_id) {
            let messages = self.store.recent_messages(&chat.id, 2).await?;
            let last_question = messages.iter().rev().find(|m| m.role == Role::User);
            if last_question.is_some_and(|q| q.content == request.message) {
                return self.resume(user, &chat.id, Some(after_id)).await;
            }
        }
        Ok(None)
    }

    /// Stops the chat's running answer from any connection; every listener gets its `done`.
    /// Says whether an answer was running.
    pub async fn stop(&self, user: &UserId, chat_id: &str) -> Result<bool, ChatError> {
        self.owned_chat(user, chat_id).await?;
        self.stop_anywhere(chat_id, StopCause::Stopped).await
    }

    /// Stops the chat's answer here, or asks the instance generating it (through the shared
    /// log's flag, which its producer reads on its next write or lease renewal — no message to
    /// lose); an answer whose producer is gone is concluded on the spot.
    async fn stop_anywhere(&self, chat_id: &str, cause: StopCause) -> Result<bool, ChatError> {
        if self.active.stop(chat_id, cause) {
            return Ok(true);
        }
        match self.log.request_stop(chat_id).await? {
            StopOutcome::Stopping => Ok(true),
            StopOutcome::NotRunning => Ok(false),
            StopOutcome::Orphaned => self.recovery.conclude_if_orphaned(chat_id).await,
        }
    }

    /// Concludes answers abandoned by dead instances until `stop` (with shared state only).
    pub async fn sweep_abandoned(&self, stop: CancellationToken) {
        if self.log.is_shared() {
            self.recovery.clone().sweep(stop).await;
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
}

fn claim_error(e: ClaimError) -> ChatError {
    match e {
        ClaimError::Busy | ClaimError::Orphaned => ChatError::ChatBusy,
        ClaimError::Log(e) => ChatError::Log(e),
    }
}

/// A dependency's check, bounded: a health check must answer before the load balancer gives up.
async fn answers_in_time<E: std::fmt::Display>(
    check: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(READINESS_TIMEOUT, check).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("no answer in time".to_owned()),
    }
}

/// The first target that can take the request, with the place it granted.
fn admit_first(targets: &[Target], user: &str) -> Result<(usize, Admission), ChatError> {
    let mut refusal = None;
    for (index, target) in targets.iter().enumerate() {
        match target.provider.admit(user) {
            Ok(admission) => return Ok((index, admission)),
            Err(e) => refusal = Some(e),
        }
    }
    Err(ChatError::Refused(refusal.expect("targets is not empty")))
}

/// The bot's system prompt, then the request's own instructions.
fn system_prompt(bot: Option<&str>, request: Option<String>) -> Option<String> {
    match (bot, request) {
        (Some(bot), Some(request)) => Some(format!("{bot}\n\n{request}")),
        (bot, request) => request.or(bot.map(str::to_owned)),
    }
}

fn quota_message(kind: QuotaKind) -> &'static str {
    match kind {
        QuotaKind::Chats => "you have as many chats as allowed; delete one to start another",
        QuotaKind::Bytes => "your chats hold as much text as allowed; delete some to go on",
        QuotaKind::Turns => "this chat has as many turns as allowed; start a new chat",
    }
}

/// The most message text one page of `GET /api/v1/chats/{id}/messages` carries.
pub const MESSAGE_PAGE_BYTES: usize = 2 * 1024 * 1024;

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
