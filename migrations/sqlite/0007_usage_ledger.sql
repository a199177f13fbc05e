-- What every turn used, one row per answer, written in the transaction that concludes it (so
-- exactly once). Kept when its chat is deleted: a deleted chat's tokens were still spent.
CREATE TABLE usage_ledger (
    message_id     TEXT PRIMARY KEY NOT NULL,
    user_id        TEXT NOT NULL,
    chat_id        TEXT NOT NULL,
    bot_id         TEXT NOT NULL,
    provider       TEXT,
    model          TEXT,
    status         TEXT NOT NULL,
    input_tokens   INTEGER NOT NULL,
    output_tokens  INTEGER NOT NULL,
    -- 1: as the provider reported them; 0: counted by Mangoo (the provider reported none)
    reported       INTEGER NOT NULL,
    first_token_ms INTEGER,
    duration_ms    INTEGER,
    ended_at       INTEGER NOT NULL
);

CREATE INDEX usage_ledger_by_user ON usage_ledger (user_id, ended_at);
CREATE INDEX usage_ledger_by_time ON usage_ledger (ended_at);
