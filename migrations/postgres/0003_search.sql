-- Full-text search over a user's chats: titles and the text of finished messages. The 'simple'
-- configuration (lower-cased words, no stemming) treats every language alike. The expressions
-- here are exactly the ones the search query uses, so these indexes serve it.
CREATE INDEX chats_title_search ON chats USING GIN (to_tsvector('simple', title));
CREATE INDEX messages_text_search ON messages USING GIN (to_tsvector('simple', content))
    WHERE status <> 'streaming';
