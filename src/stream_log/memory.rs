//! The in-process [`EventLog`]: one append-only list per live answer, and a watch channel that
//! wakes its followers when it grows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use futures_util::stream::{self, BoxStream};
use tokio::sync::watch;

use super::{AnswerSignals, Audience, Claim, EventLog, LogError};
use crate::events::StreamEvent;

struct LiveAnswer {
    events: RwLock<Vec<StreamEvent>>,
    /// How many events there are, and whether the answer is closed.
    state: watch::Sender<(usize, bool)>,
}

#[derive(Default)]
pub struct MemoryLog {
    answers: Mutex<HashMap<String, Arc<LiveAnswer>>>,
}

impl MemoryLog {
    /// Every change to the table is one insert or remove, so a lock poisoned by a panic elsewhere
    /// still holds a consistent table.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LiveAnswer>>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, chat_id: &str) -> Option<Arc<LiveAnswer>> {
        self.lock().get(chat_id).cloned()
    }
}

#[async_trait::async_trait]
impl EventLog for MemoryLog {
    async fn open(
        &self,
        chat_id: &str,
        _: Claim,
        _: &str,
        _: i64,
        _: &Arc<Audience>,
    ) -> Result<AnswerSignals, LogError> {
        self.start(chat_id);
        Ok(AnswerSignals::default())
    }

    async fn append(&self, chat_id: &str, event: StreamEvent) -> Result<(), LogError> {
        self.push(chat_id, [event]);
        Ok(())
    }

    async fn close(&self, chat_id: &str) -> Result<(), LogError> {
        self.end(chat_id);
        Ok(())
    }

    async fn follow(
        &self,
        chat_id: &str,
        after_id: i64,
    ) -> Result<Option<BoxStream<'static, StreamEvent>>, LogError> {
        Ok(self.follower(chat_id, after_id))
    }
}

/// The same operations, synchronous: the shared log fans out to this process's listeners
/// through one of these.
impl MemoryLog {
    pub fn start(&self, chat_id: &str) {
        let answer = Arc::new(LiveAnswer {
            events: RwLock::new(Vec::new()),
            state: watch::Sender::new((0, false)),
        });
        self.lock().insert(chat_id.to_owned(), answer);
    }

    pub fn push(&self, chat_id: &str, new: impl IntoIterator<Item = StreamEvent>) {
        if let Some(answer) = self.get(chat_id) {
            let len = {
                let mut events = answer.events.write().unwrap_or_else(|p| p.into_inner());
                events.extend(new);
                events.len()
            };
            answer.state.send_modify(|(count, _)| *count = len);
        }
    }

    pub fn end(&self, chat_id: &str) {
        if let Some(answer) = self.lock().remove(chat_id) {
            answer.state.send_modify(|(_, closed)| *closed = true);
        }
    }

    /// Every event of the chat's live answer so far (cheap: their text is shared).
    pub fn events(&self, chat_id: &str) -> Vec<StreamEvent> {
        self.get(chat_id).map_or_else(Vec::new, |answer| {
            answer
                .events
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    pub fn is_live(&self, chat_id: &str) -> bool {
        self.get(chat_id).is_some()
    }

    pub fn follower(
        &self,
        chat_id: &str,
        after_id: i64,
    ) -> Option<BoxStream<'static, StreamEvent>> {
        let answer = self.get(chat_id)?;
        let cursor = {
            let events = answer.events.read().unwrap_or_else(|p| p.into_inner());
            events.iter().take_while(|e| e.id <= after_id).count()
        };
        let updates = answer.state.subscribe();
        let follower = stream::unfold(
            (answer, updates, cursor, false),
            |(answer, mut updates, cursor, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    let next = answer
                        .events
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(cursor)
                        .cloned();
                    if let Some(event) = next {
                        let ended = event.kind.is_terminal();
                        return Some((event, (answer, updates, cursor + 1, ended)));
                    }
                    if updates.borrow_and_update().1 {
                        return None; // closed with nothing more to read
                    }
                    if updates.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        Some(Box::pin(follower))
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;
    use crate::events::{EventKind, StreamFailure};

    fn content(id: i64, text: &str) -> StreamEvent {
        StreamEvent {
            id,
            kind: EventKind::Content(text.into()),
        }
    }

    #[tokio::test]
    async fn followers_replay_after_their_id_then_follow_live_to_the_terminal() {
        let log = MemoryLog::default();
        log.open("c", Claim::LOCAL, "m", 1, &Audience::new(None))
            .await
            .unwrap();
        log.append("c", content(1, "a")).await.unwrap();
        log.append("c", content(2, "b")).await.unwrap();
        let mut follower = log.follow("c", 1).await.unwrap().unwrap();
        assert_eq!(follower.next().await.unwrap().id, 2);
        log.append("c", content(3, "c")).await.unwrap();
        assert_eq!(follower.next().await.unwrap().id, 3);
        let terminal = StreamEvent {
            id: 4,
            kind: EventKind::Error(StreamFailure::new("x", "x", false)),
        };
        log.append("c", terminal).await.unwrap();
        assert_eq!(follower.next().await.unwrap().id, 4);
        assert!(follower.next().await.is_none());
    }

    #[tokio::test]
    async fn a_closed_answer_ends_its_followers_and_is_gone() {
        let log = MemoryLog::default();
        log.open("c", Claim::LOCAL, "m", 1, &Audience::new(None))
            .await
            .unwrap();
        log.append("c", content(1, "a")).await.unwrap();
        let mut follower = log.follow("c", 1).await.unwrap().unwrap();
        log.close("c").await.unwrap();
        assert!(follower.next().await.is_none());
        assert!(log.follow("c", 0).await.unwrap().is_none());
    }
}
