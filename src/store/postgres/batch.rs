//! Turns that start together begin together: one call of `mangoo_begin_turns` (migration 0005)
//! for every start waiting, in one transaction. A burst of starts then costs a round trip and a
//! commit per batch, not per start, and a user's usage row — which every turn of that user
//! locks until its commit, to keep the quotas exact — is taken once per batch: a thousand turns
//! of one user no longer wait on a thousand commits one after another.
//!
//! There is no batching task: the caller that finds a batch slot free becomes the leader, takes
//! whatever is queued (its own turn included) and answers every turn it took. A lone start goes
//! straight through, so nothing waits for a batch to fill. A leader dropped mid-batch (its client
//! went away) drops the replies of the turns it took; their callers queue them again — safe,
//! since beginning a turn is repeatable (the function finds a turn it already wrote and returns
//! what it returned then).

use std::collections::VecDeque;
use std::sync::Mutex;

use sqlx::PgPool;
use tokio::sync::{Semaphore, oneshot};

use super::{PostgresStore, unavailable};
use crate::store::{NewTurn, QuotaKind, RESERVED_EVENT_IDS, StoreError, now_ms, rows::as_bigint};

/// Turns per call at most. Each runs in a PL/pgSQL block of its own (a subtransaction), and a
/// backend keeps 64 subtransactions in its shared cache before every snapshot gets slower.
const MAX_BATCH: usize = 32;
/// Batches in flight at once per instance: while one commits, the next gathers and runs.
const LEADERS: usize = 2;

type Reply = oneshot::Sender<Result<i64, StoreError>>;

pub(super) struct BeginQueue {
    waiting: Mutex<VecDeque<(NewTurn, Reply)>>,
    leaders: Semaphore,
}

impl Default for BeginQueue {
    fn default() -> Self {
        Self {
            waiting: Mutex::default(),
            leaders: Semaphore::new(LEADERS),
        }
    }
}

impl BeginQueue {
    fn push(&self, turn: NewTurn) -> oneshot::Receiver<Result<i64, StoreError>> {
        let (reply, answer) = oneshot::channel();
        self.lock().push_back((turn, reply));
        answer
    }

    fn take_batch(&self) -> Vec<(NewTurn, Reply)> {
        let mut waiting = self.lock();
        let n = waiting.len().min(MAX_BATCH);
        waiting.drain(..n).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(NewTurn, Reply)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PostgresStore {
    /// Begins `turn` in the next batch; its last event id before the answer.
    pub(super) async fn begin_in_batch(&self, turn: &NewTurn) -> Result<i64, StoreError> {
        let mut answer = self.begins.push(turn.clone());
        loop {
            tokio::select! {
                biased;
                replied = &mut answer => match replied {
                    Ok(result) => return result,
                    // Its leader was dropped mid-batch: queued again, repeatable.
                    Err(_) => answer = self.begins.push(turn.clone()),
                },
                permit = self.begins.leaders.acquire() => {
                    let permit = permit.map_err(|_| StoreError::Closed)?;
                    let batch = self.begins.take_batch();
                    if !batch.is_empty() {
                        self.run_batch(batch).await;
                        continue;
                    }
                    // Nothing queued: this turn is in a batch the other leader runs, and its
                    // reply is all there is to wait for (a free slot would be taken again and
                    // again, a busy loop, until that batch is done).
                    drop(permit);
                    match (&mut answer).await {
                        Ok(result) => return result,
                        Err(_) => answer = self.begins.push(turn.clone()),
                    }
                }
            }
        }
    }

    async fn run_batch(&self, batch: Vec<(NewTurn, Reply)>) {
        let (turns, replies): (Vec<NewTurn>, Vec<Reply>) = batch.into_iter().unzip();
        let columns = Columns::of(&turns);
        let columns = &columns;
        let rows = self
            .retrying(|pool| async move { columns.begin(pool).await })
            .await;
        match rows {
            Ok(rows) if rows.len() == replies.len() => {
                for ((last_event_id, refusal), reply) in rows.into_iter().zip(replies) {
                    let _ = reply.send(outcome(last_event_id, refusal.as_deref()));
                }
            }
            Ok(rows) => {
                let cause = format!("{} turns begun, {} answers", replies.len(), rows.len());
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Corrupt(cause.clone())));
                }
            }
            Err(e) => {
                // One error for every turn of the batch; the store's errors are not Clone.
                let transient = e.is_transient();
                let cause = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(match transient {
                        true => StoreError::Unavailable(cause.clone()),
                        false => StoreError::Write(cause.clone()),
                    }));
                }
            }
        }
    }
}

/// The batch as the function's array arguments, one element per turn.
struct Columns {
    chat: Vec<String>,
    user: Vec<String>,
    new_chat: Vec<bool>,
    bot: Vec<String>,
    title: Vec<String>,
    user_message: Vec<String>,
    answer: Vec<String>,
    message: Vec<String>,
    max_chats: Vec<i64>,
    max_bytes: Vec<i64>,
    max_turns: Vec<i64>,
}

impl Columns {
    fn of(turns: &[NewTurn]) -> Self {
        let each = |f: fn(&NewTurn) -> String| turns.iter().map(f).collect();
        let quota = |f: fn(&NewTurn) -> u64| turns.iter().map(|t| as_bigint(f(t))).collect();
        Self {
            chat: each(|t| t.chat_id.clone()),
            user: each(|t| t.user_id.clone()),
            new_chat: turns.iter().map(|t| t.new_chat).collect(),
            bot: each(|t| t.bot_id.clone()),
            title: each(NewTurn::title),
            user_message: each(|t| t.user_message_id.clone()),
            answer: each(|t| t.assistant_message_id.clone()),
            message: each(|t| t.message.clone()),
            max_chats: quota(|t| t.quota.max_chats),
            max_bytes: quota(|t| t.quota.max_bytes),
            max_turns: quota(|t| t.quota.max_turns),
        }
    }

    async fn begin(&self, pool: PgPool) -> Result<Vec<(Option<i64>, Option<String>)>, StoreError> {
        sqlx::query_as(
            "SELECT o_last_event_id, o_refusal FROM mangoo_begin_turns($1, $2, $3, $4, $5, $6, \
             $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&self.chat)
        .bind(&self.user)
        .bind(&self.new_chat)
        .bind(&self.bot)
        .bind(&self.title)
        .bind(&self.user_message)
        .bind(&self.answer)
        .bind(&self.message)
        .bind(now_ms())
        .bind(&self.max_chats)
        .bind(&self.max_bytes)
        .bind(&self.max_turns)
        .bind(RESERVED_EVENT_IDS)
        .fetch_all(&pool)
        .await
        .map_err(unavailable)
    }
}

/// A turn's row of the function's answer: its last event id, or the SQLSTATE it was refused
/// with (the codes `mangoo_begin_turn` raises).
pub(super) fn outcome(
    last_event_id: Option<i64>,
    refusal: Option<&str>,
) -> Result<i64, StoreError> {
    match (refusal, last_event_id) {
        (None, Some(id)) => Ok(id),
        (Some("MG001"), _) => Err(StoreError::ChatNotFound),
        (Some("MG002"), _) => Err(StoreError::ChatBusy),
        (Some("MG003"), _) => Err(StoreError::QuotaExceeded(QuotaKind::Chats)),
        (Some("MG004"), _) => Err(StoreError::QuotaExceeded(QuotaKind::Bytes)),
        (Some("MG005"), _) => Err(StoreError::QuotaExceeded(QuotaKind::Turns)),
        // Two instances creating the same chat id: it is somebody else's now.
        (Some("23505"), _) => Err(StoreError::ChatNotFound),
        (refusal, id) => Err(StoreError::Corrupt(format!(
            "a turn begun as {id:?} refused with {refusal:?}"
        ))),
    }
}
