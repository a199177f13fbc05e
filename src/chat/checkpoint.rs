//! Without shared state (one instance, no Redis), the stream log lives in this process's memory:
//! a `kill -9` would lose an answer's whole text. So while an answer streams its text so far is
//! saved to storage now and then — at most once per interval after text arrived, never once per
//! token — and the next start recovers it as `interrupted` with that text (the store's
//! `recover_abandoned_turns`). With Redis the stream log itself survives the process and this is
//! off.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::turn::Progress;
use crate::store::{ChatStore, PartialAnswer, RESERVED_EVENT_IDS};

/// Saves the answer's text while `progress` says it streams; returns when the answer is over
/// (or was concluded elsewhere).
pub(super) async fn save_while_streaming(
    store: Arc<dyn ChatStore>,
    assistant_message_id: String,
    progress: Arc<Progress>,
    every: Duration,
) {
    let over = progress.over.clone();
    loop {
        tokio::select! {
            () = over.cancelled() => return,
            () = progress.changed.notified() => {}
        }
        // Gather what arrives in the next interval into one write.
        tokio::select! {
            () = over.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let partial = PartialAnswer {
            assistant_message_id: assistant_message_id.clone(),
            chunks: progress.chunks().clone(),
            reserved_event_id: progress.last_id.load(Ordering::SeqCst) + RESERVED_EVENT_IDS,
        };
        match store.save_partial(partial).await {
            Ok(true) => {}
            Ok(false) => return,
            // The final write will try again; a missed checkpoint only widens what a crash loses.
            Err(e) => {
                tracing::warn!(message_id = %assistant_message_id, "could not save the partial answer: {e}")
            }
        }
    }
}
