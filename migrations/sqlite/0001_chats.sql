-- Chats and their messages. Times are epoch milliseconds; ids are opaque text.
CREATE TABLE chats (
    id            TEXT PRIMARY KEY NOT NULL,
    user_id       TEXT NOT NULL,
    bot_id        TEXT NOT NULL,
    title         TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    -- id of the last SSE event sent for this chat; event ids grow across turns
    last_event_id INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX chats_by_user_recent ON chats (user_id, updated_at DESC, id DESC);

CREATE TABLE messages (
    id            TEXT PRIMARY KEY NOT NULL,
    chat_id       TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content       TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('streaming', 'complete', 'interrupted', 'error')),
    error_code    TEXT,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    created_at    INTEGER NOT NULL,
    UNIQUE (chat_id, seq)
);

CREATE INDEX messages_streaming ON messages (status) WHERE status = 'streaming';
