//! A new chat that starts with a history the client brought (the OpenAI and AI SDK protocols send
//! the whole conversation): the chat, its earlier messages and the turn in one transaction, so a
//! chat is never left with half its history. Rare next to plain starts, so not batched.

use sqlx::PgPool;

use super::{PostgresStore, batch::outcome, unavailable};
use crate::store::{NewTurn, QuotaKind, RESERVED_EVENT_IDS, StoreError, now_ms, rows::as_bigint};

impl PostgresStore {
    /// Begins `turn`, a new chat with earlier messages; its last event id before the answer.
    pub(super) async fn begin_seeded(&self, turn: &NewTurn) -> Result<i64, StoreError> {
        self.retrying(|pool| async move { begin_seeded(pool, turn).await })
            .await
    }
}

async fn begin_seeded(pool: PgPool, turn: &NewTurn) -> Result<i64, StoreError> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    // Repeatable like every begin: a turn whose commit's reply was lost is found, not redone.
    let begun: Option<(i64,)> = sqlx::query_as(
        "SELECT m.first_event_id - 1 FROM messages m JOIN chats c ON c.id = m.chat_id \
         WHERE m.id = $1 AND m.chat_id = $2 AND c.user_id = $3",
    )
    .bind(&turn.assistant_message_id)
    .bind(&turn.chat_id)
    .bind(&turn.user_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(unavailable)?;
    if let Some((last_event_id,)) = begun {
        return Ok(last_event_id);
    }
    // The usage row's lock, as `mangoo_begin_turn` takes it: the quotas stay exact under
    // concurrent turns of the user. The function's own checks (bytes, turns) run after the
    // history is written, so they count it.
    sqlx::query("INSERT INTO user_usage (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING")
        .bind(&turn.user_id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    let (chats,): (i64,) =
        sqlx::query_as("SELECT chats FROM user_usage WHERE user_id = $1 FOR UPDATE")
            .bind(&turn.user_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
    if chats >= as_bigint(turn.quota.max_chats) {
        return Err(StoreError::QuotaExceeded(QuotaKind::Chats));
    }
    let now = now_ms();
    let created = sqlx::query(
        "INSERT INTO chats (id, user_id, bot_id, title, created_at, updated_at, last_event_id) \
         VALUES ($1, $2, $3, $4, $5, $5, 0) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&turn.chat_id)
    .bind(&turn.user_id)
    .bind(&turn.bot_id)
    .bind(turn.title())
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    // The id is taken: somebody else's chat.
    if created.rows_affected() == 0 {
        return Err(StoreError::ChatNotFound);
    }
    let earlier = turn.stored_earlier();
    let ids: Vec<String> = (1..=earlier.len())
        .map(|seq| format!("{}-{seq}", turn.user_message_id))
        .collect();
    let roles: Vec<&str> = earlier.iter().map(|m| m.role.as_str()).collect();
    let texts: Vec<&str> = earlier.iter().map(|m| m.content.as_str()).collect();
    sqlx::query(
        "INSERT INTO messages (id, chat_id, seq, role, content, status, created_at) \
         SELECT id, $2, seq, role, content, 'complete', $3 \
         FROM unnest($1::text[], $4::text[], $5::text[]) WITH ORDINALITY AS e(id, role, content, seq)",
    )
    .bind(&ids)
    .bind(&turn.chat_id)
    .bind(now)
    .bind(&roles)
    .bind(&texts)
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    let begun = sqlx::query_as::<_, (i64,)>(
        "SELECT mangoo_begin_turn($1, $2, FALSE, $3, '', $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&turn.chat_id)
    .bind(&turn.user_id)
    .bind(&turn.bot_id)
    .bind(&turn.user_message_id)
    .bind(&turn.assistant_message_id)
    .bind(&turn.message)
    .bind(now)
    .bind(as_bigint(turn.quota.max_chats))
    .bind(as_bigint(turn.quota.max_bytes))
    .bind(as_bigint(turn.quota.max_turns))
    .bind(RESERVED_EVENT_IDS)
    .fetch_one(&mut *tx)
    .await;
    let (last_event_id,) = match begun {
        Ok(row) => row,
        Err(sqlx::Error::Database(db)) if db.code().is_some_and(|c| c.starts_with("MG")) => {
            let code = db.code().map(|c| c.into_owned());
            return outcome(None, code.as_deref());
        }
        Err(e) => return Err(unavailable(e)),
    };
    tx.commit().await.map_err(unavailable)?;
    Ok(last_event_id)
}
