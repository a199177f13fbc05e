//! Chats and their messages, behind [`ChatStore`] so SQLite (the default) and PostgreSQL (at
//! scale, shared by many instances) share one contract and one conformance test suite
//! (`tests/api/store.rs`). Knows nothing of HTTP or providers.
//!
//! A turn is written twice: [`ChatStore::begin_turn`] stores the user's message and an assistant
//! placeholder (status `streaming`) in one transaction before the model is called, and
//! [`ChatStore::finish_turn`] fills in the answer, its status and usage in another. A chat never
//! holds half a turn, and a chat with a `streaming` answer accepts no second turn.

mod migrations;
mod postgres;
mod rows;
mod search;
mod sqlite;
mod usage;

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use postgres::PostgresStore;
pub use search::{SearchHit, SearchTerms};
pub use sqlite::SqliteStore;
pub use usage::{MAX_USAGE_ROWS, UsageGrouping, UsageQuery, UsageRow};

use crate::config::DatabaseConfig;

pub use crate::domain::{Role, TokenUsage};

/// A chat as listed to its owner.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRecord {
    pub id: String,
    pub user_id: String,
    pub bot_id: String,
    pub title: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// The id of the last SSE event any turn of this chat sent; the next turn continues after it.
    pub last_event_id: i64,
}

/// Where an assistant message stands. User messages are always `Complete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageStatus {
    /// Being generated right now.
    Streaming,
    Complete,
    /// Cut short: the client went away, the chat was deleted or the server shut down.
    Interrupted,
    /// Stopped on purpose (the stop endpoint).
    Stopped,
    /// The provider failed; `error_code` says how.
    Error,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Streaming => "streaming",
            MessageStatus::Complete => "complete",
            MessageStatus::Interrupted => "interrupted",
            MessageStatus::Stopped => "stopped",
            MessageStatus::Error => "error",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "streaming" => Ok(MessageStatus::Streaming),
            "complete" => Ok(MessageStatus::Complete),
            "interrupted" => Ok(MessageStatus::Interrupted),
            "stopped" => Ok(MessageStatus::Stopped),
            "error" => Ok(MessageStatus::Error),
            other => Err(StoreError::Corrupt(format!("unknown status '{other}'"))),
        }
    }
}

impl fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    pub id: String,
    pub chat_id: String,
    pub role: Role,
    pub content: String,
    pub status: MessageStatus,
    pub error_code: Option<String>,
    pub usage: Option<TokenUsage>,
    pub created_at_ms: i64,
    /// Its place in the chat: increasing, the key of message pages.
    pub seq: i64,
    /// Assistant answers: how to replay their events.
    pub replay: Option<Replay>,
}

/// What an answer's SSE events were: enough to send them again, ids included.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Replay {
    /// The id of its `start` event; content pieces follow one id each, then the terminal event.
    pub first_event_id: i64,
    pub chunks: Vec<String>,
    pub error_message: Option<String>,
    pub error_retryable: Option<bool>,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// The id of its terminal event when that is not simply the one after the last piece (an
    /// answer recovered after a crash skips the ids its lost pieces may have used).
    pub last_event_id: Option<i64>,
}

impl Replay {
    /// The id its terminal event has.
    pub fn terminal_event_id(&self) -> i64 {
        let after_pieces = self.first_event_id + self.chunks.len() as i64 + 1;
        self.last_event_id.unwrap_or(after_pieces).max(after_pieces)
    }
}

/// An answer that a regenerated one replaced, kept to be looked at again.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerVersion {
    pub id: String,
    /// The place in the chat it held, which the current answer holds now.
    pub seq: i64,
    pub content: String,
    pub status: MessageStatus,
    pub error_code: Option<String>,
    pub created_at_ms: i64,
}

/// Earlier versions kept per answer: a regenerated answer past this many drops its oldest.
pub const MAX_ANSWER_VERSIONS: i64 = 9;

/// What one user may store: checked when a turn begins, in the same transaction that writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageQuota {
    pub max_chats: u64,
    /// Bytes of message text over all the user's chats.
    pub max_bytes: u64,
    /// Questions (each with its answer) in one chat.
    pub max_turns: u64,
}

impl StorageQuota {
    /// No limits (tools and tests that write directly).
    pub const NONE: StorageQuota = StorageQuota {
        max_chats: u64::MAX,
        max_bytes: u64::MAX,
        max_turns: u64::MAX,
    };
}

/// Which quota a refused turn would have gone past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    Chats,
    Bytes,
    Turns,
}

/// The first half of a turn: who asks what, in which chat.
#[derive(Debug, Clone)]
pub struct NewTurn {
    pub chat_id: String,
    pub user_id: String,
    /// True when the chat does not exist yet and must be created for `user_id`.
    pub new_chat: bool,
    pub bot_id: String,
    pub user_message_id: String,
    pub assistant_message_id: String,
    pub message: String,
    /// A new chat's history, stored before `message` as complete messages: question and answer
    /// pairs, in order (a client that brings its own conversation, like the OpenAI API's). Empty
    /// for a chat that exists; ignored then.
    pub earlier: Vec<EarlierMessage>,
    pub quota: StorageQuota,
}

/// One message of the history a new chat starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlierMessage {
    pub role: Role,
    pub content: String,
}

impl NewTurn {
    /// The earlier messages this turn stores: a new chat's history, whole pairs only (a stored
    /// chat counts two messages per turn).
    pub fn stored_earlier(&self) -> &[EarlierMessage] {
        match self.new_chat {
            true => &self.earlier[..self.earlier.len() / 2 * 2],
            false => &[],
        }
    }

    /// Bytes of text this turn adds to its user's storage.
    pub fn bytes(&self) -> u64 {
        let earlier: usize = self.stored_earlier().iter().map(|m| m.content.len()).sum();
        (earlier + self.message.len()) as u64
    }

    /// The new chat's title: from its first question.
    pub fn title(&self) -> String {
        let first = self.stored_earlier().first();
        title_from(first.map_or(&self.message, |m| &m.content))
    }
}

/// What `begin_turn` reserved.
#[derive(Debug, Clone)]
pub struct BegunTurn {
    /// The chat's last event id before this turn; this turn's events follow it.
    pub last_event_id: i64,
}

/// The second half of a turn: how the answer ended.
#[derive(Debug, Clone)]
pub struct FinishedTurn {
    pub chat_id: String,
    pub assistant_message_id: String,
    pub content: String,
    /// The answer's pieces as streamed (shared with the events that carried them).
    pub chunks: Vec<std::sync::Arc<str>>,
    pub status: MessageStatus,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub error_retryable: Option<bool>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub usage: Option<TokenUsage>,
    /// The id reserved for the answer's terminal event, sent or not.
    pub last_event_id: i64,
    pub measures: TurnMeasures,
}

/// How a turn went, for the usage ledger (beside what the answer itself records).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TurnMeasures {
    /// From the turn's start to its first piece of text; `None` when none came.
    pub first_token_ms: Option<u64>,
    pub duration_ms: Option<u64>,
    /// The prompt's tokens as Mangoo counts them, for a provider that reports none.
    pub counted_input_tokens: u64,
}

impl FinishedTurn {
    /// The tokens the ledger records, and whether the provider reported them: its own count
    /// when it gave one, else the prompt as counted and a token per piece of text streamed.
    pub fn ledger_usage(&self) -> (TokenUsage, bool) {
        match self.usage {
            Some(usage) => (usage, true),
            None => (
                TokenUsage {
                    input_tokens: self.measures.counted_input_tokens,
                    output_tokens: self.chunks.len() as u64,
                },
                false,
            ),
        }
    }
}

impl FinishedTurn {
    /// An answer that failed on our side (no provider to name): stored as `error` with the text
    /// streamed so far.
    pub fn failed(
        chat_id: &str,
        assistant_message_id: &str,
        chunks: Vec<std::sync::Arc<str>>,
        failure: &crate::events::StreamFailure,
        last_event_id: i64,
    ) -> Self {
        Self {
            chat_id: chat_id.to_owned(),
            assistant_message_id: assistant_message_id.to_owned(),
            content: chunks.concat(),
            chunks,
            status: MessageStatus::Error,
            error_code: Some(failure.code.clone()),
            error_message: Some(failure.message.clone()),
            error_retryable: Some(failure.retryable),
            provider: None,
            model: None,
            usage: None,
            last_event_id,
            measures: TurnMeasures::default(),
        }
    }
}

/// Event ids an answer holds in reserve beyond the last one it saved (and from its start, which
/// `begin_turn` reserves in the same write): a crash recovers its answer with a terminal id past
/// them, so a client never sees an id twice. Saves come about once a second, far fewer events
/// than this apart.
pub const RESERVED_EVENT_IDS: i64 = 4096;

/// An answer's text so far, saved while it streams so a crash loses at most the last moments.
#[derive(Debug, Clone)]
pub struct PartialAnswer {
    pub assistant_message_id: String,
    pub chunks: Vec<std::sync::Arc<str>>,
    /// No event of this answer will carry a larger id before the next save: after a crash, the
    /// recovered answer's terminal event takes the next one, so no id a client saw is reused.
    pub reserved_event_id: i64,
}

/// Keyset pagination position: the chat listed last on the previous page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatCursor {
    pub updated_at_ms: i64,
    pub id: String,
}

impl ChatCursor {
    /// The position after `chat` in a list ordered by last activity.
    pub fn after(chat: &ChatRecord) -> Self {
        Self {
            updated_at_ms: chat.updated_at_ms,
            id: chat.id.clone(),
        }
    }

    /// The keyset a query continues after. With no cursor, start past any real row: `i64::MAX`
    /// sorts after every timestamp.
    pub(crate) fn keyset(cursor: Option<&ChatCursor>) -> (i64, &str) {
        cursor.map_or((i64::MAX, ""), |c| (c.updated_at_ms, c.id.as_str()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chat not found")]
    ChatNotFound,
    #[error("chat already has an answer in progress")]
    ChatBusy,
    #[error("message not found")]
    MessageNotFound,
    #[error("the {0:?} quota is used up")]
    QuotaExceeded(QuotaKind),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database cannot be reached (or no connection came free in time): retry later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database write failed: {0}")]
    Write(String),
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    /// The database is away for now (its connections broke, or none came free): the same call
    /// may work later. Everything else is an answer.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

#[async_trait::async_trait]
pub trait ChatStore: Send + Sync + 'static {
    async fn get_chat(&self, chat_id: &str) -> Result<Option<ChatRecord>, StoreError>;

    /// The user's chats, most recently active first, after `cursor` when given.
    async fn list_chats(
        &self,
        user_id: &str,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<Vec<ChatRecord>, StoreError>;

    /// Up to `limit` messages of a chat in conversation order, those after `after_seq` (from
    /// the first when `None`).
    async fn list_messages(
        &self,
        chat_id: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<MessageRecord>, StoreError>;

    /// The chat, if it is `user_id`'s, with its last `limit` messages in conversation order: what
    /// a new turn needs to know, in one round trip.
    async fn chat_history(
        &self,
        chat_id: &str,
        user_id: &str,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>)>, StoreError>;

    /// The chat's last `limit` messages, in conversation order.
    async fn recent_messages(
        &self,
        chat_id: &str,
        limit: u32,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        self.messages_before(chat_id, None, limit).await
    }

    /// Up to `limit` messages of a chat in conversation order: the last ones before
    /// `before_seq` (the chat's last ones when `None`).
    async fn messages_before(
        &self,
        chat_id: &str,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<MessageRecord>, StoreError>;

    /// Where a message of the chat stands (its `seq`); `None` when the chat has no such message.
    async fn message_seq(&self, chat_id: &str, message_id: &str)
    -> Result<Option<i64>, StoreError>;

    /// The chats of `user_id` whose title or a finished message holds every term (each as a
    /// word prefix), most recently active first, after `cursor` when given; each with the
    /// chat's latest matching message.
    async fn search_chats(
        &self,
        user_id: &str,
        terms: &SearchTerms,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<Vec<SearchHit>, StoreError>;

    /// Stores the user's message and a `streaming` assistant placeholder, creating the chat when
    /// `turn.new_chat`. Fails with `ChatNotFound` when an existing chat is not `turn.user_id`'s,
    /// with `ChatBusy` while another answer in the chat is still streaming and with
    /// `QuotaExceeded` when the turn would take the user past `turn.quota`. Repeatable: the
    /// same turn (by its message ids) begun again returns what the first call did and writes
    /// nothing, so a call whose reply was lost with its connection can be sent again.
    async fn begin_turn(&self, turn: &NewTurn) -> Result<BegunTurn, StoreError>;

    /// Stores how the answer ended, if it is still `streaming`; false when it was concluded
    /// already (by whoever found its producer gone): the first conclusion stands. Repeatable:
    /// the same outcome stored again is true and changes nothing.
    async fn finish_turn(&self, turn: FinishedTurn) -> Result<bool, StoreError>;

    /// Saves the text of an answer still `streaming`; false when it is not any more.
    async fn save_partial(&self, partial: PartialAnswer) -> Result<bool, StoreError>;

    /// Deletes a chat of `user_id` with its messages; false when there was none.
    async fn delete_chat(&self, chat_id: &str, user_id: &str) -> Result<bool, StoreError>;

    /// Gives a chat of `user_id` a new title; false when there was none.
    async fn rename_chat(
        &self,
        chat_id: &str,
        user_id: &str,
        title: &str,
    ) -> Result<bool, StoreError>;

    /// Removes a message of a chat of `user_id` and every later one, so that a turn can be asked
    /// again (edited, or its answer regenerated). With `keep_answer`, when the message is a
    /// question, its answer is kept as an earlier version of the next answer in its place (at
    /// most [`MAX_ANSWER_VERSIONS`] are kept, the newest); every other version from the removed
    /// places goes. `ChatNotFound`, `MessageNotFound`, or `ChatBusy` while an answer in the chat
    /// is streaming (nothing is removed then).
    async fn rewind_chat(
        &self,
        chat_id: &str,
        user_id: &str,
        message_id: &str,
        keep_answer: bool,
    ) -> Result<(), StoreError>;

    /// The earlier versions of the answers at places `from_seq..=to_seq` of a chat, by place,
    /// oldest first.
    async fn answer_versions(
        &self,
        chat_id: &str,
        from_seq: i64,
        to_seq: i64,
    ) -> Result<Vec<AnswerVersion>, StoreError>;

    /// Marks answers left `streaming` by a process that died as `interrupted`, with the text
    /// they had saved. Only safe where one process owns the database: without shared state
    /// (Redis), which a cluster's answers are concluded through instead.
    async fn recover_abandoned_turns(&self) -> Result<u64, StoreError>;

    /// Sums of the usage ledger (every concluded turn, chats deleted or not), by group.
    async fn usage(&self, query: UsageQuery<'_>) -> Result<Vec<UsageRow>, StoreError>;

    async fn ping(&self) -> Result<(), StoreError>;

    /// Lets queued writes finish and closes the connections; later calls fail with `Closed`.
    async fn close(&self);
}

/// Opens the store the configured URL names, applying migrations.
pub async fn connect(config: &DatabaseConfig) -> Result<Arc<dyn ChatStore>, StoreError> {
    if config.is_postgres() {
        Ok(Arc::new(PostgresStore::connect(config).await?))
    } else {
        Ok(Arc::new(SqliteStore::connect(&config.url).await?))
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A chat's first title, from its first message: the first sentence, without Markdown's line
/// markers, on one line, cut at a word if longer than a sidebar shows. Users rename it at will.
pub fn title_from(message: &str) -> String {
    const MAX_CHARS: usize = 60;
    let line = message
        .lines()
        .map(|line| {
            line.trim()
                .trim_start_matches(['#', '>', '-', '*', '`', ' '])
        })
        .find(|line| !line.is_empty())
        .unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    let sentence_end = words
        .iter()
        .position(|w| {
            let bare = w.trim_end_matches(['.', '?', '!']);
            // Not "e.g." or "U.S.", not a lone initial.
            bare.len() < w.len() && bare.chars().count() > 1 && !bare.contains('.')
        })
        .map_or(words.len(), |at| at + 1);
    let sentence = words[..sentence_end].join(" ");
    if sentence.chars().count() <= MAX_CHARS {
        return sentence;
    }
    let cut: String = sentence.chars().take(MAX_CHARS).collect();
    let at_word = match cut.rfind(' ') {
        Some(space) if space > MAX_CHARS / 2 => &cut[..space],
        _ => cut.as_str(),
    };
    format!("{}…", at_word.trim_end_matches([',', ';', ':', ' ']))
}

#[cfg(test)]
mod title_tests {
    use super::title_from;

    #[test]
    fn a_title_is_the_first_sentence_on_one_line_cut_at_a_word() {
        assert_eq!(title_from("Try twice"), "Try twice");
        assert_eq!(
            title_from("What is Rust? Tell me everything, with examples."),
            "What is Rust?"
        );
        assert_eq!(title_from("## Plan\nfor the trip"), "Plan");
        assert_eq!(title_from("  \n\n  spaced   out\ttext "), "spaced out text");
        assert_eq!(title_from("e.g. this stays whole"), "e.g. this stays whole");
        let long =
            "Summarise the following article about the history of the printing press in Europe";
        assert_eq!(
            title_from(long),
            "Summarise the following article about the history of the…"
        );
        assert_eq!(title_from(&"x".repeat(100)), format!("{}…", "x".repeat(60)));
    }
}
