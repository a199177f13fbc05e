-- What each user stores, kept current by triggers so that a turn's quota check is one row read:
-- the number of chats and the bytes of every message's content. A chat's deletion subtracts its
-- messages before the cascade removes them (the cascade's own deletes then find no chat and
-- change nothing).
CREATE TABLE user_usage (
    user_id TEXT PRIMARY KEY NOT NULL,
    chats   INTEGER NOT NULL DEFAULT 0,
    bytes   INTEGER NOT NULL DEFAULT 0
);

INSERT INTO user_usage (user_id, chats, bytes)
SELECT c.user_id, COUNT(DISTINCT c.id), COALESCE(SUM(length(CAST(m.content AS BLOB))), 0)
FROM chats c LEFT JOIN messages m ON m.chat_id = c.id
GROUP BY c.user_id;

CREATE TRIGGER usage_chat_created AFTER INSERT ON chats BEGIN
    INSERT INTO user_usage (user_id, chats) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET chats = chats + 1;
END;

CREATE TRIGGER usage_chat_deleted BEFORE DELETE ON chats BEGIN
    UPDATE user_usage SET chats = chats - 1,
        bytes = bytes - (SELECT COALESCE(SUM(length(CAST(content AS BLOB))), 0)
                         FROM messages WHERE chat_id = OLD.id)
    WHERE user_id = OLD.user_id;
END;

CREATE TRIGGER usage_message_added AFTER INSERT ON messages BEGIN
    UPDATE user_usage SET bytes = bytes + length(CAST(NEW.content AS BLOB))
    WHERE user_id = (SELECT user_id FROM chats WHERE id = NEW.chat_id);
END;

CREATE TRIGGER usage_message_changed AFTER UPDATE OF content ON messages BEGIN
    UPDATE user_usage
    SET bytes = bytes + length(CAST(NEW.content AS BLOB)) - length(CAST(OLD.content AS BLOB))
    WHERE user_id = (SELECT user_id FROM chats WHERE id = NEW.chat_id);
END;

CREATE TRIGGER usage_message_deleted AFTER DELETE ON messages BEGIN
    UPDATE user_usage SET bytes = bytes - length(CAST(OLD.content AS BLOB))
    WHERE user_id = (SELECT user_id FROM chats WHERE id = OLD.chat_id);
END;
