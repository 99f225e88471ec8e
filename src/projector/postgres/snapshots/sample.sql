CREATE SCHEMA IF NOT EXISTS "snap_v1";
COMMENT ON SCHEMA "snap_v1" IS 'dstore project snap, version 1';
CREATE TABLE IF NOT EXISTS "snap_v1"."_tombstones" (table_name TEXT NOT NULL, id UUID NOT NULL, _revision BIGINT NOT NULL, PRIMARY KEY (table_name, id));
CREATE TABLE IF NOT EXISTS "snap_v1"."_blueprints" (blueprint TEXT PRIMARY KEY, table_name TEXT NOT NULL, definition JSONB NOT NULL);
CREATE TABLE IF NOT EXISTS "snap_v1"."samples" (
  id UUID PRIMARY KEY,
  project_version INTEGER NOT NULL,
  links UUID[] NOT NULL DEFAULT '{}',
  _revision BIGINT NOT NULL,
  "title" VARCHAR(40),
  "body" TEXT,
  "owner" UUID,
  "place" GEOMETRY(Point,4326),
  "route" GEOMETRY(LineString,4326),
  "area" GEOMETRY(Polygon,4326),
  "day" DATE,
  "at" TIMESTAMPTZ,
  "ratio" REAL,
  "count" INTEGER,
  "done" BOOLEAN,
  "extra" JSONB,
  "tags" TEXT[],
  "stops" GEOMETRY(MultiPoint,4326),
  "counts" INTEGER[]
);
