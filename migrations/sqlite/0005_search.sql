-- Full-text search over a user's chats: their titles and the text of finished messages (an
-- answer becomes searchable when it ends; while it streams its text changes every second).
-- External-content FTS5 tables keyed by the rowids of `chats` and `messages`, kept current by
-- triggers. unicode61 folds case and diacritics, so "Café" finds "cafe".
CREATE VIRTUAL TABLE chats_fts USING fts5(
    title, content = 'chats', content_rowid = 'rowid', tokenize = 'unicode61 remove_diacritics 2'
);
CREATE VIRTUAL TABLE messages_fts USING fts5(
    content, content = 'messages', content_rowid = 'rowid',
    tokenize = 'unicode61 remove_diacritics 2'
);

INSERT INTO chats_fts (rowid, title) SELECT rowid, title FROM chats;
INSERT INTO messages_fts (rowid, content)
    SELECT rowid, content FROM messages WHERE status <> 'streaming';

CREATE TRIGGER chats_fts_insert AFTER INSERT ON chats BEGIN
    INSERT INTO chats_fts (rowid, title) VALUES (new.rowid, new.title);
END;
CREATE TRIGGER chats_fts_delete AFTER DELETE ON chats BEGIN
    INSERT INTO chats_fts (chats_fts, rowid, title) VALUES ('delete', old.rowid, old.title);
END;
CREATE TRIGGER chats_fts_rename AFTER UPDATE OF title ON chats BEGIN
    INSERT INTO chats_fts (chats_fts, rowid, title) VALUES ('delete', old.rowid, old.title);
    INSERT INTO chats_fts (rowid, title) VALUES (new.rowid, new.title);
END;

-- A message is in the index exactly while its status is not 'streaming'.
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages WHEN new.status <> 'streaming' BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.rowid, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages WHEN old.status <> 'streaming' BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
END;
CREATE TRIGGER messages_fts_unindex AFTER UPDATE OF content, status ON messages
    WHEN old.status <> 'streaming' BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
END;
CREATE TRIGGER messages_fts_index AFTER UPDATE OF content, status ON messages
    WHEN new.status <> 'streaming' BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.rowid, new.content);
END;
