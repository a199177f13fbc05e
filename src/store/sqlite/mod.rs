//! SQLite implementation of [`ChatStore`]: WAL journal, foreign keys on, migrations embedded.
//!
//! Reads go through an sqlx pool (WAL lets them run beside the writer); every write goes through
//! [`writer`], one thread owning the only writing connection, which commits the writes that
//! arrive together in one transaction.

mod writer;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::rows::sqlite_reads as reads;
use super::{
    AnswerVersion, BegunTurn, ChatCursor, ChatRecord, ChatStore, FinishedTurn, MessageRecord,
    NewTurn, PartialAnswer, SearchHit, SearchTerms, StoreError, migrations, search,
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
        migrations::migrator(migrations::SQLITE)
            .await?
            .run(&pool)
            .await?;
        let writer = Writer::start(&filename, is_in_memory(url))?;
        Ok(Self { pool, writer })
    }
}

/// `sqlite::memory:` or `mode=memory`: the pool and the writer share it through SQLite's shared
/// cache (sqlx names it and opens it that way).
fn is_in_memory(url: &str) -> bool {
    url.ends_with(":memory:") || url.contains("mode=memory")
}

#[async_trait::async_trait]
impl ChatStore for SqliteStore {
    async fn get_chat(&self, chat_id: &str) -> Result<Option<ChatRecord>, StoreError> {
        reads::get_chat(&self.pool, StoreError::from, chat_id).await
    }

    async fn list_chats(
        &self,
        user_id: &str,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<Vec<ChatRecord>, StoreError> {
        reads::list_chats(&self.pool, StoreError::from, user_id, limit, cursor).await
    }

    async fn list_messages(
        &self,
        chat_id: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        reads::list_messages(&self.pool, StoreError::from, chat_id, after_seq, limit).await
    }

    async fn chat_history(
        &self,
        chat_id: &str,
        user_id: &str,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>)>, StoreError> {
        reads::chat_history(&self.pool, StoreError::from, chat_id, user_id, limit).await
    }

    async fn messages_before(
        &self,
        chat_id: &str,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        reads::messages_before(&self.pool, StoreError::from, chat_id, before_seq, limit).await
    }

    async fn message_seq(
        &self,
        chat_id: &str,
        message_id: &str,
    ) -> Result<Option<i64>, StoreError> {
        reads::message_seq(&self.pool, StoreError::from, chat_id, message_id).await
    }

    async fn search_chats(
        &self,
        user_id: &str,
        terms: &SearchTerms,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<Vec<SearchHit>, StoreError> {
        search::search_sqlite(&self.pool, user_id, terms, limit, cursor).await
    }

    async fn begin_turn(&self, turn: &NewTurn) -> Result<BegunTurn, StoreError> {
        let turn = turn.clone();
        self.writer
            .write(move |conn| writer::begin_turn(conn, &turn))
            .await
    }

    async fn finish_turn(&self, turn: FinishedTurn) -> Result<bool, StoreError> {
        self.writer
            .write(move |conn| writer::finish_turn(conn, &turn))
            .await
    }

    async fn save_partial(&self, partial: PartialAnswer) -> Result<bool, StoreError> {
        self.writer
            .write(move |conn| writer::save_partial(conn, &partial))
            .await
    }

    async fn delete_chat(&self, chat_id: &str, user_id: &str) -> Result<bool, StoreError> {
        let (chat_id, user_id) = (chat_id.to_owned(), user_id.to_owned());
        self.writer
            .write(move |conn| writer::delete_chat(conn, &chat_id, &user_id))
            .await
    }

    async fn rename_chat(
        &self,
        chat_id: &str,
        user_id: &str,
        title: &str,
    ) -> Result<bool, StoreError> {
        let (chat_id, user_id, title) = (chat_id.to_owned(), user_id.to_owned(), title.to_owned());
        self.writer
            .write(move |conn| writer::rename_chat(conn, &chat_id, &user_id, &title))
            .await
    }

    async fn rewind_chat(
        &self,
        chat_id: &str,
        user_id: &str,
        message_id: &str,
        keep_answer: bool,
    ) -> Result<(), StoreError> {
        let (chat_id, user_id) = (chat_id.to_owned(), user_id.to_owned());
        let message_id = message_id.to_owned();
        self.writer
            .write(move |conn| {
                writer::rewind_chat(conn, &chat_id, &user_id, &message_id, keep_answer)
            })
            .await
    }

    async fn answer_versions(
        &self,
        chat_id: &str,
        from_seq: i64,
        to_seq: i64,
    ) -> Result<Vec<AnswerVersion>, StoreError> {
        reads::answer_versions(&self.pool, StoreError::from, chat_id, from_seq, to_seq).await
    }

    async fn recover_abandoned_turns(&self) -> Result<u64, StoreError> {
        self.writer.write(writer::recover_abandoned_turns).await
    }

    async fn usage(
        &self,
        query: crate::store::UsageQuery<'_>,
    ) -> Result<Vec<crate::store::UsageRow>, StoreError> {
        crate::store::usage::usage_sqlite(&self.pool, query).await
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
