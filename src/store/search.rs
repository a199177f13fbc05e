//! Full-text search over one user's chats: titles and finished messages, SQLite FTS5 and
//! PostgreSQL's text search behind one meaning. A query is cut into words here, once for both
//! backends, and every word must appear as the start of a word (so a search box finds as the
//! user types). Words are letters and digits only, which leaves nothing for either query
//! language to misread: no operator, quote or column filter can come from the user.

use sqlx::{PgPool, SqlitePool};

use super::rows::{CHAT_COLUMNS, Columns, chat_from};
use super::{ChatCursor, ChatRecord, StoreError};

/// The words of a search, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchTerms(Vec<String>);

impl SearchTerms {
    /// More words than this are ignored: they narrow nothing a person would notice.
    pub const MAX_TERMS: usize = 8;
    /// A longer word is cut here; no index holds words this long anyway.
    const MAX_TERM_CHARS: usize = 64;

    /// The words of `query`; `None` when it has none (only spaces or punctuation).
    pub fn parse(query: &str) -> Option<Self> {
        let terms: Vec<String> = query
            .split(|c: char| !c.is_alphanumeric())
            .filter(|word| !word.is_empty())
            .map(|word| word.chars().take(Self::MAX_TERM_CHARS).collect::<String>())
            .map(|word| word.to_lowercase())
            .take(Self::MAX_TERMS)
            .collect();
        (!terms.is_empty()).then_some(Self(terms))
    }

    pub fn terms(&self) -> &[String] {
        &self.0
    }

    /// FTS5: every word as a quoted prefix, all required.
    fn fts5_query(&self) -> String {
        let words: Vec<String> = self.0.iter().map(|t| format!("\"{t}\"*")).collect();
        words.join(" ")
    }

    /// PostgreSQL `to_tsquery`: every word as a quoted prefix, all required.
    fn tsquery(&self) -> String {
        let words: Vec<String> = self.0.iter().map(|t| format!("'{t}':*")).collect();
        words.join(" & ")
    }

    /// A line of `text` around its first matching word, for a result list.
    pub fn snippet(&self, text: &str) -> String {
        const BEFORE: usize = 30;
        const TOTAL: usize = 140;
        let flat: Vec<char> = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .collect();
        let lower: Vec<char> = flat
            .iter()
            .map(|c| c.to_lowercase().next().unwrap_or(*c))
            .collect();
        let found = self
            .0
            .iter()
            .filter_map(|term| find_word_start(&lower, term))
            .min()
            .unwrap_or(0);
        let start = found.saturating_sub(BEFORE);
        let end = (start + TOTAL).min(flat.len());
        let mut line: String = flat[start..end].iter().collect();
        if start > 0 {
            line.insert(0, '…');
        }
        if end < flat.len() {
            line.push('…');
        }
        line
    }
}

/// Where `term` starts a word of `text` (both lower-cased), in characters.
fn find_word_start(text: &[char], term: &str) -> Option<usize> {
    let term: Vec<char> = term.chars().collect();
    (0..text.len().saturating_sub(term.len() - 1))
        .find(|&at| (at == 0 || !text[at - 1].is_alphanumeric()) && text[at..].starts_with(&term))
}

/// A chat that matched, with its latest matching message when a message (not only the title)
/// matched.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub chat: ChatRecord,
    pub message_id: Option<String>,
    pub message_text: Option<String>,
}

fn hit_from(row: &impl Columns) -> Result<SearchHit, StoreError> {
    Ok(SearchHit {
        chat: chat_from(row, "")?,
        message_id: row.opt_text("message_id")?,
        message_text: row.opt_text("message_text")?,
    })
}

pub(super) async fn search_sqlite(
    pool: &SqlitePool,
    user_id: &str,
    terms: &SearchTerms,
    limit: u32,
    cursor: Option<&ChatCursor>,
) -> Result<Vec<SearchHit>, StoreError> {
    // The latest matching message per chat: SQLite takes the other columns of a MAX()
    // aggregate from the row that holds the maximum.
    let sql = format!(
        "SELECT {chat}, h.message_id, h.content AS message_text FROM chats c \
         LEFT JOIN (SELECT m.chat_id, m.id AS message_id, m.content, MAX(m.seq) AS seq \
             FROM messages_fts JOIN messages m ON m.rowid = messages_fts.rowid \
             WHERE messages_fts MATCH $1 \
             AND m.chat_id IN (SELECT id FROM chats WHERE user_id = $2) \
             GROUP BY m.chat_id) h ON h.chat_id = c.id \
         WHERE c.user_id = $2 \
         AND (h.chat_id IS NOT NULL \
             OR c.rowid IN (SELECT rowid FROM chats_fts WHERE chats_fts MATCH $1)) \
         AND (c.updated_at < $3 OR (c.updated_at = $3 AND c.id < $4)) \
         ORDER BY c.updated_at DESC, c.id DESC LIMIT $5",
        chat = prefixed_chat_columns()
    );
    let (after_time, after_id) = ChatCursor::keyset(cursor);
    let rows = sqlx::query(&sql)
        .bind(terms.fts5_query())
        .bind(user_id)
        .bind(after_time)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    rows.iter().map(hit_from).collect()
}

pub(super) async fn search_postgres(
    pool: &PgPool,
    failed: fn(sqlx::Error) -> StoreError,
    user_id: &str,
    terms: &SearchTerms,
    limit: u32,
    cursor: Option<&ChatCursor>,
) -> Result<Vec<SearchHit>, StoreError> {
    // `to_tsvector('simple', …)` and the status filter are exactly the indexes' expressions
    // (migrations/postgres/0003_search.sql), so both lookups use them.
    let sql = format!(
        "WITH q AS (SELECT to_tsquery('simple', $1) AS q), \
         hits AS (SELECT DISTINCT ON (m.chat_id) m.chat_id, m.id AS message_id, m.content \
             FROM messages m JOIN chats mc ON mc.id = m.chat_id, q \
             WHERE mc.user_id = $2 AND m.status <> 'streaming' \
             AND to_tsvector('simple', m.content) @@ q.q \
             ORDER BY m.chat_id, m.seq DESC) \
         SELECT {chat}, h.message_id, h.content AS message_text \
         FROM chats c LEFT JOIN hits h ON h.chat_id = c.id, q \
         WHERE c.user_id = $2 \
         AND (h.chat_id IS NOT NULL OR to_tsvector('simple', c.title) @@ q.q) \
         AND (c.updated_at < $3 OR (c.updated_at = $3 AND c.id < $4)) \
         ORDER BY c.updated_at DESC, c.id DESC LIMIT $5",
        chat = prefixed_chat_columns()
    );
    let (after_time, after_id) = ChatCursor::keyset(cursor);
    let rows = sqlx::query(&sql)
        .bind(terms.tsquery())
        .bind(user_id)
        .bind(after_time)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
        .map_err(failed)?;
    rows.iter().map(hit_from).collect()
}

/// `c.id, c.user_id, …`: the chat columns, from the table aliased `c`.
fn prefixed_chat_columns() -> String {
    let columns: Vec<String> = CHAT_COLUMNS.split(", ").map(|c| format!("c.{c}")).collect();
    columns.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_its_words_and_nothing_a_query_language_could_read() {
        let terms = SearchTerms::parse("  Rust's \"borrow\" NEAR(checker) -x* ").unwrap();
        assert_eq!(
            terms.terms(),
            ["rust", "s", "borrow", "near", "checker", "x"]
        );
        assert_eq!(
            terms.fts5_query(),
            "\"rust\"* \"s\"* \"borrow\"* \"near\"* \"checker\"* \"x\"*"
        );
        assert_eq!(
            SearchTerms::parse("café 42").unwrap().tsquery(),
            "'café':* & '42':*"
        );
        assert_eq!(SearchTerms::parse(" ?! - "), None);
        assert_eq!(
            SearchTerms::parse(&"w ".repeat(20)).unwrap().terms().len(),
            8
        );
    }

    #[test]
    fn a_snippet_shows_the_first_match_in_context() {
        let terms = SearchTerms::parse("lisbon").unwrap();
        let text = format!(
            "{} Three days in Lisbon:\n\nfirst the tram",
            "word ".repeat(40)
        );
        let snippet = terms.snippet(&text);
        assert!(snippet.starts_with('…'), "{snippet}");
        assert!(
            snippet.contains("Three days in Lisbon: first the tram"),
            "{snippet}"
        );
        assert_eq!(terms.snippet("short Lisbon"), "short Lisbon");
        // Not inside a word: "unlisbon" is no match, so the line starts at the text's start.
        assert_eq!(terms.snippet("unlisbon x"), "unlisbon x");
    }
}
