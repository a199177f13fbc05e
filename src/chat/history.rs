//! What a provider sees of a chat's past: its answered turns, the latest that fit a budget.

use crate::domain::Role;
use crate::providers::ModelMessage;
use crate::store::{EarlierMessage, MessageRecord};

/// The earlier turns a model sees: each user message with its answer. A question whose answer
/// failed empty is left out, because providers require user and assistant to alternate.
pub(super) fn model_history(messages: &[MessageRecord]) -> Vec<ModelMessage> {
    let mut history = Vec::new();
    let mut question: Option<&str> = None;
    for message in messages {
        match message.role {
            Role::User => question = Some(&message.content),
            Role::Assistant => {
                if let Some(q) = question.take()
                    && !message.content.trim().is_empty()
                {
                    history.push(ModelMessage {
                        role: Role::User,
                        content: q.to_owned(),
                    });
                    history.push(ModelMessage {
                        role: Role::Assistant,
                        content: message.content.clone(),
                    });
                }
            }
        }
    }
    history
}

/// A conversation a client brought whole (the OpenAI and AI SDK protocols send every message
/// each time): its last user message is the question, and what came before becomes question and
/// answer pairs, as a chat stores them. Consecutive messages of one role are joined, empty ones
/// dropped, and an assistant message before any question (a greeting) is left out: providers
/// need the conversation to start with the user and alternate. `None` when it does not end with
/// the user's message.
pub fn split_conversation(
    messages: impl IntoIterator<Item = (Role, String)>,
) -> Option<(Vec<EarlierMessage>, String)> {
    let mut joined: Vec<EarlierMessage> = Vec::new();
    for (role, content) in messages {
        if content.trim().is_empty() {
            continue;
        }
        match joined.last_mut() {
            Some(last) if last.role == role => {
                last.content.push_str("\n\n");
                last.content.push_str(&content);
            }
            None if role == Role::Assistant => {}
            _ => joined.push(EarlierMessage { role, content }),
        }
    }
    let question = joined.pop().filter(|m| m.role == Role::User)?;
    Some((joined, question.content))
}

/// A new chat's history as its client brought it: whole question and answer pairs (as stored).
pub(super) fn brought_history(earlier: &[EarlierMessage]) -> Vec<ModelMessage> {
    earlier[..earlier.len() / 2 * 2]
        .iter()
        .map(|m| ModelMessage {
            role: m.role,
            content: m.content.clone(),
        })
        .collect()
}

/// The most recent turns whose text fits in `max_chars` (whole turns: a question with its
/// answer).
pub(super) fn within_budget(history: Vec<ModelMessage>, max_chars: usize) -> Vec<ModelMessage> {
    let mut used = 0;
    let mut keep_from = history.len();
    for (index, pair) in history.chunks(2).enumerate().rev() {
        used += pair.iter().map(|m| m.content.len()).sum::<usize>();
        if used > max_chars {
            break;
        }
        keep_from = index * 2;
    }
    history.into_iter().skip(keep_from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MessageStatus;

    fn new_id(prefix: &str) -> String {
        format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
    }

    fn message(role: Role, content: &str) -> MessageRecord {
        MessageRecord {
            id: new_id("msg"),
            chat_id: "chat-1".into(),
            role,
            content: content.into(),
            status: MessageStatus::Complete,
            error_code: None,
            usage: None,
            created_at_ms: 0,
            seq: 0,
            replay: None,
        }
    }

    #[test]
    fn a_brought_conversation_becomes_pairs_and_a_question() {
        let (earlier, question) = split_conversation([
            (Role::Assistant, "Hi, how can I help?".to_owned()),
            (Role::User, "one".to_owned()),
            (Role::User, "more".to_owned()),
            (Role::Assistant, "1".to_owned()),
            (Role::User, " ".to_owned()),
            (Role::User, "two".to_owned()),
        ])
        .expect("ends with the user");
        let texts: Vec<_> = earlier.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["one\n\nmore", "1"]);
        assert_eq!(earlier[0].role, Role::User);
        assert_eq!(question, "two");
        let last_is_the_model = [
            (Role::User, "q".to_owned()),
            (Role::Assistant, "a".to_owned()),
        ];
        assert!(split_conversation(last_is_the_model).is_none());
        assert!(split_conversation([]).is_none());
    }

    #[test]
    fn history_keeps_answered_turns_and_drops_failed_ones() {
        let history = model_history(&[
            message(Role::User, "one"),
            message(Role::Assistant, "1"),
            message(Role::User, "two"),
            message(Role::Assistant, ""),
            message(Role::User, "three"),
            message(Role::Assistant, "3"),
        ]);
        let texts: Vec<_> = history.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["one", "1", "three", "3"]);
        assert_eq!(history[0].role, Role::User);
        assert_eq!(history[1].role, Role::Assistant);
    }

    #[test]
    fn history_keeps_the_latest_whole_turns_within_the_budget() {
        let history = model_history(&[
            message(Role::User, "aaaa"),
            message(Role::Assistant, "bbbb"),
            message(Role::User, "cc"),
            message(Role::Assistant, "dd"),
        ]);
        let kept = |budget| {
            within_budget(history.clone(), budget)
                .iter()
                .map(|m| m.content.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(kept(100), ["aaaa", "bbbb", "cc", "dd"]);
        assert_eq!(kept(11), ["cc", "dd"]);
        assert_eq!(kept(3), Vec::<String>::new());
    }
}
