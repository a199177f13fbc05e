-- What every turn used, one row per answer, written in the statement that concludes it (so
-- exactly once). Kept when its chat is deleted: a deleted chat's tokens were still spent.
CREATE TABLE usage_ledger (
    message_id     TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    chat_id        TEXT NOT NULL,
    bot_id         TEXT NOT NULL,
    provider       TEXT,
    model          TEXT,
    status         TEXT NOT NULL,
    input_tokens   BIGINT NOT NULL,
    output_tokens  BIGINT NOT NULL,
    -- as the provider reported them, or counted by Mangoo when it reported none
    reported       BOOLEAN NOT NULL,
    first_token_ms BIGINT,
    duration_ms    BIGINT,
    ended_at       BIGINT NOT NULL
);

CREATE INDEX usage_ledger_by_user ON usage_ledger (user_id, ended_at);
CREATE INDEX usage_ledger_by_time ON usage_ledger (ended_at);
