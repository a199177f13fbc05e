//! Rows to records, once for both databases: each backend's row type reads its columns through
//! [`Columns`], and the mapping from columns to [`ChatRecord`] and [`MessageRecord`] is shared.

use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use super::{
    AnswerVersion, ChatRecord, MessageRecord, MessageStatus, Replay, Role, StoreError, TokenUsage,
};

/// The chat columns every chat query selects, in this order.
pub(super) const CHAT_COLUMNS: &str =
    "id, user_id, bot_id, title, created_at, updated_at, last_event_id";
/// The message columns every message query selects.
pub(super) const MESSAGE_COLUMNS: &str = "id, chat_id, seq, role, content, status, error_code, \
    input_tokens, output_tokens, created_at, first_event_id, chunks, error_message, \
    error_retryable, provider, model, last_event_id";

/// A chat of a user with its last messages, in one query both databases run: `$1` chat, `$2`
/// user, `$3` how many messages. A chat's `seq` counts its messages from 1 without gaps, so the
/// last N are those above `MAX(seq) - N`. No row: not that user's chat.
pub(super) const CHAT_HISTORY: &str = "SELECT c.id AS c_id, c.user_id AS c_user_id, \
    c.bot_id AS c_bot_id, c.title AS c_title, c.created_at AS c_created_at, \
    c.updated_at AS c_updated_at, c.last_event_id AS c_last_event_id, \
    m.id, m.chat_id, m.seq, m.role, m.content, m.status, m.error_code, m.input_tokens, \
    m.output_tokens, m.created_at, m.first_event_id, m.chunks, m.error_message, \
    m.error_retryable, m.provider, m.model, m.last_event_id \
    FROM chats c LEFT JOIN messages m ON m.chat_id = c.id \
    AND m.seq > (SELECT COALESCE(MAX(seq), 0) FROM messages WHERE chat_id = $1) - $3 \
    WHERE c.id = $1 AND c.user_id = $2 ORDER BY m.seq";

/// A rewind from place `$2` on removes the versions kept there.
pub(super) const DROP_VERSIONS: &str =
    "DELETE FROM answer_versions WHERE chat_id = $1 AND seq >= $2";
/// The answer at place `$2` (after a question) becomes an earlier version, replaced at `$3`.
pub(super) const KEEP_ANSWER: &str = "INSERT INTO answer_versions \
    (id, chat_id, seq, content, status, error_code, created_at, replaced_at) \
    SELECT a.id, a.chat_id, a.seq, a.content, a.status, a.error_code, a.created_at, $3 \
    FROM messages a JOIN messages q ON q.chat_id = a.chat_id AND q.seq = a.seq - 1 \
    WHERE a.chat_id = $1 AND a.seq = $2 AND a.role = 'assistant' AND q.role = 'user'";
/// Of the versions at place `$2`, only the newest `$3` stay.
pub(super) const TRIM_VERSIONS: &str = "DELETE FROM answer_versions \
    WHERE chat_id = $1 AND seq = $2 AND id NOT IN (SELECT id FROM answer_versions \
    WHERE chat_id = $1 AND seq = $2 ORDER BY replaced_at DESC, id DESC LIMIT $3)";

/// The rows of [`CHAT_HISTORY`] as the chat and its messages.
pub(super) fn chat_history_from<R: Columns>(
    rows: &[R],
) -> Result<Option<(ChatRecord, Vec<MessageRecord>)>, StoreError> {
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let chat = chat_from(first, "c_")?;
    let mut messages = Vec::with_capacity(rows.len());
    for row in rows {
        // The LEFT JOIN's one row for a chat without messages has no message columns.
        if row.opt_text("id")?.is_some() {
            messages.push(message_from(row)?);
        }
    }
    Ok(Some((chat, messages)))
}

/// Typed column reads, by name.
pub(super) trait Columns {
    fn text(&self, name: &str) -> Result<String, StoreError>;
    fn opt_text(&self, name: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, name: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, name: &str) -> Result<Option<i64>, StoreError>;
    fn opt_bool(&self, name: &str) -> Result<Option<bool>, StoreError>;
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, name: &str) -> Result<String, StoreError> {
                Ok(self.try_get(name)?)
            }
            fn opt_text(&self, name: &str) -> Result<Option<String>, StoreError> {
                Ok(self.try_get(name)?)
            }
            fn int(&self, name: &str) -> Result<i64, StoreError> {
                Ok(self.try_get(name)?)
            }
            fn opt_int(&self, name: &str) -> Result<Option<i64>, StoreError> {
                Ok(self.try_get(name)?)
            }
            fn opt_bool(&self, name: &str) -> Result<Option<bool>, StoreError> {
                Ok(self.try_get(name)?)
            }
        }
    };
}

columns_for!(SqliteRow);
columns_for!(PgRow);

/// A chat from columns named `{prefix}id`, `{prefix}user_id`, …
pub(super) fn chat_from(row: &impl Columns, prefix: &str) -> Result<ChatRecord, StoreError> {
    let col = |name: &str| format!("{prefix}{name}");
    Ok(ChatRecord {
        id: row.text(&col("id"))?,
        user_id: row.text(&col("user_id"))?,
        bot_id: row.text(&col("bot_id"))?,
        title: row.text(&col("title"))?,
        created_at_ms: row.int(&col("created_at"))?,
        updated_at_ms: row.int(&col("updated_at"))?,
        last_event_id: row.int(&col("last_event_id"))?,
    })
}

pub(super) fn version_from(row: &impl Columns) -> Result<AnswerVersion, StoreError> {
    Ok(AnswerVersion {
        id: row.text("id")?,
        seq: row.int("seq")?,
        content: row.text("content")?,
        status: MessageStatus::parse(&row.text("status")?)?,
        error_code: row.opt_text("error_code")?,
        created_at_ms: row.int("created_at")?,
    })
}

pub(super) fn message_from(row: &impl Columns) -> Result<MessageRecord, StoreError> {
    let usage = match (row.opt_int("input_tokens")?, row.opt_int("output_tokens")?) {
        (None, None) => None,
        (i, o) => Some(TokenUsage {
            input_tokens: i.unwrap_or_default().max(0) as u64,
            output_tokens: o.unwrap_or_default().max(0) as u64,
        }),
    };
    let role = row.text("role")?;
    Ok(MessageRecord {
        id: row.text("id")?,
        chat_id: row.text("chat_id")?,
        role: Role::parse(&role)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown role '{role}'")))?,
        content: row.text("content")?,
        status: MessageStatus::parse(&row.text("status")?)?,
        error_code: row.opt_text("error_code")?,
        usage,
        created_at_ms: row.int("created_at")?,
        seq: row.int("seq")?,
        replay: replay_from(row)?,
    })
}

fn replay_from(row: &impl Columns) -> Result<Option<Replay>, StoreError> {
    let Some(first_event_id) = row.opt_int("first_event_id")? else {
        return Ok(None);
    };
    let chunks = match row.opt_text("chunks")? {
        Some(json) => {
            serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(format!("chunks: {e}")))?
        }
        None => Vec::new(),
    };
    Ok(Some(Replay {
        first_event_id,
        chunks,
        error_message: row.opt_text("error_message")?,
        error_retryable: row.opt_bool("error_retryable")?,
        provider: row.opt_text("provider")?,
        model: row.opt_text("model")?,
        last_event_id: row.opt_int("last_event_id")?,
    }))
}

/// The reads both databases run with the same SQL (`$N` placeholders, which SQLite takes too),
/// generated once per pool type: `reads_for!(SqlitePool)` in a module gives its `get_chat`,
/// `list_chats`, `list_messages`, `chat_history`, `messages_before` and `message_seq`, each taking the pool and
/// how that backend names a failed query.
macro_rules! reads_for {
    ($pool:ty) => {
        use $crate::store::rows::{
            CHAT_COLUMNS, CHAT_HISTORY, MESSAGE_COLUMNS, chat_from, chat_history_from,
            message_from, version_from,
        };
        use $crate::store::{AnswerVersion, ChatCursor, ChatRecord, MessageRecord, StoreError};

        type Failed = fn(sqlx::Error) -> StoreError;

        pub async fn get_chat(
            pool: &$pool,
            failed: Failed,
            chat_id: &str,
        ) -> Result<Option<ChatRecord>, StoreError> {
            let row = sqlx::query(&format!("SELECT {CHAT_COLUMNS} FROM chats WHERE id = $1"))
                .bind(chat_id)
                .fetch_optional(pool)
                .await
                .map_err(failed)?;
            row.as_ref().map(|r| chat_from(r, "")).transpose()
        }

        pub async fn list_chats(
            pool: &$pool,
            failed: Failed,
            user_id: &str,
            limit: u32,
            cursor: Option<&ChatCursor>,
        ) -> Result<Vec<ChatRecord>, StoreError> {
            let (after_time, after_id) = ChatCursor::keyset(cursor);
            let rows = sqlx::query(&format!(
                "SELECT {CHAT_COLUMNS} FROM chats WHERE user_id = $1 \
                 AND (updated_at < $2 OR (updated_at = $2 AND id < $3)) \
                 ORDER BY updated_at DESC, id DESC LIMIT $4"
            ))
            .bind(user_id)
            .bind(after_time)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
            .map_err(failed)?;
            rows.iter().map(|r| chat_from(r, "")).collect()
        }

        pub async fn list_messages(
            pool: &$pool,
            failed: Failed,
            chat_id: &str,
            after_seq: Option<i64>,
            limit: u32,
        ) -> Result<Vec<MessageRecord>, StoreError> {
            let rows = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = $1 AND seq > $2 \
                 ORDER BY seq LIMIT $3"
            ))
            .bind(chat_id)
            .bind(after_seq.unwrap_or(i64::MIN))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
            .map_err(failed)?;
            rows.iter().map(message_from).collect()
        }

        pub async fn chat_history(
            pool: &$pool,
            failed: Failed,
            chat_id: &str,
            user_id: &str,
            limit: u32,
        ) -> Result<Option<(ChatRecord, Vec<MessageRecord>)>, StoreError> {
            let rows = sqlx::query(CHAT_HISTORY)
                .bind(chat_id)
                .bind(user_id)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err(failed)?;
            chat_history_from(&rows)
        }

        /// The last `limit` messages before `before_seq` (of all when `None`), in order.
        pub async fn messages_before(
            pool: &$pool,
            failed: Failed,
            chat_id: &str,
            before_seq: Option<i64>,
            limit: u32,
        ) -> Result<Vec<MessageRecord>, StoreError> {
            let rows = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = $1 AND seq < $2 \
                 ORDER BY seq DESC LIMIT $3"
            ))
            .bind(chat_id)
            .bind(before_seq.unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
            .map_err(failed)?;
            let mut messages = rows
                .iter()
                .map(message_from)
                .collect::<Result<Vec<_>, _>>()?;
            messages.reverse();
            Ok(messages)
        }

        pub async fn answer_versions(
            pool: &$pool,
            failed: Failed,
            chat_id: &str,
            from_seq: i64,
            to_seq: i64,
        ) -> Result<Vec<AnswerVersion>, StoreError> {
            let rows = sqlx::query(
                "SELECT id, seq, content, status, error_code, created_at FROM answer_versions \
                 WHERE chat_id = $1 AND seq >= $2 AND seq <= $3 \
                 ORDER BY seq, replaced_at, id",
            )
            .bind(chat_id)
            .bind(from_seq)
            .bind(to_seq)
            .fetch_all(pool)
            .await
            .map_err(failed)?;
            rows.iter().map(version_from).collect()
        }

        pub async fn message_seq(
            pool: &$pool,
            failed: Failed,
            chat_id: &str,
            message_id: &str,
        ) -> Result<Option<i64>, StoreError> {
            sqlx::query_scalar("SELECT seq FROM messages WHERE chat_id = $1 AND id = $2")
                .bind(chat_id)
                .bind(message_id)
                .fetch_optional(pool)
                .await
                .map_err(failed)
        }
    };
}

pub(super) mod sqlite_reads {
    reads_for!(sqlx::SqlitePool);
}

pub(super) mod postgres_reads {
    reads_for!(sqlx::PgPool);
}

/// Quotas are `u64` (with `u64::MAX` for none); databases compare `BIGINT`s.
pub(super) fn as_bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
