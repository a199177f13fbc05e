//! Answers whose producer is gone, with shared state: an instance died (or stalled past its
//! lease) mid-answer. Whoever notices first — a client following the answer, a stop request, a
//! new turn in the chat, or the periodic sweep — takes the answer over (once: the take-over is
//! atomic in the shared log and bumps the fence, so the old producer can write nothing more) and
//! concludes it: storage gets exactly the text of the events that were logged, as `interrupted`;
//! the log gets one retryable `answer_interrupted` after them, which every listener reads; the
//! chat takes a new turn.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{ChatError, EventStream, replay};
use crate::domain::Role;
use crate::events::{EventKind, StreamEvent, StreamFailure};
use crate::store::{ChatStore, FinishedTurn, MessageStatus};
use crate::stream_log::{EventLog, Orphan};

/// A follower that hears nothing for this long asks whether the answer's producer is still there.
const WATCH: Duration = Duration::from_secs(3);
/// How often each instance sweeps for answers whose leases lapsed with nobody watching.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// A follower whose stream ends without a terminal event looks for the answer again this many
/// times (it may have been taken over) before turning to storage.
const REFOLLOWS: usize = 3;

/// An answer whose producer is gone, as stored: `interrupted` with `chunks`, and the failure its
/// listeners are told.
fn interrupted(
    chat_id: &str,
    message_id: &str,
    chunks: Vec<Arc<str>>,
    terminal_id: i64,
) -> (FinishedTurn, StreamFailure) {
    let failure = StreamFailure::new(
        "the answer was interrupted: the server generating it stopped",
        "answer_interrupted",
        true,
    );
    let mut record = FinishedTurn::failed(chat_id, message_id, chunks, &failure, terminal_id);
    record.status = MessageStatus::Interrupted;
    (record, failure)
}

#[derive(Clone)]
pub(super) struct Recovery {
    pub store: Arc<dyn ChatStore>,
    pub log: Arc<dyn EventLog>,
}

impl Recovery {
    /// Concludes the chat's answer if its producer's lease has lapsed; true if this call did.
    pub async fn conclude_if_orphaned(&self, chat_id: &str) -> Result<bool, ChatError> {
        let Some(orphan) = self.log.take_over(chat_id).await? else {
            return Ok(false);
        };
        tracing::warn!(chat_id, message_id = %orphan.message_id, "concluding an answer whose producer is gone");
        // Its producer logged its end, then died: the answer is stored, and its end stands.
        let terminal = match orphan.events.iter().any(|e| e.kind.is_terminal()) {
            true => None,
            false => Some(self.terminal_for(chat_id, &orphan).await?),
        };
        self.log.conclude(chat_id, orphan.claim, terminal).await?;
        Ok(true)
    }

    /// The terminal event an orphan without one gets: `answer_interrupted`, after storing what
    /// was logged — unless the producer stored its outcome just before it was taken over, which
    /// then stands.
    async fn terminal_for(&self, chat_id: &str, orphan: &Orphan) -> Result<StreamEvent, ChatError> {
        let chunks: Vec<Arc<str>> = orphan
            .events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Content(text) => Some(text.clone()),
                _ => None,
            })
            .collect();
        let last_id = orphan.events.last().map_or(orphan.first_id, |e| e.id);
        let terminal_id = last_id.max(orphan.first_id) + 1;
        let (record, failure) = interrupted(chat_id, &orphan.message_id, chunks, terminal_id);
        if self.store.finish_turn(record).await? {
            return Ok(StreamEvent {
                id: terminal_id,
                kind: EventKind::Error(failure),
            });
        }
        let messages = self.store.recent_messages(chat_id, 2).await?;
        let stored = messages.iter().find(|m| m.id == orphan.message_id);
        Ok(match stored {
            Some(answer) => StreamEvent {
                id: answer
                    .replay
                    .as_ref()
                    .map_or(terminal_id, |r| r.terminal_event_id()),
                kind: replay::terminal(chat_id, answer),
            },
            // Deleted meanwhile.
            None => StreamEvent {
                id: terminal_id,
                kind: EventKind::Error(StreamFailure::new(
                    "the chat was deleted",
                    "chat_deleted",
                    false,
                )),
            },
        })
    }

    /// A chat whose stored answer still streams although the shared state knows no producer
    /// (Redis lost it): with the chat claimed by the caller, the answer is stored as interrupted
    /// with the text it saved, its ids past every id it reserved.
    pub async fn conclude_stored(&self, chat_id: &str) -> Result<bool, ChatError> {
        let messages = self.store.recent_messages(chat_id, 2).await?;
        let Some(answer) = messages
            .iter()
            .find(|m| m.role == Role::Assistant && m.status == MessageStatus::Streaming)
        else {
            return Ok(false);
        };
        let replay = answer.replay.clone().unwrap_or_default();
        let chunks = replay
            .chunks
            .iter()
            .map(|c| Arc::from(c.as_str()))
            .collect();
        let (record, _) = interrupted(chat_id, &answer.id, chunks, replay.terminal_event_id());
        Ok(self.store.finish_turn(record).await?)
    }

    /// Follows an answer that may be generated elsewhere, to exactly one terminal event: when it
    /// is quiet, checks its producer is alive (concluding it if not); when its stream ends early
    /// (the answer was taken over or stored meanwhile), picks it up again, from the log or from
    /// storage, after the last id sent.
    pub fn watch(self, chat_id: String, after_id: i64, events: EventStream) -> EventStream {
        Box::pin(async_stream::stream! {
            let mut cursor = after_id;
            let mut events = events;
            let mut refollows = 0;
            // One timer for the whole stream, pushed back by every event: this runs per token.
            let quiet = tokio::time::sleep(WATCH);
            tokio::pin!(quiet);
            loop {
                tokio::select! {
                    biased;
                    next = events.next() => match next {
                        Some(event) => {
                            quiet.as_mut().reset(tokio::time::Instant::now() + WATCH);
                            cursor = event.id;
                            let terminal = event.kind.is_terminal();
                            yield event;
                            if terminal {
                                return;
                            }
                        }
                        None => {
                            refollows += 1;
                            if refollows <= REFOLLOWS
                                && let Ok(Some(again)) = self.log.follow(&chat_id, cursor).await
                            {
                                events = again;
                                continue;
                            }
                            for event in self.stored_after(&chat_id, cursor).await {
                                yield event;
                            }
                            return;
                        }
                    },
                    () = &mut quiet => {
                        quiet.as_mut().reset(tokio::time::Instant::now() + WATCH);
                        if let Err(e) = self.conclude_if_orphaned(&chat_id).await {
                            tracing::warn!(chat_id = %chat_id, "could not check a quiet answer's producer: {e}");
                        }
                    }
                }
            }
        })
    }

    /// The stored answer's events after `cursor`, ending with its terminal; if storage has no
    /// ending to give, one retryable error (with the cursor's id, so a reconnection resumes there).
    async fn stored_after(&self, chat_id: &str, cursor: i64) -> Vec<StreamEvent> {
        let stored = self.store.recent_messages(chat_id, 2).await;
        let latest = stored
            .ok()
            .and_then(|m| m.into_iter().rev().find(|m| m.role == Role::Assistant));
        let events = match &latest {
            Some(answer) if answer.status != MessageStatus::Streaming => {
                replay::events_after(chat_id, answer, cursor)
            }
            _ => Vec::new(),
        };
        if events.last().is_some_and(|e| e.kind.is_terminal()) {
            return events;
        }
        vec![StreamEvent {
            id: cursor,
            kind: EventKind::Error(StreamFailure::new(
                "the answer cannot be followed right now; reconnect to resume",
                "service_unavailable",
                true,
            )),
        }]
    }

    /// Concludes the answers whose leases lapsed with nobody following them, until `stop`.
    pub async fn sweep(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let lapsed = match self.log.lapsed().await {
                Ok(lapsed) => lapsed,
                Err(e) => {
                    tracing::debug!("sweep skipped: {e}");
                    continue;
                }
            };
            for chat_id in lapsed {
                if let Err(e) = self.conclude_if_orphaned(&chat_id).await {
                    tracing::warn!(chat_id, "could not conclude an abandoned answer: {e}");
                }
            }
        }
    }
}
