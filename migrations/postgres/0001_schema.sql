-- Chats and their messages on PostgreSQL: the same columns and meanings as the SQLite schema
-- (times in epoch milliseconds, ids opaque text), plus two functions so that each half of a turn
-- is one round trip whatever it checks.
CREATE TABLE chats (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    bot_id        TEXT NOT NULL,
    title         TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    -- id of the last SSE event sent for this chat; event ids grow across turns
    last_event_id BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX chats_by_user_recent ON chats (user_id, updated_at DESC, id DESC);

CREATE TABLE messages (
    id              TEXT PRIMARY KEY,
    chat_id         TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content         TEXT NOT NULL,
    status          TEXT NOT NULL
                    CHECK (status IN ('streaming', 'complete', 'interrupted', 'stopped', 'error')),
    error_code      TEXT,
    input_tokens    BIGINT,
    output_tokens   BIGINT,
    created_at      BIGINT NOT NULL,
    first_event_id  BIGINT,
    chunks          TEXT,
    error_message   TEXT,
    error_retryable BOOLEAN,
    provider        TEXT,
    model           TEXT,
    -- while streaming: ids reserved by the last partial save; once finished: the terminal's id
    last_event_id   BIGINT,
    UNIQUE (chat_id, seq)
);

CREATE INDEX messages_streaming ON messages (chat_id) WHERE status = 'streaming';

-- What each user stores, kept current by triggers so a turn's quota check is one row read.
CREATE TABLE user_usage (
    user_id TEXT PRIMARY KEY,
    chats   BIGINT NOT NULL DEFAULT 0,
    bytes   BIGINT NOT NULL DEFAULT 0
);

CREATE FUNCTION mangoo_usage_chats() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO user_usage (user_id, chats) VALUES (NEW.user_id, 1)
        ON CONFLICT (user_id) DO UPDATE SET chats = user_usage.chats + 1;
        RETURN NEW;
    END IF;
    -- Before the cascade removes the messages: their bytes go with the chat. The cascade's own
    -- message triggers then find no chat and change nothing.
    UPDATE user_usage SET chats = chats - 1,
        bytes = bytes - (SELECT COALESCE(SUM(octet_length(content)), 0)
                         FROM messages WHERE chat_id = OLD.id)
    WHERE user_id = OLD.user_id;
    RETURN OLD;
END $$;

CREATE TRIGGER usage_chat_created AFTER INSERT ON chats
    FOR EACH ROW EXECUTE FUNCTION mangoo_usage_chats();
CREATE TRIGGER usage_chat_deleted BEFORE DELETE ON chats
    FOR EACH ROW EXECUTE FUNCTION mangoo_usage_chats();

CREATE FUNCTION mangoo_usage_messages() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta BIGINT;
    chat  TEXT;
BEGIN
    IF TG_OP = 'INSERT' THEN
        delta := octet_length(NEW.content); chat := NEW.chat_id;
    ELSIF TG_OP = 'UPDATE' THEN
        delta := octet_length(NEW.content) - octet_length(OLD.content); chat := NEW.chat_id;
    ELSE
        delta := -octet_length(OLD.content); chat := OLD.chat_id;
    END IF;
    IF delta <> 0 THEN
        UPDATE user_usage SET bytes = bytes + delta
        WHERE user_id = (SELECT user_id FROM chats WHERE id = chat);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER usage_message_added AFTER INSERT ON messages
    FOR EACH ROW EXECUTE FUNCTION mangoo_usage_messages();
CREATE TRIGGER usage_message_changed AFTER UPDATE OF content ON messages
    FOR EACH ROW EXECUTE FUNCTION mangoo_usage_messages();
CREATE TRIGGER usage_message_deleted AFTER DELETE ON messages
    FOR EACH ROW EXECUTE FUNCTION mangoo_usage_messages();

-- The first half of a turn: the user's message and a streaming placeholder for the answer, after
-- every check, in one statement; the answer holds p_reserved_ids event ids from its start (see
-- the store's RESERVED_EVENT_IDS). Returns the chat's last event id before this turn. Refusals
-- are errors with their own SQLSTATEs (the store maps them): MG001 no such chat of this user,
-- MG002 an answer is streaming, MG003 chat quota, MG004 bytes quota, MG005 turns quota.
CREATE FUNCTION mangoo_begin_turn(
    p_chat TEXT, p_user TEXT, p_new_chat BOOLEAN, p_bot TEXT, p_title TEXT,
    p_user_message TEXT, p_answer TEXT, p_message TEXT, p_now BIGINT,
    p_max_chats BIGINT, p_max_bytes BIGINT, p_max_turns BIGINT, p_reserved_ids BIGINT
) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    v_chats BIGINT;
    v_bytes BIGINT;
    v_last  BIGINT := 0;
    v_seq   BIGINT := 0;
BEGIN
    -- One user's turns take this row's lock in turn, so two of them cannot both pass a quota
    -- that only one fits under.
    INSERT INTO user_usage (user_id) VALUES (p_user) ON CONFLICT (user_id) DO NOTHING;
    SELECT chats, bytes INTO v_chats, v_bytes FROM user_usage WHERE user_id = p_user FOR UPDATE;
    IF p_new_chat AND v_chats >= p_max_chats THEN
        RAISE EXCEPTION 'chat quota' USING ERRCODE = 'MG003';
    END IF;
    IF v_bytes + octet_length(p_message) > p_max_bytes THEN
        RAISE EXCEPTION 'bytes quota' USING ERRCODE = 'MG004';
    END IF;
    IF p_new_chat THEN
        INSERT INTO chats (id, user_id, bot_id, title, created_at, updated_at, last_event_id)
        VALUES (p_chat, p_user, p_bot, p_title, p_now, p_now, 0);
    ELSE
        UPDATE chats SET updated_at = p_now WHERE id = p_chat AND user_id = p_user
        RETURNING last_event_id INTO v_last;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'chat not found' USING ERRCODE = 'MG001';
        END IF;
        IF EXISTS (SELECT 1 FROM messages WHERE chat_id = p_chat AND status = 'streaming') THEN
            RAISE EXCEPTION 'chat busy' USING ERRCODE = 'MG002';
        END IF;
        SELECT COALESCE(MAX(seq), 0) INTO v_seq FROM messages WHERE chat_id = p_chat;
        IF v_seq / 2 >= p_max_turns THEN
            RAISE EXCEPTION 'turns quota' USING ERRCODE = 'MG005';
        END IF;
    END IF;
    INSERT INTO messages (id, chat_id, seq, role, content, status, created_at, first_event_id,
                          last_event_id)
    VALUES (p_user_message, p_chat, v_seq + 1, 'user', p_message, 'complete', p_now, NULL, NULL),
           (p_answer, p_chat, v_seq + 2, 'assistant', '', 'streaming', p_now, v_last + 1,
            v_last + p_reserved_ids);
    RETURN v_last;
END $$;
