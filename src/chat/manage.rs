//! The caller's chats as a list of records: list, read, rename, rewind, delete. The turns
//! themselves are in the parent module.

use super::control::StopCause;
use super::{ChatError, ChatPage, ChatService, MESSAGE_PAGE_BYTES};
use crate::auth::UserId;
use crate::store::{ChatCursor, ChatRecord, MessageRecord, StoreError};

/// The longest title a chat may be given, in characters.
pub const MAX_TITLE_CHARS: usize = 200;

impl ChatService {
    pub async fn list_chats(
        &self,
        user: &UserId,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<ChatPage, ChatError> {
        // One extra row tells whether another page exists without a count query.
        let mut chats = self
            .store
            .list_chats(user.as_str(), limit + 1, cursor)
            .await?;
        let next = if chats.len() > limit as usize {
            chats.truncate(limit as usize);
            chats.last().map(|c| ChatCursor {
                updated_at_ms: c.updated_at_ms,
                id: c.id.clone(),
            })
        } else {
            None
        };
        Ok(ChatPage { chats, next })
    }

    /// A page of the chat's messages in order: at most `limit`, after `after_seq`, and no more
    /// than [`MESSAGE_PAGE_BYTES`] of text (at least one message) so that one response stays
    /// small however long the messages are. The second value is where the next page starts.
    pub async fn messages(
        &self,
        user: &UserId,
        chat_id: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<(ChatRecord, Vec<MessageRecord>, Option<i64>), ChatError> {
        let chat = self.owned_chat(user, chat_id).await?;
        let mut messages = self
            .store
            .list_messages(chat_id, after_seq, limit + 1)
            .await?;
        let mut more = messages.len() > limit as usize;
        messages.truncate(limit as usize);
        let mut bytes = 0;
        if let Some(cut) = messages.iter().position(|m| {
            bytes += m.content.len();
            bytes > MESSAGE_PAGE_BYTES
        }) {
            let keep = cut.max(1);
            more |= keep < messages.len();
            messages.truncate(keep);
        }
        let next = more.then(|| messages.last().map(|m| m.seq)).flatten();
        Ok((chat, messages, next))
    }

    /// Deletes a chat of the caller, stopping its answer first if one is being generated.
    pub async fn delete_chat(&self, user: &UserId, chat_id: &str) -> Result<(), ChatError> {
        self.owned_chat(user, chat_id).await?;
        self.stop_anywhere(chat_id, StopCause::Deleted).await?;
        if self.store.delete_chat(chat_id, user.as_str()).await? {
            // The chat is gone either way; keys left behind expire with `keep_ended_secs`.
            if let Err(e) = self.log.forget(chat_id).await {
                tracing::warn!(chat_id, "could not remove a deleted chat's live keys: {e}");
            }
            Ok(())
        } else {
            Err(ChatError::ChatNotFound)
        }
    }

    /// Gives a chat of the caller a new title (trimmed, one line).
    pub async fn rename_chat(
        &self,
        user: &UserId,
        chat_id: &str,
        title: &str,
    ) -> Result<ChatRecord, ChatError> {
        let title = title.split_whitespace().collect::<Vec<_>>().join(" ");
        if title.is_empty() || title.chars().count() > MAX_TITLE_CHARS {
            return Err(ChatError::InvalidTitle {
                max: MAX_TITLE_CHARS,
            });
        }
        if !self
            .store
            .rename_chat(chat_id, user.as_str(), &title)
            .await?
        {
            return Err(ChatError::ChatNotFound);
        }
        self.owned_chat(user, chat_id).await
    }

    /// Removes a message of the caller's chat and everything after it, so that the turn can be
    /// asked again: edited, or its answer regenerated. Refused while an answer streams.
    pub async fn rewind_chat(
        &self,
        user: &UserId,
        chat_id: &str,
        message_id: &str,
    ) -> Result<(), ChatError> {
        match self
            .store
            .rewind_chat(chat_id, user.as_str(), message_id)
            .await
        {
            Ok(()) => Ok(()),
            Err(StoreError::ChatNotFound) => Err(ChatError::ChatNotFound),
            Err(StoreError::MessageNotFound) => Err(ChatError::MessageNotFound),
            Err(StoreError::ChatBusy) => Err(ChatError::ChatBusy),
            Err(other) => Err(ChatError::Store(other)),
        }
    }
}
