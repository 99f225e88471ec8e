CREATE SCHEMA IF NOT EXISTS "snap_v1";
COMMENT ON SCHEMA "snap_v1" IS 'dstore project snap, version 1';
CREATE TABLE IF NOT EXISTS "snap_v1"."_tombstones" (table_name TEXT NOT NULL, id UUID NOT NULL, _revision BIGINT NOT NULL, PRIMARY KEY (table_name, id));
CREATE TABLE IF NOT EXISTS "snap_v1"."_blueprints" (blueprint TEXT PRIMARY KEY, table_name TEXT NOT NULL, definition JSONB NOT NULL);
CREATE TABLE IF NOT EXISTS "snap_v1"."places" (
  id UUID PRIMARY KEY,
  project_version INTEGER NOT NULL,
  links UUID[] NOT NULL DEFAULT '{}',
  _revision BIGINT NOT NULL,
  "name" VARCHAR(80) NOT NULL UNIQUE,
  "kind" TEXT DEFAULT 'it''s a shop'::TEXT,
  "at" GEOMETRY(Point,4326) DEFAULT ST_SetSRID(ST_GeomFromGeoJSON('{"type":"Point","coordinates":[1.5,2.5]}'), 4326),
  "opened" TIMESTAMPTZ DEFAULT '2020-01-02 03:04:05+00'::TIMESTAMPTZ,
  "tags" TEXT[] DEFAULT ARRAY['a'::TEXT, 'b'::TEXT]::TEXT[],
  "none" INTEGER[] DEFAULT '{}'::INTEGER[],
  "meta" JSONB DEFAULT '{"k":"v''"}'::JSONB,
  "rating" REAL NOT NULL DEFAULT '2.5'::REAL
);
CREATE INDEX IF NOT EXISTS "places_kind_idx" ON "snap_v1"."places" USING btree ("kind");
CREATE INDEX IF NOT EXISTS "places_at_idx" ON "snap_v1"."places" USING gist ("at");
CREATE INDEX IF NOT EXISTS "places_tags_idx" ON "snap_v1"."places" USING gin ("tags");
COMMENT ON COLUMN "snap_v1"."places"."name" IS 'the place''s name';
