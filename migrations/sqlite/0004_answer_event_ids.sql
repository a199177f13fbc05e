-- The highest event id an answer may have used: while it streams, the ids reserved by its last
-- partial save (a crash can have sent no id above it); once finished, its terminal event's id.
ALTER TABLE messages ADD COLUMN last_event_id INTEGER;
