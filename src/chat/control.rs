//! The answers being generated in this process, and how they are stopped from outside their
//! producer: the stop endpoint, a chat deletion, a shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::stream_log::Audience;

/// Why an answer was ended by something other than its provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// Every listener left and none came back within the grace period (under the "cancel"
    /// disconnect policy).
    ClientGone,
    /// The stop endpoint.
    Stopped,
    /// The chat was deleted.
    Deleted,
    /// The server is shutting down and the drain window is over.
    Shutdown,
}

/// The stop switch of one answer; the first cause given wins.
#[derive(Debug, Default)]
pub struct TurnControl {
    token: CancellationToken,
    cause: OnceLock<StopCause>,
}

impl TurnControl {
    pub fn stop(&self, cause: StopCause) {
        let _ = self.cause.set(cause);
        self.token.cancel();
    }

    pub async fn stopped(&self) {
        self.token.cancelled().await;
    }

    pub fn cause(&self) -> StopCause {
        self.cause.get().copied().unwrap_or(StopCause::Stopped)
    }
}

/// One live answer: its stop switch and who listens to it.
#[derive(Debug, Clone)]
pub struct ActiveAnswer {
    pub control: Arc<TurnControl>,
    pub audience: Arc<Audience>,
}

/// Live answers by chat id. One per chat: a second message to a busy chat is refused.
#[derive(Debug, Default, Clone)]
pub struct ActiveAnswers {
    answers: Arc<Mutex<HashMap<String, ActiveAnswer>>>,
}

impl ActiveAnswers {
    /// The map stays consistent under a panic elsewhere (each change is one insert or remove),
    /// so a poisoned lock is used as it is: releasing a claim must never fail.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ActiveAnswer>> {
        self.answers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Claims the chat for a new answer; `None` when it already has one.
    pub fn claim(&self, chat_id: &str, unheard_grace: Option<Duration>) -> Option<ActiveAnswer> {
        let mut answers = self.lock();
        if answers.contains_key(chat_id) {
            return None;
        }
        let answer = ActiveAnswer {
            control: Arc::default(),
            audience: Audience::new(unheard_grace),
        };
        answers.insert(chat_id.to_owned(), answer.clone());
        Some(answer)
    }

    pub fn release(&self, chat_id: &str) {
        self.lock().remove(chat_id);
    }

    pub fn get(&self, chat_id: &str) -> Option<ActiveAnswer> {
        self.lock().get(chat_id).cloned()
    }

    /// Stops the chat's answer, if it has one; says whether it had.
    pub fn stop(&self, chat_id: &str, cause: StopCause) -> bool {
        match self.get(chat_id) {
            Some(answer) => {
                answer.control.stop(cause);
                true
            }
            None => false,
        }
    }

    pub fn stop_all(&self, cause: StopCause) {
        for answer in self.lock().values() {
            answer.control.stop(cause);
        }
    }
}

/// Releases a chat's claim when dropped: the producer's task holds it, so the chat is free again
/// however the task ends.
pub struct ClaimGuard {
    active: ActiveAnswers,
    chat_id: String,
}

impl ClaimGuard {
    pub fn new(active: ActiveAnswers, chat_id: String) -> Self {
        Self { active, chat_id }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.active.release(&self.chat_id);
    }
}
