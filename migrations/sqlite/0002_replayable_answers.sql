-- Answers become replayable by Last-Event-ID: each keeps the id of its start event, its content
-- pieces as streamed, and what its terminal event said. Adds the 'stopped' status. SQLite cannot
-- alter a CHECK constraint, so the table is rebuilt.
CREATE TABLE messages_v2 (
    id              TEXT PRIMARY KEY NOT NULL,
    chat_id         TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content         TEXT NOT NULL,
    status          TEXT NOT NULL
                    CHECK (status IN ('streaming', 'complete', 'interrupted', 'stopped', 'error')),
    error_code      TEXT,
    input_tokens    INTEGER,
    output_tokens   INTEGER,
    created_at      INTEGER NOT NULL,
    first_event_id  INTEGER,
    chunks          TEXT,
    error_message   TEXT,
    error_retryable INTEGER,
    provider        TEXT,
    model           TEXT,
    UNIQUE (chat_id, seq)
);

INSERT INTO messages_v2 (id, chat_id, seq, role, content, status, error_code, input_tokens,
                         output_tokens, created_at)
SELECT id, chat_id, seq, role, content, status, error_code, input_tokens, output_tokens, created_at
FROM messages;

DROP TABLE messages;
ALTER TABLE messages_v2 RENAME TO messages;
CREATE INDEX messages_streaming ON messages (status) WHERE status = 'streaming';
