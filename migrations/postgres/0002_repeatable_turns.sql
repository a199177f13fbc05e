-- A turn's start may be sent twice: its first reply can be lost with a connection that broke
-- after the commit. The second call finds the turn it wrote (by the caller's message ids, for
-- the same user and chat) and returns what the first returned, instead of failing on the ids.
CREATE OR REPLACE FUNCTION mangoo_begin_turn(
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
    SELECT m.first_event_id - 1 INTO v_last
    FROM messages m JOIN chats c ON c.id = m.chat_id
    WHERE m.id = p_answer AND m.chat_id = p_chat AND c.user_id = p_user;
    IF FOUND THEN
        RETURN v_last;
    END IF;
    v_last := 0;
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
