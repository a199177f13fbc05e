//! `GET /api/v1/usage`: what the signed-in user spent, from the usage ledger, by day or bot.
//! `GET /api/v1/admin/usage`: the same across every user, for an operator (a token whose roles
//! claim holds `[auth] admin_role`), also by user or for one user.

use axum::Json;
use axum::extract::{RawQuery, State};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::AppState;
use super::chats::rfc3339;
use super::extract::{AuthUser, parse_query};
use crate::http::error::{ApiError, ErrorBody};
use crate::store::{UsageGrouping, UsageQuery, UsageRow, now_ms};

const DAY_MS: i64 = 86_400_000;
/// With no `from`: this many days before `to`.
const DEFAULT_DAYS: i64 = 30;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// The first day (`YYYY-MM-DD`, UTC) or moment (RFC 3339); default 30 days before `to`.
    #[serde(default)]
    from: Option<String>,
    /// The last day (included) or the moment the range ends (excluded); default now.
    #[serde(default)]
    to: Option<String>,
    /// `day` (default) or `bot`; the operator's view also `user`.
    #[serde(default)]
    group_by: Option<String>,
    /// The operator's view only: one user's usage.
    #[serde(default)]
    user_id: Option<String>,
}

/// Turns and tokens over a range, one entry per group, in key order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    from: String,
    to: String,
    group_by: &'static str,
    usage: Vec<UsageEntry>,
    total: UsageTotals,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageEntry {
    /// The group's key, under its name: `day`, `bot_id` or `user_id`.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    key: serde_json::Map<String, serde_json::Value>,
    #[serde(flatten)]
    totals: UsageTotals,
}

#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct UsageTotals {
    turns: u64,
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
}

impl UsageTotals {
    fn add(&mut self, row: &UsageRow) {
        self.turns += row.turns;
        self.input_tokens += row.input_tokens;
        self.output_tokens += row.output_tokens;
        self.total_tokens += row.input_tokens + row.output_tokens;
    }
}

#[utoipa::path(get, path = "/api/v1/usage", tag = "usage",
    params(UsageParams),
    responses(
        (status = 200, description = "The caller's turns and tokens by day or bot", body = UsageReport),
        (status = 400, description = "A bad date or grouping", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn my_usage(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    RawQuery(query): RawQuery,
) -> Result<Json<UsageReport>, ApiError> {
    let params: UsageParams = parse_query(query.as_deref())?;
    if params.user_id.is_some() || params.group_by.as_deref() == Some("user") {
        return Err(ApiError::bad_request(
            "invalid_request",
            "user_id and group_by=user are the operator's view: GET /api/v1/admin/usage",
        ));
    }
    report(&state, &user, false, params).await
}

#[utoipa::path(get, path = "/api/v1/admin/usage", tag = "usage",
    params(UsageParams),
    responses(
        (status = 200, description = "Every user's turns and tokens by day, bot or user", body = UsageReport),
        (status = 400, description = "A bad date or grouping", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token does not carry the admin role", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn all_usage(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    RawQuery(query): RawQuery,
) -> Result<Json<UsageReport>, ApiError> {
    let params: UsageParams = parse_query(query.as_deref())?;
    report(&state, &user, true, params).await
}

async fn report(
    state: &AppState,
    user: &crate::auth::UserId,
    everyone: bool,
    params: UsageParams,
) -> Result<Json<UsageReport>, ApiError> {
    let (group_by, key_name) = match params.group_by.as_deref() {
        None | Some("day") => (UsageGrouping::Day, "day"),
        Some("bot") => (UsageGrouping::Bot, "bot_id"),
        Some("user") => (UsageGrouping::User, "user_id"),
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("group_by must be day, bot or user, not '{other}'"),
            ));
        }
    };
    let to_ms = match &params.to {
        Some(to) => moment(to, "to", true)?,
        None => now_ms(),
    };
    let from_ms = match &params.from {
        Some(from) => moment(from, "from", false)?,
        None => to_ms - DEFAULT_DAYS * DAY_MS,
    };
    if from_ms > to_ms {
        return Err(ApiError::bad_request(
            "invalid_request",
            "from must not be after to",
        ));
    }
    let query = UsageQuery {
        user_id: params.user_id.as_deref(),
        from_ms,
        to_ms,
        group_by,
    };
    let rows = state.chat.usage(user, everyone, query).await?;
    let mut total = UsageTotals::default();
    let usage = rows
        .iter()
        .map(|row| {
            total.add(row);
            let mut totals = UsageTotals::default();
            totals.add(row);
            let mut key = serde_json::Map::new();
            key.insert(key_name.into(), row.key.clone().into());
            UsageEntry { key, totals }
        })
        .collect();
    Ok(Json(UsageReport {
        from: rfc3339(from_ms),
        to: rfc3339(to_ms),
        group_by: key_name.trim_end_matches("_id"),
        usage,
        total,
    }))
}

/// A day (`YYYY-MM-DD`, UTC: its start, or with `end_of_day` the next day's) or an RFC 3339
/// moment, in epoch milliseconds.
fn moment(text: &str, name: &str, end_of_day: bool) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "invalid_request",
            format!("{name} must be a day (YYYY-MM-DD) or an RFC 3339 time"),
        )
    };
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return i64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad());
    }
    let mut parts = text.splitn(3, '-');
    let (Some(year), Some(month), Some(day)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let number = |part: &str, digits: usize| {
        (part.len() == digits && part.bytes().all(|b| b.is_ascii_digit()))
            .then(|| part.parse::<i32>().ok())
            .flatten()
    };
    let (Some(year), Some(month), Some(day)) = (number(year, 4), number(month, 2), number(day, 2))
    else {
        return Err(bad());
    };
    let month = time::Month::try_from(month as u8).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(year, month, day as u8).map_err(|_| bad())?;
    let start = date.midnight().assume_utc().unix_timestamp() * 1000;
    Ok(start + if end_of_day { DAY_MS } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_moments_parse_and_bad_ones_do_not() {
        let day = moment("2026-12-08", "from", false).unwrap();
        assert_eq!(rfc3339(day), "2026-12-08T00:00:00Z");
        assert_eq!(moment("2026-12-08", "to", true).unwrap(), day + DAY_MS);
        assert_eq!(
            moment("2026-12-08T12:00:00Z", "to", true).unwrap(),
            day + DAY_MS / 2
        );
        for bad in ["2026-13-01", "2026-1-01", "yesterday", "2026-02-30", ""] {
            assert!(moment(bad, "from", false).is_err(), "{bad}");
        }
    }
}
