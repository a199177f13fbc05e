-- The turns that start together begin in one transaction: one round trip and one commit (one
-- WAL flush) for all of them, and a user's usage row locked once for all of that user's turns
-- instead of once per turn, each holding it until its own commit.
--
-- The users' usage rows are locked first, in one order, so two batches (from two instances)
-- never wait on each other in a cycle. Each turn runs in its own block: a refusal (quota, busy,
-- not found, an id taken) is that turn's answer, and the rest of the batch goes on. At most a
-- few dozen turns come at once (the caller's batch), which keeps the blocks' subtransactions
-- within what a backend caches.
CREATE FUNCTION mangoo_begin_turns(
    p_chat TEXT[], p_user TEXT[], p_new_chat BOOLEAN[], p_bot TEXT[], p_title TEXT[],
    p_user_message TEXT[], p_answer TEXT[], p_message TEXT[], p_now BIGINT,
    p_max_chats BIGINT[], p_max_bytes BIGINT[], p_max_turns BIGINT[], p_reserved_ids BIGINT
) RETURNS TABLE (o_last_event_id BIGINT, o_refusal TEXT) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_usage (user_id)
    SELECT DISTINCT u FROM unnest(p_user) AS u ORDER BY 1
    ON CONFLICT (user_id) DO NOTHING;
    PERFORM 1 FROM user_usage WHERE user_id = ANY (p_user) ORDER BY user_id FOR UPDATE;
    FOR i IN 1 .. COALESCE(array_length(p_chat, 1), 0) LOOP
        BEGIN
            o_last_event_id := mangoo_begin_turn(
                p_chat[i], p_user[i], p_new_chat[i], p_bot[i], p_title[i], p_user_message[i],
                p_answer[i], p_message[i], p_now, p_max_chats[i], p_max_bytes[i],
                p_max_turns[i], p_reserved_ids);
            o_refusal := NULL;
        EXCEPTION
            WHEN SQLSTATE 'MG001' OR SQLSTATE 'MG002' OR SQLSTATE 'MG003'
                 OR SQLSTATE 'MG004' OR SQLSTATE 'MG005' OR unique_violation THEN
                o_last_event_id := NULL;
                o_refusal := SQLSTATE;
        END;
        RETURN NEXT;
    END LOOP;
END $$;
