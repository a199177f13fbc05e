//! The caller's chats as a list of records: list, read, rename, rewind, delete. The turns
//! themselves are in the parent module.

use super::control::StopCause;
use super::{ChatError, ChatPage, ChatService, MESSAGE_PAGE_BYTES};
use crate::auth::UserId;
use crate::store::{
    AnswerVersion, ChatCursor, ChatRecord, MessageRecord, SearchHit, SearchTerms, StoreError,
    UsageQuery, UsageRow,
};

/// The longest title a chat may be given, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// The longest search, in characters.
pub const MAX_SEARCH_CHARS: usize = 200;

/// Where a page of a chat's messages is taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PagePosition {
    /// The first ones after this `seq` (from the chat's start when `None`).
    After(Option<i64>),
    /// The last ones before this `seq` (the chat's newest when `None`).
    Before(Option<i64>),
    /// The last ones before this message of the chat.
    BeforeMessage(String),
}

/// A page of a chat's messages, in conversation order.
#[derive(Debug)]
pub struct MessagePage {
    pub chat: ChatRecord,
    pub messages: Vec<MessageRecord>,
    /// Earlier versions of the page's answers, by place (`seq`), oldest first.
    pub versions: Vec<AnswerVersion>,
    /// The `seq` to read on after (`PagePosition::After`) when later messages exist.
    pub newer: Option<i64>,
    /// The `seq` to read back from (`PagePosition::Before`) when earlier messages exist.
    pub older: Option<i64>,
}

/// A page of search results.
#[derive(Debug)]
pub struct SearchPage {
    pub terms: SearchTerms,
    pub hits: Vec<SearchHit>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<ChatCursor>,
}

impl ChatService {
    /// The caller's chat and its latest answer (streaming or stored), if it has one: what a
    /// resumed stream in another protocol names its completion by.
    pub async fn latest_answer(
        &self,
        user: &UserId,
        chat_id: &str,
    ) -> Result<(ChatRecord, Option<MessageRecord>), ChatError> {
        let chat = self.owned_chat(user, chat_id).await?;
        let mut recent = self.store.recent_messages(chat_id, 2).await?;
        recent.retain(|m| m.role == crate::domain::Role::Assistant);
        Ok((chat, recent.pop()))
    }

    /// Brings the caller's chat back to the first `kept` messages of the conversation its client
    /// sends whole (the AI SDK's `useChat` after an edit or a regenerate): the question at that
    /// place and everything after it go, its answer kept as an earlier version when
    /// `keep_answer`. Nothing changes when the chat holds no more than that.
    pub async fn rewind_to(
        &self,
        user: &UserId,
        chat_id: &str,
        kept: usize,
        keep_answer: bool,
    ) -> Result<(), ChatError> {
        let next = self
            .store
            .list_messages(chat_id, Some(kept as i64), 1)
            .await?;
        match next.first() {
            Some(message) if message.role == crate::domain::Role::User => {
                self.rewind_chat(user, chat_id, &message.id, keep_answer)
                    .await
            }
            _ => Ok(()),
        }
    }

    /// What `user` used (every user's, with `everyone`, for an operator only), from the ledger.
    pub async fn usage(
        &self,
        user: &UserId,
        everyone: bool,
        query: UsageQuery<'_>,
    ) -> Result<Vec<UsageRow>, ChatError> {
        if everyone && !user.is_admin() {
            return Err(ChatError::NotOperator);
        }
        let query = UsageQuery {
            user_id: (!everyone).then_some(user.as_str()).or(query.user_id),
            ..query
        };
        Ok(self.store.usage(query).await?)
    }

    /// The most tokens an answer of `bot_id` may have.
    pub fn max_tokens_of(&self, bot_id: &str) -> Option<u32> {
        self.bots.get(bot_id).map(|bot| bot.max_tokens)
    }

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
        let next = cut_page(&mut chats, limit, |chat| chat);
        Ok(ChatPage { chats, next })
    }

    /// A page of the chat's messages in conversation order: at most `limit` of them from
    /// `position`, and no more than [`MESSAGE_PAGE_BYTES`] of text (at least one message) so
    /// that one response stays small however long the messages are.
    pub async fn messages(
        &self,
        user: &UserId,
        chat_id: &str,
        position: PagePosition,
        limit: u32,
    ) -> Result<MessagePage, ChatError> {
        let chat = self.owned_chat(user, chat_id).await?;
        let (messages, newer, older) = match position {
            PagePosition::After(after) => self.messages_after(chat_id, after, limit).await?,
            PagePosition::Before(before) => self.messages_before(chat_id, before, limit).await?,
            PagePosition::BeforeMessage(message_id) => {
                let seq = self
                    .store
                    .message_seq(chat_id, &message_id)
                    .await?
                    .ok_or(ChatError::MessageNotFound)?;
                self.messages_before(chat_id, Some(seq), limit).await?
            }
        };
        Ok(MessagePage {
            versions: self.versions_of(chat_id, &messages).await?,
            chat,
            messages,
            newer,
            older,
        })
    }

    /// The earlier versions of the page's answers.
    async fn versions_of(
        &self,
        chat_id: &str,
        messages: &[MessageRecord],
    ) -> Result<Vec<AnswerVersion>, ChatError> {
        match (messages.first(), messages.last()) {
            (Some(first), Some(last)) => Ok(self
                .store
                .answer_versions(chat_id, first.seq, last.seq)
                .await?),
            _ => Ok(Vec::new()),
        }
    }

    async fn messages_after(
        &self,
        chat_id: &str,
        after: Option<i64>,
        limit: u32,
    ) -> Result<(Vec<MessageRecord>, Option<i64>, Option<i64>), ChatError> {
        let mut messages = self.store.list_messages(chat_id, after, limit + 1).await?;
        let mut more = messages.len() > limit as usize;
        messages.truncate(limit as usize);
        if let Some(keep) = within_page_bytes(messages.iter()) {
            more |= keep < messages.len();
            messages.truncate(keep);
        }
        let newer = more.then(|| messages.last().map(|m| m.seq)).flatten();
        let older = after.map(|seq| messages.first().map_or(seq + 1, |m| m.seq));
        Ok((messages, newer, older))
    }

    /// The last messages before `before` (the newest when `None`), with where the pages after
    /// and before them start.
    async fn messages_before(
        &self,
        chat_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<(Vec<MessageRecord>, Option<i64>, Option<i64>), ChatError> {
        let mut messages = self
            .store
            .messages_before(chat_id, before, limit + 1)
            .await?;
        let mut more = messages.len() > limit as usize;
        if more {
            messages.remove(0);
        }
        // Past the byte budget, keep the newest: they are the ones asked for.
        if let Some(keep) = within_page_bytes(messages.iter().rev()) {
            more |= keep < messages.len();
            messages.drain(..messages.len() - keep);
        }
        let newer = before.map(|seq| messages.last().map_or(seq - 1, |m| m.seq));
        let older = more.then(|| messages.first().map(|m| m.seq)).flatten();
        Ok((messages, newer, older))
    }

    /// The caller's chats whose title or messages hold every word of `query`, most recently
    /// active first, a page at a time.
    pub async fn search_chats(
        &self,
        user: &UserId,
        query: &str,
        limit: u32,
        cursor: Option<&ChatCursor>,
    ) -> Result<SearchPage, ChatError> {
        if query.chars().count() > MAX_SEARCH_CHARS {
            return Err(ChatError::InvalidSearch(format!(
                "a search is at most {MAX_SEARCH_CHARS} characters"
            )));
        }
        let Some(terms) = SearchTerms::parse(query) else {
            return Err(ChatError::InvalidSearch(
                "a search needs at least one letter or digit".into(),
            ));
        };
        let mut hits = self
            .store
            .search_chats(user.as_str(), &terms, limit + 1, cursor)
            .await?;
        let next = cut_page(&mut hits, limit, |hit| &hit.chat);
        Ok(SearchPage { terms, hits, next })
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
    /// asked again: edited, or its answer regenerated (`keep_answer`: the answer stays as an
    /// earlier version of the next one). Refused while an answer streams.
    pub async fn rewind_chat(
        &self,
        user: &UserId,
        chat_id: &str,
        message_id: &str,
        keep_answer: bool,
    ) -> Result<(), ChatError> {
        match self
            .store
            .rewind_chat(chat_id, user.as_str(), message_id, keep_answer)
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

/// Past `limit`, drops the extra item fetched to tell whether another page exists, and says
/// where that page starts (after the last chat kept).
fn cut_page<T>(
    items: &mut Vec<T>,
    limit: u32,
    chat_of: impl Fn(&T) -> &ChatRecord,
) -> Option<ChatCursor> {
    if items.len() <= limit as usize {
        return None;
    }
    items.truncate(limit as usize);
    items.last().map(|item| ChatCursor::after(chat_of(item)))
}

/// How many of `messages`, in the order given, fit in [`MESSAGE_PAGE_BYTES`] of text (at least
/// one); `None` when they all do.
fn within_page_bytes<'a>(mut messages: impl Iterator<Item = &'a MessageRecord>) -> Option<usize> {
    let mut bytes = 0;
    messages
        .position(|m| {
            bytes += m.content.len();
            bytes > MESSAGE_PAGE_BYTES
        })
        .map(|cut| cut.max(1))
}
