//! PostgreSQL implementation of [`ChatStore`], for many instances sharing one database.
//!
//! Each half of a turn is one round trip: `begin_turn` calls `mangoo_begin_turn` (a function in
//! the schema that checks ownership, the streaming answer and the quotas under row locks and
//! writes both messages) for every turn starting at that moment, in one transaction
//! ([`batch`]); `finish_turn` is one statement. A stream start is therefore two round trips for
//! an existing chat ([`ChatStore::chat_history`], then the function) and one for a new one.
//! Connections come from a bounded pool; running out of them is `Unavailable`, not a hang.
//!
//! Connections die: Aurora and RDS failovers, RDS Proxy and NAT idle timeouts, an operator's
//! `pg_terminate_backend`. The pool pings an idle connection before handing it out (a dead one is
//! replaced inside the same acquire), and a statement that fails because its connection broke is
//! run again on a fresh one within [`RETRY_BUDGET`]. Every statement is safe to repeat: reads,
//! and writes keyed by the ids the caller minted (a repeated `begin_turn` finds its own turn, a
//! repeated `finish_turn` finds the answer already as it would leave it).

mod batch;
mod seeded;

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::rows::{DROP_VERSIONS, KEEP_ANSWER, TRIM_VERSIONS, as_bigint, postgres_reads as reads};
use super::search;
use super::{
    AnswerVersion, BegunTurn, ChatCursor, ChatRecord, ChatStore, FinishedTurn, MAX_ANSWER_VERSIONS,
    MessageRecord, NewTurn, PartialAnswer, SearchHit, SearchTerms, StoreError, migrations, now_ms,
};
use crate::config::DatabaseConfig;

pub struct PostgresStore {
    pool: PgPool,
    /// Set once the schema is known to be current; until then every call first tries to migrate
    /// (one at a time), so a server that started while PostgreSQL was down catches up by itself.
    migrated: AtomicBool,
    migrating: tokio::sync::Mutex<()>,
    begins: batch::BeginQueue,
}

impl PostgresStore {
    /// Connects and migrates. Several instances may do this at once on a fresh database: the
    /// migrator's advisory lock lets one apply each migration while the others wait. A database
    /// that cannot be reached is no error here: the store connects and migrates when it can, and
    /// meanwhile answers `Unavailable` (readiness says so).
    pub async fn connect(config: &DatabaseConfig) -> Result<Self, StoreError> {
        let mut options = PgConnectOptions::from_str(&config.url)?.application_name("mangoo");
        if let Some(password) = &config.password {
            options = options.password(password.expose());
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(config.acquire_timeout_secs))
            // A ping at acquire (one round trip, noise next to a model's answer) replaces a
            // connection the server closed while it idled, instead of failing its next query.
            .test_before_acquire(true)
            .connect_lazy_with(options);
        let store = Self {
            pool,
            migrated: AtomicBool::new(false),
            migrating: tokio::sync::Mutex::new(()),
            begins: batch::BeginQueue::default(),
        };
        // A database that does not answer at once is not waited for here (the start must not
        // hang on it): the first request after it comes back migrates.
        let first_try = tokio::time::timeout(Duration::from_secs(2), store.ensure_migrated())
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("no answer within 2 s".into())));
        match first_try {
            Err(StoreError::Unavailable(e)) => {
                tracing::warn!(
                    "PostgreSQL is unreachable, serving without it until it is back: {e}"
                );
                Ok(store)
            }
            other => other.map(|()| store),
        }
    }

    async fn ensure_migrated(&self) -> Result<(), StoreError> {
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self.migrating.lock().await;
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        let migrator = migrations::migrator(migrations::POSTGRES).await?;
        match migrator.run(&self.pool).await {
            Ok(()) => {
                self.migrated.store(true, Ordering::Release);
                Ok(())
            }
            Err(sqlx::migrate::MigrateError::Execute(e)) => Err(unavailable(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// The pool, once the schema is current.
    async fn pool(&self) -> Result<&PgPool, StoreError> {
        self.ensure_migrated().await?;
        Ok(&self.pool)
    }

    /// Runs `statement` on the pool, again on a fresh connection while it fails because the
    /// database is away (a killed or reset connection, a server starting up), with short
    /// backoff, for at most [`RETRY_BUDGET`]. Refusals and data errors return at once.
    async fn retrying<T, F, Fut>(&self, statement: F) -> Result<T, StoreError>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let started = tokio::time::Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let result = match self.pool().await {
                Ok(pool) => tokio::time::timeout(STATEMENT_TIMEOUT, statement(pool.clone()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError::Unavailable(
                            "the database did not answer in time".into(),
                        ))
                    }),
                Err(e) => Err(e),
            };
            match result {
                Err(StoreError::Unavailable(cause))
                    if started.elapsed() + backoff < RETRY_BUDGET =>
                {
                    tracing::info!(
                        "database statement failed, trying again on a fresh connection: {cause}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff *= 3;
                }
                other => return other,
            }
        }
    }
}

/// How long one store call keeps trying through connection failures before it reports the
/// database unavailable (a 503 with `Retry-After` at a stream start): a killed connection or a
/// restarted server costs one retry; a failover longer than this is an outage.
const RETRY_BUDGET: Duration = Duration::from_secs(3);
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
/// A database that stopped answering without closing the connection (a black-holed route, a
/// NAT that dropped the flow) would hold a statement for the kernel's retransmission timeout,
/// many minutes. Every statement here is a few milliseconds; past this it counts as the
/// database away, and is run again like any connection failure (every write is repeatable).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connection-level failures are the database being away, not a fault in the data: the pool
/// (I/O, TLS, protocol, no connection in time) and the SQLSTATEs of a connection that is going
/// or gone — class 08 (connection exception), 57P01–57P03 (terminated by an administrator or a
/// shutdown, or the server is starting up), 53300 (too many connections), 25006 (a read-only
/// transaction: after a failover, a stale DNS answer led to the demoted primary), and 40P01 and
/// 40001 (a deadlock or serialization failure, which PostgreSQL resolves by aborting one side:
/// that side's statement is to be run again).
fn unavailable(e: sqlx::Error) -> StoreError {
    let connection_fault = match &e {
        sqlx::Error::PoolClosed => return StoreError::Closed,
        sqlx::Error::PoolTimedOut
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || matches!(
                    &*code,
                    "57P01" | "57P02" | "57P03" | "53300" | "25006" | "40P01" | "40001"
                )
        }),
        _ => false,
    };
    match connection_fault {
        true => StoreError::Unavailable(e.to_string()),
        false => StoreError::Database(e),
    }
}

#[async_trait::async_trait]
impl ChatStore for PostgresStore {
    async fn get_chat(&self, chat_id: &str) -> Result<Option<ChatRecord>, StoreError> {
        self.retrying(|pool| async move { reads::get_chat(&pool, unavailable, chat_id).await })
            .await
    }

    async fn list_chats(
        &self,
        user_id: &str,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<Vec<ChatRecord>, StoreError> {
        self.retrying(|pool| async move {
            reads::list_chats(&pool, unavailable, user_id, limit, cursor).await
        })
        .await
    }

    async fn list_messages(
        &self,
        chat_id: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        self.retrying(|pool| async move {
            reads::list_messages(&pool, unavailable, chat_id, after_seq, limit).await
        })
        .await
    }

    async fn chat_history(
        &self,
        chat_id: &str,
        user_id: &str,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>)>, StoreError> {
        self.retrying(|pool| async move {
            reads::chat_history(&pool, unavailable, chat_id, user_id, limit).await
        })
        .await
    }

    async fn messages_before(
        &self,
        chat_id: &str,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        self.retrying(|pool| async move {
            reads::messages_before(&pool, unavailable, chat_id, before_seq, limit).await
        })
        .await
    }

    async fn message_seq(
        &self,
        chat_id: &str,
        message_id: &str,
    ) -> Result<Option<i64>, StoreError> {
        self.retrying(|pool| async move {
            reads::message_seq(&pool, unavailable, chat_id, message_id).await
        })
        .await
    }

    async fn search_chats(
        &self,
        user_id: &str,
        terms: &SearchTerms,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<Vec<SearchHit>, StoreError> {
        self.retrying(|pool| async move {
            search::search_postgres(&pool, unavailable, user_id, terms, limit, cursor).await
        })
        .await
    }

    async fn begin_turn(&self, turn: &NewTurn) -> Result<BegunTurn, StoreError> {
        let last_event_id = match turn.stored_earlier().is_empty() {
            true => self.begin_in_batch(turn).await?,
            false => self.begin_seeded(turn).await?,
        };
        Ok(BegunTurn { last_event_id })
    }

    async fn finish_turn(&self, turn: FinishedTurn) -> Result<bool, StoreError> {
        let chunks = serde_json::to_string(&turn.chunks).expect("strings serialise");
        // One statement: the answer, then its chat's event ids, only if it was still streaming
        // — or is already exactly as this call leaves it (a repeat whose first reply was lost).
        let now = now_ms();
        let (ledger, reported) = turn.ledger_usage();
        let (turn, chunks) = (&turn, &chunks);
        let finish = |pool: PgPool| async move {
            sqlx::query(
                "WITH answer AS (UPDATE messages SET content = $2, status = $3, error_code = $4, \
               input_tokens = $5, output_tokens = $6, chunks = $7, error_message = $8, \
               error_retryable = $9, provider = $10, model = $11, last_event_id = $12 \
               WHERE id = $1 AND (status = 'streaming' OR (status = $3 AND last_event_id = $12 \
                 AND content = $2)) RETURNING chat_id), \
             ledger AS (INSERT INTO usage_ledger (message_id, user_id, chat_id, bot_id, provider, \
               model, status, input_tokens, output_tokens, reported, first_token_ms, \
               duration_ms, ended_at) \
               SELECT $1, c.user_id, c.id, c.bot_id, $10, $11, $3, $14, $15, $16, $17, $18, $13 \
               FROM answer a JOIN chats c ON c.id = a.chat_id \
               ON CONFLICT (message_id) DO NOTHING) \
             UPDATE chats SET last_event_id = GREATEST(last_event_id, $12), updated_at = $13 \
             WHERE id IN (SELECT chat_id FROM answer)",
            )
            .bind(&turn.assistant_message_id)
            .bind(&turn.content)
            .bind(turn.status.as_str())
            .bind(&turn.error_code)
            .bind(turn.usage.map(|u| as_bigint(u.input_tokens)))
            .bind(turn.usage.map(|u| as_bigint(u.output_tokens)))
            .bind(chunks)
            .bind(&turn.error_message)
            .bind(turn.error_retryable)
            .bind(&turn.provider)
            .bind(&turn.model)
            .bind(turn.last_event_id)
            .bind(now)
            .bind(as_bigint(ledger.input_tokens))
            .bind(as_bigint(ledger.output_tokens))
            .bind(reported)
            .bind(turn.measures.first_token_ms.map(as_bigint))
            .bind(turn.measures.duration_ms.map(as_bigint))
            .execute(&pool)
            .await
            .map_err(unavailable)
        };
        let applied = self.retrying(finish).await?;
        Ok(applied.rows_affected() > 0)
    }

    async fn save_partial(&self, partial: PartialAnswer) -> Result<bool, StoreError> {
        let chunks = serde_json::to_string(&partial.chunks).expect("strings serialise");
        let (partial, chunks) = (&partial, &chunks);
        let save = |pool: PgPool| async move {
            sqlx::query(
                "UPDATE messages SET content = $2, chunks = $3, last_event_id = $4 \
                 WHERE id = $1 AND status = 'streaming'",
            )
            .bind(&partial.assistant_message_id)
            .bind(partial.chunks.concat())
            .bind(chunks)
            .bind(partial.reserved_event_id)
            .execute(&pool)
            .await
            .map_err(unavailable)
        };
        let applied = self.retrying(save).await?;
        Ok(applied.rows_affected() > 0)
    }

    async fn delete_chat(&self, chat_id: &str, user_id: &str) -> Result<bool, StoreError> {
        let delete = |pool: PgPool| async move {
            sqlx::query("DELETE FROM chats WHERE id = $1 AND user_id = $2")
                .bind(chat_id)
                .bind(user_id)
                .execute(&pool)
                .await
                .map_err(unavailable)
        };
        let deleted = self.retrying(delete).await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn rename_chat(
        &self,
        chat_id: &str,
        user_id: &str,
        title: &str,
    ) -> Result<bool, StoreError> {
        let rename = |pool: PgPool| async move {
            sqlx::query("UPDATE chats SET title = $3 WHERE id = $1 AND user_id = $2")
                .bind(chat_id)
                .bind(user_id)
                .bind(title)
                .execute(&pool)
                .await
                .map_err(unavailable)
        };
        let renamed = self.retrying(rename).await?;
        Ok(renamed.rows_affected() > 0)
    }

    async fn rewind_chat(
        &self,
        chat_id: &str,
        user_id: &str,
        message_id: &str,
        keep_answer: bool,
    ) -> Result<(), StoreError> {
        self.retrying(|pool| async move {
            rewind(&pool, chat_id, user_id, message_id, keep_answer).await
        })
        .await
    }

    async fn answer_versions(
        &self,
        chat_id: &str,
        from_seq: i64,
        to_seq: i64,
    ) -> Result<Vec<AnswerVersion>, StoreError> {
        self.retrying(|pool| async move {
            reads::answer_versions(&pool, unavailable, chat_id, from_seq, to_seq).await
        })
        .await
    }

    async fn recover_abandoned_turns(&self) -> Result<u64, StoreError> {
        let recovered = self.retrying(|pool| async move {
            sqlx::query(RECOVER_ABANDONED)
                .execute(&pool)
                .await
                .map_err(unavailable)
        });
        Ok(recovered.await?.rows_affected())
    }

    async fn usage(
        &self,
        query: crate::store::UsageQuery<'_>,
    ) -> Result<Vec<crate::store::UsageRow>, StoreError> {
        self.retrying(|pool| async move {
            crate::store::usage::usage_postgres(&pool, unavailable, query).await
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(self.pool().await?)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// Marks every answer still streaming as interrupted, its terminal id past every id it reserved,
/// and records what each streamed in the usage ledger (counted: the provider's report died with
/// the process).
const RECOVER_ABANDONED: &str = "WITH recovered AS (UPDATE messages SET status = 'interrupted', \
       error_code = 'server_restarted', \
       error_message = 'the server restarted before the answer was finished', \
       error_retryable = TRUE, last_event_id = GREATEST(COALESCE(last_event_id, 0), \
         COALESCE(first_event_id, 0) + json_array_length(COALESCE(chunks, '[]')::json)) + 1 \
       WHERE status = 'streaming' RETURNING id, chat_id, last_event_id, provider, model, chunks), \
     ledger AS (INSERT INTO usage_ledger (message_id, user_id, chat_id, bot_id, provider, model, \
       status, input_tokens, output_tokens, reported, ended_at) \
       SELECT r.id, c.user_id, c.id, c.bot_id, r.provider, r.model, 'interrupted', 0, \
         json_array_length(COALESCE(r.chunks, '[]')::json), FALSE, \
         (extract(epoch FROM clock_timestamp()) * 1000)::bigint \
       FROM recovered r JOIN chats c ON c.id = r.chat_id ON CONFLICT (message_id) DO NOTHING) \
     UPDATE chats SET last_event_id = GREATEST(chats.last_event_id, r.last_event_id) \
     FROM recovered r WHERE chats.id = r.chat_id";

/// The chat's row lock first, in a statement of its own: `mangoo_begin_turn` takes it too, so
/// the checks that follow (each with a fresh snapshot) see any turn begun before it.
async fn rewind(
    pool: &PgPool,
    chat_id: &str,
    user_id: &str,
    message_id: &str,
    keep_answer: bool,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    let owned = sqlx::query("SELECT 1 FROM chats WHERE id = $1 AND user_id = $2 FOR UPDATE")
        .bind(chat_id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
    if owned.is_none() {
        return Err(StoreError::ChatNotFound);
    }
    let (seq, busy): (Option<i64>, bool) = sqlx::query_as(
        "SELECT (SELECT seq FROM messages WHERE id = $2 AND chat_id = $1), \
                    EXISTS (SELECT 1 FROM messages WHERE chat_id = $1 AND status = 'streaming')",
    )
    .bind(chat_id)
    .bind(message_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(unavailable)?;
    let seq = seq.ok_or(StoreError::MessageNotFound)?;
    if busy {
        return Err(StoreError::ChatBusy);
    }
    let now = now_ms();
    if keep_answer {
        let place = seq + 1;
        let steps = [
            sqlx::query(DROP_VERSIONS).bind(chat_id).bind(place + 1),
            sqlx::query(KEEP_ANSWER).bind(chat_id).bind(place).bind(now),
            sqlx::query(TRIM_VERSIONS)
                .bind(chat_id)
                .bind(place)
                .bind(MAX_ANSWER_VERSIONS),
        ];
        for step in steps {
            step.execute(&mut *tx).await.map_err(unavailable)?;
        }
    } else {
        sqlx::query(DROP_VERSIONS)
            .bind(chat_id)
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
    }
    sqlx::query("DELETE FROM messages WHERE chat_id = $1 AND seq >= $2")
        .bind(chat_id)
        .bind(seq)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    sqlx::query("UPDATE chats SET updated_at = $2 WHERE id = $1")
        .bind(chat_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    tx.commit().await.map_err(unavailable)
}
