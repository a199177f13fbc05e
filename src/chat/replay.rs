//! Finished answers, replayed from storage for a client that reconnects with `Last-Event-ID`:
//! the same events with the same ids as when they were streamed.

use crate::store::{MessageRecord, MessageStatus};

use crate::events::{DoneEvent, EventKind, StreamEvent, StreamFailure};

/// The stored answer's events after `after_id`.
pub fn events_after(chat_id: &str, answer: &MessageRecord, after_id: i64) -> Vec<StreamEvent> {
    let Some(replay) = &answer.replay else {
        return Vec::new();
    };
    let first = replay.first_event_id;
    let start = EventKind::Start {
        chat_id: chat_id.to_owned(),
        message_id: answer.id.clone(),
    };
    let pieces = replay
        .chunks
        .iter()
        .map(|chunk| EventKind::Content(chunk.as_str().into()));
    // Ids run on from the start's; the terminal's may be further on (an answer recovered after a
    // crash skips the ids its unsaved pieces may have used).
    let mut events: Vec<(EventKind, i64)> =
        std::iter::once(start).chain(pieces).zip(first..).collect();
    events.push((terminal(chat_id, answer), replay.terminal_event_id()));
    events
        .into_iter()
        .filter(|(_, id)| *id > after_id)
        .map(|(kind, id)| StreamEvent { id, kind })
        .collect()
}

pub fn terminal(chat_id: &str, answer: &MessageRecord) -> EventKind {
    let replay = answer.replay.clone().unwrap_or_default();
    match answer.status {
        MessageStatus::Complete | MessageStatus::Stopped => EventKind::Done(DoneEvent {
            chat_id: chat_id.to_owned(),
            message_id: answer.id.clone(),
            usage: answer.usage.unwrap_or_default(),
            provider: replay.provider.unwrap_or_default(),
            model: replay.model.unwrap_or_default(),
            stopped: answer.status == MessageStatus::Stopped,
        }),
        // Still marked streaming but not live here: the process that generated it is gone.
        MessageStatus::Streaming => EventKind::Error(StreamFailure::new(
            "this answer is not being generated any more",
            "answer_interrupted",
            true,
        )),
        MessageStatus::Interrupted | MessageStatus::Error => {
            let mut failure = StreamFailure::new(
                replay
                    .error_message
                    .unwrap_or_else(|| "the answer was interrupted".into()),
                answer
                    .error_code
                    .clone()
                    .unwrap_or_else(|| "answer_interrupted".into()),
                replay.error_retryable.unwrap_or(true),
            );
            if failure.code == "server_shutting_down" {
                failure.last_event_id = Some(replay.first_event_id + replay.chunks.len() as i64);
            }
            EventKind::Error(failure)
        }
    }
}
