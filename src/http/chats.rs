//! The caller's chats: list (newest activity first, keyset-paginated), search, read (a page at
//! a time, forwards or backwards), rename, rewind, delete.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::AppState;
use super::extract::{AuthUser, ChatIdParam, JsonBody, MessageParams, parse_query};
use crate::chat::PagePosition;
use crate::http::error::{ApiError, ErrorBody};
use crate::store::{AnswerVersion, ChatCursor, ChatRecord, MessageRecord};

const DEFAULT_PAGE: u32 = 20;
const MAX_PAGE: u32 = 100;
/// Messages per page by default: a whole ordinary chat (100 turns) in one request.
const DEFAULT_MESSAGE_PAGE: u32 = 200;
const MAX_MESSAGE_PAGE: u32 = 1000;

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<u32>,
    cursor: Option<String>,
    q: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ChatList {
    chats: Vec<ChatView>,
    /// Pass as `?cursor=` for the next page; null on the last page.
    next_cursor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ChatView {
    chat_id: String,
    id: String,
    bot_id: String,
    title: String,
    created_at: String,
    updated_at: String,
    last_event_id: i64,
    /// Listed with `?q=`: a line around the match.
    #[serde(skip_serializing_if = "Option::is_none")]
    snippet: Option<String>,
    /// Listed with `?q=`: the chat's latest matching message (none when only the title matched).
    #[serde(skip_serializing_if = "Option::is_none")]
    matched_message_id: Option<String>,
}

impl From<ChatRecord> for ChatView {
    fn from(chat: ChatRecord) -> Self {
        Self {
            id: chat.id.clone(),
            chat_id: chat.id,
            bot_id: chat.bot_id,
            title: chat.title,
            created_at: rfc3339(chat.created_at_ms),
            updated_at: rfc3339(chat.updated_at_ms),
            last_event_id: chat.last_event_id,
            snippet: None,
            matched_message_id: None,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MessageList {
    chat_id: String,
    messages: Vec<MessageView>,
    /// Pass as `?cursor=` for the messages after this page; null when there are none.
    next_cursor: Option<String>,
    /// Pass as `?before=` for the messages before this page; null when there are none.
    prev_cursor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct MessageView {
    id: String,
    message_id: String,
    role: &'static str,
    content: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<String>,
    usage: Option<UsageView>,
    created_at: String,
    /// Answers only, when it was regenerated: the answers it replaced, oldest first. The
    /// message itself is the newest version, the one the chat goes on from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    versions: Vec<VersionView>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct VersionView {
    id: String,
    content: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<String>,
    created_at: String,
}

impl From<AnswerVersion> for VersionView {
    fn from(v: AnswerVersion) -> Self {
        Self {
            id: v.id,
            content: v.content,
            status: v.status.as_str(),
            error_code: v.error_code,
            created_at: rfc3339(v.created_at_ms),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct UsageView {
    input_tokens: u64,
    output_tokens: u64,
}

impl From<MessageRecord> for MessageView {
    fn from(m: MessageRecord) -> Self {
        Self {
            message_id: m.id.clone(),
            id: m.id,
            role: m.role.as_str(),
            content: m.content,
            status: m.status.as_str(),
            error_code: m.error_code,
            usage: m.usage.map(|u| UsageView {
                input_tokens: u.input_tokens,
                output_tokens: u.output_tokens,
            }),
            created_at: rfc3339(m.created_at_ms),
            versions: Vec::new(),
        }
    }
}

/// The page's messages, each answer with its earlier versions.
fn message_views(messages: Vec<MessageRecord>, versions: Vec<AnswerVersion>) -> Vec<MessageView> {
    let mut by_place: HashMap<i64, Vec<VersionView>> = HashMap::new();
    for version in versions {
        by_place
            .entry(version.seq)
            .or_default()
            .push(VersionView::from(version));
    }
    messages
        .into_iter()
        .map(|m| {
            let earlier = by_place.remove(&m.seq).unwrap_or_default();
            MessageView {
                versions: earlier,
                ..MessageView::from(m)
            }
        })
        .collect()
}

#[utoipa::path(get, path = "/api/v1/chats", tag = "chats",
    params(
        ("limit" = Option<u32>, Query, description = "1 to 100, default 20"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
        ("q" = Option<String>, Query, description = "Only the chats that match these words, as `/api/v1/chats/search` finds them (each with `snippet` and `matched_message_id`)"),
    ),
    responses(
        (status = 200, description = "The caller's chats, most recently active first", body = ChatList),
        (status = 400, description = "Bad limit or cursor, or a `q` with no word", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_chats(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    RawQuery(query): RawQuery,
) -> Result<Json<ChatList>, ApiError> {
    let query: ListQuery = parse_query(query.as_deref())?;
    let limit = page_size(query.limit, DEFAULT_PAGE, MAX_PAGE)?;
    let cursor = query.cursor.as_deref().map(decode_cursor).transpose()?;
    if let Some(words) = &query.q {
        let (_, results, next_cursor) = search(&state, &user, words, limit, cursor).await?;
        let chats = results
            .into_iter()
            .map(|r| ChatView {
                snippet: Some(r.snippet),
                matched_message_id: r.message_id,
                ..r.chat
            })
            .collect();
        return Ok(Json(ChatList { chats, next_cursor }));
    }
    let page = state.chat.list_chats(&user, limit, cursor.as_ref()).await?;
    Ok(Json(ChatList {
        chats: page.chats.into_iter().map(ChatView::from).collect(),
        next_cursor: page.next.as_ref().map(encode_cursor),
    }))
}

#[derive(Debug, Deserialize)]
struct MessagesQuery {
    limit: Option<u32>,
    cursor: Option<String>,
    before: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/chats/{chat_id}/messages", tag = "chats",
    params(
        ("chat_id" = String, Path),
        ("limit" = Option<u32>, Query, description = "1 to 1000, default 200"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of a page: the messages after it"),
        ("before" = Option<String>, Query, description = "The last messages before a place: `latest` (or empty) for the chat's newest, `prev_cursor` of a page, or a message id of the chat. Not with `cursor`."),
    ),
    responses(
        (status = 200, description = "A page of the chat's messages, in conversation order (at most 2 MiB of text)", body = MessageList),
        (status = 400, description = "Bad limit or cursor, or both `cursor` and `before`", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such chat of the caller's (`chat_not_found`), or `before` names no message of it (`message_not_found`)", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_messages(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ChatIdParam(chat_id): ChatIdParam,
    RawQuery(query): RawQuery,
) -> Result<Json<MessageList>, ApiError> {
    let query: MessagesQuery = parse_query(query.as_deref())?;
    let limit = page_size(query.limit, DEFAULT_MESSAGE_PAGE, MAX_MESSAGE_PAGE)?;
    let position = match (query.cursor.as_deref(), query.before) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "give either cursor (later messages) or before (earlier ones), not both",
            ));
        }
        (cursor, None) => PagePosition::After(cursor.map(decode_seq).transpose()?),
        (None, Some(before)) if before.is_empty() || before == "latest" => {
            PagePosition::Before(None)
        }
        (None, Some(before)) => match decode_seq(&before) {
            Ok(seq) => PagePosition::Before(Some(seq)),
            Err(_) => PagePosition::BeforeMessage(before),
        },
    };
    let page = state
        .chat
        .messages(&user, &chat_id, position, limit)
        .await?;
    Ok(Json(MessageList {
        chat_id: page.chat.id,
        messages: message_views(page.messages, page.versions),
        next_cursor: page.newer.map(encode_seq),
        prev_cursor: page.older.map(encode_seq),
    }))
}

#[derive(Debug, Deserialize)]
struct SearchQuery {
    q: String,
    limit: Option<u32>,
    cursor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SearchResults {
    /// The words searched for, as matched: lower-cased, each the start of a word.
    terms: Vec<String>,
    results: Vec<SearchResult>,
    /// Pass as `?cursor=` (with the same `q`) for the next page; null on the last page.
    next_cursor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct SearchResult {
    chat: ChatView,
    /// The chat's latest message holding every word; null when only the title matched.
    message_id: Option<String>,
    /// A line around the match: of that message, or the title.
    snippet: String,
}

#[utoipa::path(get, path = "/api/v1/chats/search", tag = "chats",
    params(
        ("q" = String, Query, description = "Words, each matched as the start of a word in the title or a finished message; all must match (1 to 200 characters)"),
        ("limit" = Option<u32>, Query, description = "1 to 100, default 20"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "The caller's matching chats, most recently active first", body = SearchResults),
        (status = 400, description = "No word to search for, too long a search, or a bad limit or cursor", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn search_chats(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    RawQuery(query): RawQuery,
) -> Result<Json<SearchResults>, ApiError> {
    let query: SearchQuery = parse_query(query.as_deref())?;
    let limit = page_size(query.limit, DEFAULT_PAGE, MAX_PAGE)?;
    let cursor = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let (terms, results, next_cursor) = search(&state, &user, &query.q, limit, cursor).await?;
    Ok(Json(SearchResults {
        terms,
        results,
        next_cursor,
    }))
}

/// A page of the caller's chats matching `words`: the terms, the results, the next cursor.
async fn search(
    state: &AppState,
    user: &crate::auth::UserId,
    words: &str,
    limit: u32,
    cursor: Option<ChatCursor>,
) -> Result<(Vec<String>, Vec<SearchResult>, Option<String>), ApiError> {
    let page = state
        .chat
        .search_chats(user, words, limit, cursor.as_ref())
        .await?;
    let results = page
        .hits
        .into_iter()
        .map(|hit| SearchResult {
            snippet: page
                .terms
                .snippet(hit.message_text.as_deref().unwrap_or(&hit.chat.title)),
            message_id: hit.message_id,
            chat: ChatView::from(hit.chat),
        })
        .collect();
    let next_cursor = page.next.as_ref().map(encode_cursor);
    Ok((page.terms.terms().to_vec(), results, next_cursor))
}

fn page_size(asked: Option<u32>, default: u32, max: u32) -> Result<u32, ApiError> {
    match asked.unwrap_or(default) {
        n if (1..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(
            "invalid_request",
            format!("limit must be between 1 and {max}"),
        )),
    }
}

fn encode_seq(seq: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("seq:{seq}"))
}

fn decode_seq(text: &str) -> Result<i64, ApiError> {
    URL_SAFE_NO_PAD
        .decode(text)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix("seq:")?.parse().ok())
        .ok_or_else(|| ApiError::bad_request("invalid_request", "invalid cursor"))
}

#[utoipa::path(delete, path = "/api/v1/chats/{chat_id}", tag = "chats",
    params(("chat_id" = String, Path)),
    responses(
        (status = 204, description = "Deleted (its running answer, if any, stopped)"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such chat of the caller's", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete_chat(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ChatIdParam(chat_id): ChatIdParam,
) -> Result<StatusCode, ApiError> {
    state.chat.delete_chat(&user, &chat_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `PATCH /api/v1/chats/{chat_id}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatUpdate {
    /// 1 to 200 characters; white space is collapsed to single spaces.
    title: String,
}

#[utoipa::path(patch, path = "/api/v1/chats/{chat_id}", tag = "chats",
    params(("chat_id" = String, Path)),
    request_body = ChatUpdate,
    responses(
        (status = 200, description = "Renamed; the chat as it is now", body = ChatView),
        (status = 400, description = "Empty or too long a title (`invalid_title`), or a bad body", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such chat of the caller's", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn update_chat(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ChatIdParam(chat_id): ChatIdParam,
    JsonBody(update): JsonBody<ChatUpdate>,
) -> Result<Json<ChatView>, ApiError> {
    let chat = state
        .chat
        .rename_chat(&user, &chat_id, &update.title)
        .await?;
    Ok(Json(ChatView::from(chat)))
}

#[derive(Debug, Deserialize)]
struct RewindQuery {
    #[serde(default)]
    keep_answer: bool,
}

#[utoipa::path(delete, path = "/api/v1/chats/{chat_id}/messages/{message_id}", tag = "chats",
    params(
        ("chat_id" = String, Path),
        ("message_id" = String, Path),
        ("keep_answer" = Option<bool>, Query, description = "When the message is a question: keep its answer as an earlier version of the next answer in its place (regenerate). Default false: every version from that place on goes too."),
    ),
    responses(
        (status = 204, description = "The message and every later one removed: the turn can be asked again (edit, regenerate)"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such chat of the caller's (`chat_not_found`) or no such message in it (`message_not_found`)", body = ErrorBody),
        (status = 409, description = "An answer in the chat is still streaming (`chat_busy`)", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn rewind_chat(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    params: MessageParams,
    RawQuery(query): RawQuery,
) -> Result<StatusCode, ApiError> {
    let query: RewindQuery = parse_query(query.as_deref())?;
    state
        .chat
        .rewind_chat(
            &user,
            &params.chat_id,
            &params.message_id,
            query.keep_answer,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn encode_cursor(cursor: &ChatCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", cursor.updated_at_ms, cursor.id))
}

fn decode_cursor(text: &str) -> Result<ChatCursor, ApiError> {
    let invalid = || ApiError::bad_request("invalid_request", "invalid cursor");
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (time, id) = text.split_once(':').ok_or_else(invalid)?;
    Ok(ChatCursor {
        updated_at_ms: time.parse().map_err(|_| invalid())?,
        id: id.to_owned(),
    })
}

/// Epoch milliseconds as an RFC 3339 time (UTC).
pub(super) fn rfc3339(epoch_ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(epoch_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let cursor = ChatCursor {
            updated_at_ms: 1_700_000_000_123,
            id: "chat-abc".into(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&cursor)).unwrap(), cursor);
        assert!(decode_cursor("!!").is_err());
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BotList {
    bots: Vec<crate::chat::BotInfo>,
}

/// The bots a user may pick, in configuration order.
#[utoipa::path(get, path = "/api/v1/bots", tag = "chats",
    responses(
        (status = 200, description = "The configured bots", body = BotList),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_bots(State(state): State<AppState>, AuthUser(_user): AuthUser) -> Json<BotList> {
    Json(BotList {
        bots: state.chat.bots(),
    })
}

/// What the server accepts, for a client to check before sending (and to show the limits).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Limits {
    /// The longest message a turn takes, in characters (Unicode scalar values); a longer one is
    /// refused with `400 message_too_long`.
    max_message_chars: usize,
    /// The longest chat title, in characters.
    max_title_chars: usize,
    /// The longest search, in characters.
    max_search_chars: usize,
    /// How many turns (a question and its answer) one chat may hold; null: no limit.
    max_turns_per_chat: Option<u64>,
    /// How many chats one user may keep; null: no limit.
    max_chats_per_user: Option<u64>,
    /// Bytes of message text one user may store; null: no limit.
    max_bytes_per_user: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/limits", tag = "chats",
    responses(
        (status = 200, description = "The limits every turn is checked against", body = Limits),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn limits(State(state): State<AppState>, AuthUser(_user): AuthUser) -> Json<Limits> {
    let limits = state.chat.limits();
    let bounded = |n: u64| (n != u64::MAX).then_some(n);
    Json(Limits {
        max_message_chars: limits.max_message_chars,
        max_title_chars: crate::chat::MAX_TITLE_CHARS,
        max_search_chars: crate::chat::MAX_SEARCH_CHARS,
        max_turns_per_chat: bounded(limits.quota.max_turns),
        max_chats_per_user: bounded(limits.quota.max_chats),
        max_bytes_per_user: bounded(limits.quota.max_bytes),
    })
}
