-- The change feed (see `feed`): the items' latest state by revision, deletes kept as tombstones
-- (one per deleted item, replaced when it is deleted again, removed when it is written again), and
-- the revision up to which a project's changes are no longer kept.
CREATE INDEX items_by_revision ON items (project, revision);

CREATE TABLE tombstones (
    project    TEXT NOT NULL,
    revision   BIGINT NOT NULL,
    blueprint  TEXT NOT NULL,
    id         UUID NOT NULL,
    deleted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (project, revision)
);
CREATE UNIQUE INDEX tombstones_by_item ON tombstones (project, blueprint, id);

ALTER TABLE projects ADD COLUMN horizon BIGINT NOT NULL DEFAULT 0;
