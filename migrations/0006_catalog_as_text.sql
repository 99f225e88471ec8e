-- A blueprint's columns keep the order its client gave them (the order of the public form, of an
-- item's members and of a table's columns): JSONB keeps an object's keys in an order of its own
-- (shorter keys first), JSON keeps the text as written. Rows written before keep the order JSONB
-- gave them. The revision a project was born at, which every projection batch reads, gets a
-- column of its own: read from JSON text it would parse the whole working copy each time.
ALTER TABLE projects ADD COLUMN born BIGINT NOT NULL DEFAULT 0;
UPDATE projects SET born = COALESCE((working->>'born')::bigint, 0);
ALTER TABLE projects ALTER COLUMN working TYPE JSON USING working::json;
ALTER TABLE versions ALTER COLUMN body TYPE JSON USING body::json;
