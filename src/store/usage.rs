//! Reading the usage ledger: tokens and turns over a time range, by day, bot or user. One query
//! for both stores (sqlx binds `$n` on SQLite too); only the day's expression differs.

use sqlx::Row;

use super::StoreError;

/// How usage is summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGrouping {
    /// UTC days, `YYYY-MM-DD`.
    Day,
    Bot,
    User,
}

/// Which part of the ledger: one user's (`None`: everyone's) turns that ended in
/// `from_ms..to_ms`.
#[derive(Debug, Clone, Copy)]
pub struct UsageQuery<'a> {
    pub user_id: Option<&'a str>,
    pub from_ms: i64,
    pub to_ms: i64,
    pub group_by: UsageGrouping,
}

/// One group's sums, in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The day, bot or user.
    pub key: String,
    pub turns: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The most groups one answer has (a range of years by day stays under it).
pub const MAX_USAGE_ROWS: i64 = 10_000;

fn sql(query: &UsageQuery<'_>, day: &str) -> String {
    let key = match query.group_by {
        UsageGrouping::Day => day,
        UsageGrouping::Bot => "bot_id",
        UsageGrouping::User => "user_id",
    };
    format!(
        "SELECT {key} AS key, COUNT(*) AS turns, SUM(input_tokens) AS input_tokens, \
         SUM(output_tokens) AS output_tokens FROM usage_ledger \
         WHERE ($1 IS NULL OR user_id = $1) AND ended_at >= $2 AND ended_at < $3 \
         GROUP BY 1 ORDER BY 1 LIMIT {MAX_USAGE_ROWS}"
    )
}

fn row_from<R: Row>(row: &R) -> Result<UsageRow, sqlx::Error>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    usize: sqlx::ColumnIndex<R>,
{
    let count = |i: usize| row.try_get::<i64, _>(i).map(|n| n.max(0) as u64);
    Ok(UsageRow {
        key: row.try_get(0)?,
        turns: count(1)?,
        input_tokens: count(2)?,
        output_tokens: count(3)?,
    })
}

pub(super) async fn usage_sqlite(
    pool: &sqlx::SqlitePool,
    query: UsageQuery<'_>,
) -> Result<Vec<UsageRow>, StoreError> {
    let sql = sql(&query, "strftime('%Y-%m-%d', ended_at / 1000, 'unixepoch')");
    let rows = sqlx::query(&sql)
        .bind(query.user_id)
        .bind(query.from_ms)
        .bind(query.to_ms)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(row_from).collect::<Result<_, _>>()?)
}

pub(super) async fn usage_postgres(
    pool: &sqlx::PgPool,
    unavailable: fn(sqlx::Error) -> StoreError,
    query: UsageQuery<'_>,
) -> Result<Vec<UsageRow>, StoreError> {
    let day = "to_char(to_timestamp(ended_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')";
    // SUM of BIGINT is NUMERIC on PostgreSQL: back to BIGINT for one row type on both stores.
    let sql = sql(&query, day)
        .replace("SUM(input_tokens)", "SUM(input_tokens)::BIGINT")
        .replace("SUM(output_tokens)", "SUM(output_tokens)::BIGINT")
        .replace("$1 IS NULL", "$1::TEXT IS NULL");
    let rows = sqlx::query(&sql)
        .bind(query.user_id)
        .bind(query.from_ms)
        .bind(query.to_ms)
        .fetch_all(pool)
        .await
        .map_err(unavailable)?;
    rows.iter()
        .map(row_from)
        .collect::<Result<_, _>>()
        .map_err(unavailable)
}
