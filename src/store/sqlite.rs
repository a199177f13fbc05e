//! SQLite implementation of [`ChatStore`]: WAL journal, foreign keys on, migrations embedded.
//!
//! Every write transaction starts with a write statement, so SQLite takes the write lock at once
//! and two turns never deadlock upgrading a read lock (which `busy_timeout` cannot resolve).

use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use super::{
    BegunTurn, ChatCursor, ChatRecord, ChatStore, FinishedTurn, MessageRecord, MessageStatus,
    NewTurn, Replay, Role, StoreError, TokenUsage, now_ms, title_from,
};

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            // In WAL mode NORMAL never corrupts the database; a power cut (not a crash) may lose
            // the last commits. It saves an fsync per turn, which dominates a stream's start.
            .synchronous(SqliteSynchronous::Normal);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }
}

const CHAT_COLUMNS: &str = "id, user_id, bot_id, title, created_at, updated_at, last_event_id";

fn chat_from_row(row: &SqliteRow) -> Result<ChatRecord, StoreError> {
    Ok(ChatRecord {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        bot_id: row.try_get("bot_id")?,
        title: row.try_get("title")?,
        created_at_ms: row.try_get("created_at")?,
        updated_at_ms: row.try_get("updated_at")?,
        last_event_id: row.try_get("last_event_id")?,
    })
}

fn message_from_row(row: &SqliteRow) -> Result<MessageRecord, StoreError> {
    let input: Option<i64> = row.try_get("input_tokens")?;
    let output: Option<i64> = row.try_get("output_tokens")?;
    let usage = match (input, output) {
        (None, None) => None,
        (i, o) => Some(TokenUsage {
            input_tokens: i.unwrap_or_default().max(0) as u64,
            output_tokens: o.unwrap_or_default().max(0) as u64,
        }),
    };
    Ok(MessageRecord {
        id: row.try_get("id")?,
        chat_id: row.try_get("chat_id")?,
        role: {
            let role: &str = row.try_get("role")?;
            Role::parse(role)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown role '{role}'")))?
        },
        content: row.try_get("content")?,
        status: MessageStatus::parse(row.try_get("status")?)?,
        error_code: row.try_get("error_code")?,
        usage,
        created_at_ms: row.try_get("created_at")?,
        replay: replay_from_row(row)?,
    })
}

fn replay_from_row(row: &SqliteRow) -> Result<Option<Replay>, StoreError> {
    let Some(first_event_id) = row.try_get::<Option<i64>, _>("first_event_id")? else {
        return Ok(None);
    };
    let chunks = match row.try_get::<Option<String>, _>("chunks")? {
        Some(json) => {
            serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(format!("chunks: {e}")))?
        }
        None => Vec::new(),
    };
    Ok(Some(Replay {
        first_event_id,
        chunks,
        error_message: row.try_get("error_message")?,
        error_retryable: row.try_get::<Option<bool>, _>("error_retryable")?,
        provider: row.try_get("provider")?,
        model: row.try_get("model")?,
    }))
}

#[async_trait::async_trait]
impl ChatStore for SqliteStore {
    async fn get_chat(&self, chat_id: &str) -> Result<Option<ChatRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {CHAT_COLUMNS} FROM chats WHERE id = ?1"))
            .bind(chat_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(chat_from_row).transpose()
    }

    async fn list_chats(
        &self,
        user_id: &str,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<Vec<ChatRecord>, StoreError> {
        // With no cursor, start past any real row: i64::MAX sorts after every timestamp.
        let (after_time, after_id) = match cursor {
            Some(c) => (c.updated_at_ms, c.id.as_str()),
            None => (i64::MAX, ""),
        };
        let rows = sqlx::query(&format!(
            "SELECT {CHAT_COLUMNS} FROM chats WHERE user_id = ?1 \
             AND (updated_at < ?2 OR (updated_at = ?2 AND id < ?3)) \
             ORDER BY updated_at DESC, id DESC LIMIT ?4"
        ))
        .bind(user_id)
        .bind(after_time)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(chat_from_row).collect()
    }

    async fn list_messages(&self, chat_id: &str) -> Result<Vec<MessageRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, chat_id, role, content, status, error_code, input_tokens, output_tokens, \
             created_at, first_event_id, chunks, error_message, error_retryable, provider, model \
             FROM messages WHERE chat_id = ?1 ORDER BY seq",
        )
        .bind(chat_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn begin_turn(&self, turn: &NewTurn) -> Result<BegunTurn, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let last_event_id: i64 = if turn.new_chat {
            sqlx::query(
                "INSERT INTO chats (id, user_id, bot_id, title, created_at, updated_at, \
                 last_event_id) VALUES (?1, ?2, ?3, ?4, ?5, ?5, 0)",
            )
            .bind(&turn.chat_id)
            .bind(&turn.user_id)
            .bind(&turn.bot_id)
            .bind(title_from(&turn.message))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            0
        } else {
            let row = sqlx::query(
                "UPDATE chats SET updated_at = ?3 WHERE id = ?1 AND user_id = ?2 \
                 RETURNING last_event_id",
            )
            .bind(&turn.chat_id)
            .bind(&turn.user_id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::ChatNotFound)?;
            row.try_get(0)?
        };
        // A chat created just now can have no answer in progress.
        if !turn.new_chat {
            let busy =
                sqlx::query("SELECT 1 FROM messages WHERE chat_id = ?1 AND status = 'streaming'")
                    .bind(&turn.chat_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if busy.is_some() {
                return Err(StoreError::ChatBusy);
            }
        }
        // Both messages in one statement: every statement is a round trip to SQLite's thread,
        // and a stream's start waits for this transaction.
        sqlx::query(
            "INSERT INTO messages (id, chat_id, seq, role, content, status, created_at, \
             first_event_id) \
             SELECT ?1, ?3, base + 1, 'user', ?4, 'complete', ?5, NULL FROM \
               (SELECT COALESCE(MAX(seq), 0) AS base FROM messages WHERE chat_id = ?3) \
             UNION ALL \
             SELECT ?2, ?3, base + 2, 'assistant', '', 'streaming', ?5, ?6 FROM \
               (SELECT COALESCE(MAX(seq), 0) AS base FROM messages WHERE chat_id = ?3)",
        )
        .bind(&turn.user_message_id)
        .bind(&turn.assistant_message_id)
        .bind(&turn.chat_id)
        .bind(&turn.message)
        .bind(now)
        .bind(last_event_id + 1)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(BegunTurn { last_event_id })
    }

    async fn finish_turn(&self, turn: &FinishedTurn) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE messages SET content = ?2, status = ?3, error_code = ?4, input_tokens = ?5, \
             output_tokens = ?6, chunks = ?7, error_message = ?8, error_retryable = ?9, \
             provider = ?10, model = ?11 WHERE id = ?1",
        )
        .bind(&turn.assistant_message_id)
        .bind(&turn.content)
        .bind(turn.status.as_str())
        .bind(&turn.error_code)
        .bind(turn.usage.map(|u| u.input_tokens as i64))
        .bind(turn.usage.map(|u| u.output_tokens as i64))
        .bind(serde_json::to_string(&turn.chunks).expect("strings serialise"))
        .bind(&turn.error_message)
        .bind(turn.error_retryable)
        .bind(&turn.provider)
        .bind(&turn.model)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE chats SET last_event_id = MAX(last_event_id, ?2), updated_at = ?3 WHERE id = ?1")
            .bind(&turn.chat_id)
            .bind(turn.last_event_id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_chat(&self, chat_id: &str, user_id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM chats WHERE id = ?1 AND user_id = ?2")
            .bind(chat_id)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn recover_abandoned_turns(&self) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE messages SET status = 'interrupted', error_code = 'server_restarted' \
             WHERE status = 'streaming'",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
