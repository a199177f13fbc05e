//! Every write to the SQLite database goes through one thread that owns the only writing
//! connection, and commits the writes that queued up meanwhile together (group commit).
//!
//! Why: SQLite lets one writer in at a time anyway. Through sqlx every statement is a hand-off to
//! a per-connection thread and back (two context switches), writers racing on separate
//! connections sleep in SQLite's busy handler, and every turn's commit appends its own copies of
//! the same few pages to the WAL. A stream start was two such transactions. Here a lone write
//! commits at once (nothing waits to gather a batch); under load, the turns that arrive while a
//! commit runs share the next one. Each write runs inside its own savepoint, so one that fails
//! (a chat that is not the caller's, one that is busy) leaves no trace and does not affect the
//! others in its batch. Callers get their answer only after the commit: a write they were told
//! about is durable (to `synchronous = NORMAL`) and visible to every reader.

use std::path::Path;
use std::sync::Mutex;
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::store::rows::{DROP_VERSIONS, KEEP_ANSWER, TRIM_VERSIONS};
use crate::store::{
    BegunTurn, FinishedTurn, MAX_ANSWER_VERSIONS, NewTurn, PartialAnswer, QuotaKind,
    RESERVED_EVENT_IDS, StoreError, now_ms,
};

/// Writes waiting for the writer; senders wait when it is full.
const QUEUE: usize = 1024;
/// At most this many writes share one transaction, so the first of them is not held up long.
const MAX_BATCH: usize = 256;

/// One queued write: run against the connection (or told why it could not run), it becomes an
/// outcome that is answered once the batch's fate is known.
type Job = Box<dyn FnOnce(Result<&Connection, StoreError>) -> Box<dyn Outcome> + Send>;

/// A write's result, held until the batch is committed.
trait Outcome {
    fn failed(&self) -> bool;
    /// The transaction did not commit: what looked done is not.
    fn commit_failed(&mut self, message: &str);
    /// A caller that stopped waiting (its request was dropped) is no error.
    fn reply(self: Box<Self>);
}

struct Pending<T> {
    result: Result<T, StoreError>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T> Outcome for Pending<T> {
    fn failed(&self) -> bool {
        self.result.is_err()
    }

    fn commit_failed(&mut self, message: &str) {
        if self.result.is_ok() {
            self.result = Err(StoreError::Write(format!("commit failed: {message}")));
        }
    }

    fn reply(self: Box<Self>) {
        let _ = self.reply.send(self.result);
    }
}

/// The handle to the writer thread. Dropping it (or [`Writer::close`]) lets the thread finish
/// what is queued and exit.
pub(super) struct Writer {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Opens the writing connection (the database exists and is migrated by now) and starts the
    /// thread.
    pub(super) fn start(filename: &Path, in_memory: bool) -> Result<Self, StoreError> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if in_memory {
            flags |= OpenFlags::SQLITE_OPEN_MEMORY | OpenFlags::SQLITE_OPEN_SHARED_CACHE;
        }
        let conn = Connection::open_with_flags(filename, flags)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // temp_store: each write's savepoint journals the pages it touches; in memory that is a
        // copy, on disk a pwrite per page.
        conn.execute_batch(
            "PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY;",
        )?;
        conn.set_prepared_statement_cache_capacity(32);
        let (queue, jobs) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(conn, jobs))
            .map_err(|e| StoreError::Write(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            queue: Mutex::new(Some(queue)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a write (run on the writer thread, inside its own savepoint) and waits for its
    /// outcome, which is known only once its batch has committed.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let queue = self.queue.lock().expect("not poisoned").clone();
        let queue = queue.ok_or(StoreError::Closed)?;
        let (reply, outcome) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = conn.and_then(write);
            Box::new(Pending { result, reply })
        });
        queue.send(job).await.map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }

    /// Refuses new writes, lets the queued ones commit and waits for the thread to end.
    pub(super) async fn close(&self) {
        self.queue.lock().expect("not poisoned").take();
        let thread = self.thread.lock().expect("not poisoned").take();
        if let Some(thread) = thread {
            // Joining blocks; the thread has at most one batch left to commit.
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the SQLite writer thread ended abnormally");
            }
        }
    }
}

fn run(conn: Connection, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit(&conn, &mut batch);
    }
}

/// Runs the batch in one transaction and answers every write in it.
fn commit(conn: &Connection, batch: &mut Vec<Job>) {
    let opened = conn.execute_batch("BEGIN IMMEDIATE");
    let mut outcomes: Vec<Box<dyn Outcome>> = batch
        .drain(..)
        .map(|job| match &opened {
            Ok(()) => in_savepoint(conn, job),
            Err(e) => job(Err(StoreError::Write(e.to_string()))),
        })
        .collect();
    if opened.is_ok()
        && let Err(e) = conn.execute_batch("COMMIT")
    {
        let _ = conn.execute_batch("ROLLBACK");
        let message = e.to_string();
        for outcome in &mut outcomes {
            outcome.commit_failed(&message);
        }
    }
    for outcome in outcomes {
        outcome.reply();
    }
}

/// One write inside its own savepoint: rolled back alone when it fails.
fn in_savepoint(conn: &Connection, job: Job) -> Box<dyn Outcome> {
    if let Err(e) = conn.execute_batch("SAVEPOINT one_write") {
        return job(Err(e.into()));
    }
    let outcome = job(Ok(conn));
    let undo = if outcome.failed() {
        "ROLLBACK TO one_write; RELEASE one_write"
    } else {
        "RELEASE one_write"
    };
    if let Err(e) = conn.execute_batch(undo) {
        tracing::error!("SQLite savepoint: {e}");
    }
    outcome
}

/// Refuses a turn that would take its user past the quota; read in the transaction that writes
/// the turn (one writer thread), so concurrent turns cannot both slip under it.
fn check_quota(conn: &Connection, turn: &NewTurn) -> Result<(), StoreError> {
    let (chats, bytes): (i64, i64) = conn
        .prepare_cached("SELECT chats, bytes FROM user_usage WHERE user_id = ?1")?
        .query_row(params![turn.user_id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?
        .unwrap_or((0, 0));
    let quota = &turn.quota;
    if turn.new_chat && chats.max(0) as u64 >= quota.max_chats {
        return Err(StoreError::QuotaExceeded(QuotaKind::Chats));
    }
    if (bytes.max(0) as u64).saturating_add(turn.bytes()) > quota.max_bytes {
        return Err(StoreError::QuotaExceeded(QuotaKind::Bytes));
    }
    Ok(())
}

/// The per-chat half of the quota, for a chat already known to be the user's.
fn check_turns(conn: &Connection, turn: &NewTurn) -> Result<(), StoreError> {
    // Two messages per turn; seq counts them.
    let messages: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE chat_id = ?1")?
        .query_row(params![turn.chat_id], |row| row.get(0))?;
    if (messages.max(0) as u64) / 2 >= turn.quota.max_turns {
        return Err(StoreError::QuotaExceeded(QuotaKind::Turns));
    }
    Ok(())
}

/// A new chat's history, before its first question: complete messages, seq 1 onwards.
fn store_earlier(conn: &Connection, turn: &NewTurn, now: i64) -> Result<(), StoreError> {
    let earlier = turn.stored_earlier();
    if (earlier.len() as u64) / 2 >= turn.quota.max_turns {
        return Err(StoreError::QuotaExceeded(QuotaKind::Turns));
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO messages (id, chat_id, seq, role, content, status, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, 'complete', ?6)",
    )?;
    for (seq, message) in (1_i64..).zip(earlier) {
        let id = format!("{}-{seq}", turn.user_message_id);
        insert.execute(params![
            id,
            turn.chat_id,
            seq,
            message.role.as_str(),
            message.content,
            now
        ])?;
    }
    Ok(())
}

pub(super) fn begin_turn(conn: &Connection, turn: &NewTurn) -> Result<BegunTurn, StoreError> {
    // Repeatable, as on PostgreSQL: the same turn asked for again is the one already begun.
    let begun: Option<i64> = conn
        .prepare_cached(
            "SELECT m.first_event_id - 1 FROM messages m JOIN chats c ON c.id = m.chat_id \
             WHERE m.id = ?1 AND m.chat_id = ?2 AND c.user_id = ?3",
        )?
        .query_row(
            params![turn.assistant_message_id, turn.chat_id, turn.user_id],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(last_event_id) = begun {
        return Ok(BegunTurn { last_event_id });
    }
    check_quota(conn, turn)?;
    let now = now_ms();
    let last_event_id: i64 = if turn.new_chat {
        let created = conn
            .prepare_cached(
                "INSERT INTO chats (id, user_id, bot_id, title, created_at, updated_at, \
                 last_event_id) VALUES (?1, ?2, ?3, ?4, ?5, ?5, 0) ON CONFLICT (id) DO NOTHING",
            )?
            .execute(params![
                turn.chat_id,
                turn.user_id,
                turn.bot_id,
                turn.title(),
                now
            ])?;
        // The id is taken: somebody else's chat, as on PostgreSQL.
        if created == 0 {
            return Err(StoreError::ChatNotFound);
        }
        store_earlier(conn, turn, now)?;
        0
    } else {
        let owned = conn
            .prepare_cached(
                "UPDATE chats SET updated_at = ?3 WHERE id = ?1 AND user_id = ?2 \
                 RETURNING last_event_id",
            )?
            .query_row(params![turn.chat_id, turn.user_id, now], |row| row.get(0))
            .optional()?;
        let last_event_id = owned.ok_or(StoreError::ChatNotFound)?;
        // A chat created just now can have no answer in progress.
        let busy = conn
            .prepare_cached("SELECT 1 FROM messages WHERE chat_id = ?1 AND status = 'streaming'")?
            .exists(params![turn.chat_id])?;
        if busy {
            return Err(StoreError::ChatBusy);
        }
        check_turns(conn, turn)?;
        last_event_id
    };
    conn.prepare_cached(
        "INSERT INTO messages (id, chat_id, seq, role, content, status, created_at, \
         first_event_id, last_event_id) \
         SELECT ?1, ?3, base + 1, 'user', ?4, 'complete', ?5, NULL, NULL FROM \
           (SELECT COALESCE(MAX(seq), 0) AS base FROM messages WHERE chat_id = ?3) \
         UNION ALL \
         SELECT ?2, ?3, base + 2, 'assistant', '', 'streaming', ?5, ?6, ?7 FROM \
           (SELECT COALESCE(MAX(seq), 0) AS base FROM messages WHERE chat_id = ?3)",
    )?
    .execute(params![
        turn.user_message_id,
        turn.assistant_message_id,
        turn.chat_id,
        turn.message,
        now,
        last_event_id + 1,
        last_event_id + RESERVED_EVENT_IDS
    ])?;
    Ok(BegunTurn { last_event_id })
}

pub(super) fn finish_turn(conn: &Connection, turn: &FinishedTurn) -> Result<bool, StoreError> {
    let chunks = serde_json::to_string(&turn.chunks).expect("strings serialise");
    let updated = conn
        .prepare_cached(
            "UPDATE messages SET content = ?2, status = ?3, error_code = ?4, input_tokens = ?5, \
             output_tokens = ?6, chunks = ?7, error_message = ?8, error_retryable = ?9, \
             provider = ?10, model = ?11, last_event_id = ?12 \
             WHERE id = ?1 AND (status = 'streaming' OR (status = ?3 AND last_event_id = ?12 \
               AND content = ?2))",
        )?
        .execute(params![
            turn.assistant_message_id,
            turn.content,
            turn.status.as_str(),
            turn.error_code,
            turn.usage.map(|u| u.input_tokens as i64),
            turn.usage.map(|u| u.output_tokens as i64),
            chunks,
            turn.error_message,
            turn.error_retryable,
            turn.provider,
            turn.model,
            turn.last_event_id
        ])?;
    if updated == 0 {
        return Ok(false);
    }
    let now = now_ms();
    conn.prepare_cached(
        "UPDATE chats SET last_event_id = MAX(last_event_id, ?2), updated_at = ?3 WHERE id = ?1",
    )?
    .execute(params![turn.chat_id, turn.last_event_id, now])?;
    record_usage(conn, turn, now)?;
    Ok(true)
}

/// The turn's row of the usage ledger, once (a repeated conclusion finds it there).
fn record_usage(conn: &Connection, turn: &FinishedTurn, now: i64) -> Result<(), StoreError> {
    let (usage, reported) = turn.ledger_usage();
    let millis = |ms: Option<u64>| ms.map(|ms| ms.min(i64::MAX as u64) as i64);
    conn.prepare_cached(
        "INSERT INTO usage_ledger (message_id, user_id, chat_id, bot_id, provider, model, status, \
           input_tokens, output_tokens, reported, first_token_ms, duration_ms, ended_at) \
         SELECT ?1, c.user_id, c.id, c.bot_id, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11 \
         FROM chats c WHERE c.id = ?2 ON CONFLICT (message_id) DO NOTHING",
    )?
    .execute(params![
        turn.assistant_message_id,
        turn.chat_id,
        turn.provider,
        turn.model,
        turn.status.as_str(),
        usage.input_tokens.min(i64::MAX as u64) as i64,
        usage.output_tokens.min(i64::MAX as u64) as i64,
        reported,
        millis(turn.measures.first_token_ms),
        millis(turn.measures.duration_ms),
        now
    ])?;
    Ok(())
}

pub(super) fn save_partial(conn: &Connection, partial: &PartialAnswer) -> Result<bool, StoreError> {
    let chunks = serde_json::to_string(&partial.chunks).expect("strings serialise");
    let updated = conn
        .prepare_cached(
            "UPDATE messages SET content = ?2, chunks = ?3, last_event_id = ?4 \
             WHERE id = ?1 AND status = 'streaming'",
        )?
        .execute(params![
            partial.assistant_message_id,
            partial.chunks.concat(),
            chunks,
            partial.reserved_event_id
        ])?;
    Ok(updated > 0)
}

pub(super) fn delete_chat(
    conn: &Connection,
    chat_id: &str,
    user_id: &str,
) -> Result<bool, StoreError> {
    let deleted = conn
        .prepare_cached("DELETE FROM chats WHERE id = ?1 AND user_id = ?2")?
        .execute(params![chat_id, user_id])?;
    Ok(deleted > 0)
}

pub(super) fn rename_chat(
    conn: &Connection,
    chat_id: &str,
    user_id: &str,
    title: &str,
) -> Result<bool, StoreError> {
    let renamed = conn
        .prepare_cached("UPDATE chats SET title = ?3 WHERE id = ?1 AND user_id = ?2")?
        .execute(params![chat_id, user_id, title])?;
    Ok(renamed > 0)
}

/// The one writer runs this alone: no turn can begin between the checks and the delete.
pub(super) fn rewind_chat(
    conn: &Connection,
    chat_id: &str,
    user_id: &str,
    message_id: &str,
    keep_answer: bool,
) -> Result<(), StoreError> {
    let owned = conn
        .prepare_cached("SELECT 1 FROM chats WHERE id = ?1 AND user_id = ?2")?
        .exists(params![chat_id, user_id])?;
    if !owned {
        return Err(StoreError::ChatNotFound);
    }
    let seq: i64 = conn
        .prepare_cached("SELECT seq FROM messages WHERE id = ?1 AND chat_id = ?2")?
        .query_row(params![message_id, chat_id], |row| row.get(0))
        .optional()?
        .ok_or(StoreError::MessageNotFound)?;
    let busy = conn
        .prepare_cached("SELECT 1 FROM messages WHERE chat_id = ?1 AND status = 'streaming'")?
        .exists(params![chat_id])?;
    if busy {
        return Err(StoreError::ChatBusy);
    }
    let now = now_ms();
    // The statements are PostgreSQL's too; `?N` binds by number here whatever the order.
    let sql = |shared: &str| shared.replace('$', "?");
    if keep_answer {
        conn.prepare_cached(&sql(DROP_VERSIONS))?
            .execute(params![chat_id, seq + 2])?;
        conn.prepare_cached(&sql(KEEP_ANSWER))?
            .execute(params![chat_id, seq + 1, now])?;
        conn.prepare_cached(&sql(TRIM_VERSIONS))?.execute(params![
            chat_id,
            seq + 1,
            MAX_ANSWER_VERSIONS
        ])?;
    } else {
        conn.prepare_cached(&sql(DROP_VERSIONS))?
            .execute(params![chat_id, seq])?;
    }
    conn.prepare_cached("DELETE FROM messages WHERE chat_id = ?1 AND seq >= ?2")?
        .execute(params![chat_id, seq])?;
    conn.prepare_cached("UPDATE chats SET updated_at = ?2 WHERE id = ?1")?
        .execute(params![chat_id, now])?;
    Ok(())
}

/// Each abandoned answer keeps the text it saved; its terminal event's id comes after every id it
/// may have sent (its reservation) and the chat's next turn continues after that.
pub(super) fn recover_abandoned_turns(conn: &Connection) -> Result<u64, StoreError> {
    // Their ledger rows first, while they are still the streaming ones: what they streamed,
    // counted (the provider's report, if any, died with the process).
    conn.prepare_cached(
        "INSERT INTO usage_ledger (message_id, user_id, chat_id, bot_id, provider, model, status, \
           input_tokens, output_tokens, reported, ended_at) \
         SELECT m.id, c.user_id, c.id, c.bot_id, m.provider, m.model, 'interrupted', 0, \
           json_array_length(COALESCE(m.chunks, '[]')), 0, ?1 \
         FROM messages m JOIN chats c ON c.id = m.chat_id WHERE m.status = 'streaming' \
         ON CONFLICT (message_id) DO NOTHING",
    )?
    .execute(params![now_ms()])?;
    let recovered = conn
        .prepare_cached(
            "UPDATE messages SET status = 'interrupted', error_code = 'server_restarted', \
         error_message = 'the server restarted before the answer was finished', \
         error_retryable = 1, last_event_id = MAX(COALESCE(last_event_id, 0), \
           COALESCE(first_event_id, 0) + json_array_length(COALESCE(chunks, '[]'))) + 1 \
         WHERE status = 'streaming'",
        )?
        .execute([])?;
    // Only the chats whose answers were just recovered: their new terminal ids are the largest.
    conn.prepare_cached(
        "UPDATE chats SET last_event_id = MAX(last_event_id, \
               (SELECT MAX(m.last_event_id) FROM messages m WHERE m.chat_id = chats.id)) \
             WHERE id IN (SELECT chat_id FROM messages WHERE error_code = 'server_restarted' \
               AND last_event_id > (SELECT c.last_event_id FROM chats c WHERE c.id = chat_id))",
    )?
    .execute([])?;
    Ok(recovered as u64)
}
