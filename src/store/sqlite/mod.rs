//! SQLite implementation of [`ChatStore`]: WAL journal, foreign keys on, migrations embedded.
//!
//! Reads go through an sqlx pool (WAL lets them run beside the writer); every write goes through
//! [`writer`], one thread owning the only writing connection, which commits the writes that
//! arrive together in one transaction.

mod migrations;
mod writer;

use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use super::{
    BegunTurn, ChatCursor, ChatRecord, ChatStore, FinishedTurn, MessageRecord, MessageStatus,
    NewTurn, Replay, Role, StoreError, TokenUsage,
};
use writer::Writer;

pub struct SqliteStore {
    /// Readers.
    pool: SqlitePool,
    writer: Writer,
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
        let filename = options.get_filename().to_owned();
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            // A ping before every use is a round trip to the connection's thread; a broken local
            // file is reported by the query itself.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        migrations::run(&pool).await?;
        let writer = Writer::start(&filename, is_in_memory(url))?;
        Ok(Self { pool, writer })
    }
}

/// `sqlite::memory:` or `mode=memory`: the pool and the writer share it through SQLite's shared
/// cache (sqlx names it and opens it that way).
fn is_in_memory(url: &str) -> bool {
    url.ends_with(":memory:") || url.contains("mode=memory")
}

const CHAT_COLUMNS: &str = "id, user_id, bot_id, title, created_at, updated_at, last_event_id";
const MESSAGE_COLUMNS: &str = "id, chat_id, seq, role, content, status, error_code, \
    input_tokens, output_tokens, created_at, first_event_id, chunks, error_message, \
    error_retryable, provider, model";

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
        seq: row.try_get("seq")?,
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

    async fn list_messages(
        &self,
        chat_id: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = ?1 AND seq > ?2 \
             ORDER BY seq LIMIT ?3"
        ))
        .bind(chat_id)
        .bind(after_seq.unwrap_or(i64::MIN))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn recent_messages(
        &self,
        chat_id: &str,
        limit: u32,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = ?1 ORDER BY seq DESC LIMIT ?2"
        ))
        .bind(chat_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut messages = rows
            .iter()
            .map(message_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        messages.reverse();
        Ok(messages)
    }

    async fn begin_turn(&self, turn: &NewTurn) -> Result<BegunTurn, StoreError> {
        let turn = turn.clone();
        self.writer
            .write(move |conn| writer::begin_turn(conn, &turn))
            .await
    }

    async fn finish_turn(&self, turn: FinishedTurn) -> Result<(), StoreError> {
        self.writer
            .write(move |conn| writer::finish_turn(conn, &turn))
            .await
    }

    async fn delete_chat(&self, chat_id: &str, user_id: &str) -> Result<bool, StoreError> {
        let (chat_id, user_id) = (chat_id.to_owned(), user_id.to_owned());
        self.writer
            .write(move |conn| writer::delete_chat(conn, &chat_id, &user_id))
            .await
    }

    async fn recover_abandoned_turns(&self) -> Result<u64, StoreError> {
        self.writer.write(writer::recover_abandoned_turns).await
    }

    async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
