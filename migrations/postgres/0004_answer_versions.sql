-- Earlier versions of an answer, kept when it is regenerated: the answer that stood at `seq`
-- (its place in the chat) before a new one took that place. Rewinding past `seq` removes them.
CREATE TABLE answer_versions (
    id          TEXT PRIMARY KEY,
    chat_id     TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    content     TEXT NOT NULL,
    status      TEXT NOT NULL,
    error_code  TEXT,
    created_at  BIGINT NOT NULL,
    replaced_at BIGINT NOT NULL
);

CREATE INDEX answer_versions_by_place ON answer_versions (chat_id, seq, replaced_at);
