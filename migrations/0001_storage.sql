-- dstore's catalog and journal in cluster mode (storage.backend = "postgresql"). Runs in the schema
-- named by storage.schema ("dstore" by default), which is first on the search path.

-- One row per project name, kept after a drop so revisions and epochs only ever grow.
CREATE TABLE projects (
    name     TEXT PRIMARY KEY,
    -- The last revision handed out: updated once per batch inside the batch's transaction, so the
    -- row lock makes revisions gap-free and in commit order.
    revision BIGINT NOT NULL DEFAULT 0,
    -- Moves whenever the live versions change; a write prepared against another epoch is refused.
    epoch    BIGINT NOT NULL DEFAULT 0,
    -- Counts every change of the project's catalog records: a node never replaces its copy of a
    -- project by an older one (a slow full reload racing a newer edit).
    changes  BIGINT NOT NULL DEFAULT 0,
    live     BOOLEAN NOT NULL DEFAULT TRUE,
    working  JSONB NOT NULL
);

-- Frozen versions (written once) and what happened to them since.
CREATE TABLE versions (
    project TEXT NOT NULL,
    number  INTEGER NOT NULL,
    body    JSONB NOT NULL,
    PRIMARY KEY (project, number)
);
CREATE TABLE version_status (
    project TEXT NOT NULL,
    number  INTEGER NOT NULL,
    status  JSONB NOT NULL,
    PRIMARY KEY (project, number)
);

-- Every accepted write and every migration or drop, in revision order per project. `task` is the
-- task in the journal's task format; `projectors` names the only projectors a row is for (a
-- retried dead letter, a migration queued again), NULL meaning every one.
CREATE TABLE journal (
    project    TEXT NOT NULL,
    revision   BIGINT NOT NULL,
    task       BYTEA NOT NULL,
    projectors TEXT[],
    PRIMARY KEY (project, revision)
);

-- The latest accepted state of each item, for reads and back-fills.
CREATE TABLE items (
    project   TEXT NOT NULL,
    blueprint TEXT NOT NULL,
    id        UUID NOT NULL,
    revision  BIGINT NOT NULL,
    record    BYTEA NOT NULL,
    PRIMARY KEY (project, blueprint, id)
);

-- How far each projector got in each project, and which node holds it (a lease that expires).
CREATE TABLE cursors (
    projector   TEXT NOT NULL,
    project     TEXT NOT NULL,
    revision    BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ,
    -- A failed migration holds the project back until then; the others go on.
    held_until  TIMESTAMPTZ,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    PRIMARY KEY (projector, project)
);

CREATE TABLE dead_letters (
    projector TEXT NOT NULL,
    project   TEXT NOT NULL,
    revision  BIGINT NOT NULL,
    letter    JSONB NOT NULL,
    PRIMARY KEY (projector, project, revision)
);

-- Back-fills of new versions (projectors = '' for every projector), leased like cursors.
CREATE TABLE backfills (
    project     TEXT NOT NULL,
    version     INTEGER NOT NULL,
    projectors  TEXT NOT NULL DEFAULT '',
    state       JSONB NOT NULL,
    finished    BOOLEAN NOT NULL DEFAULT FALSE,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ,
    PRIMARY KEY (project, version, projectors)
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('journal_id', gen_random_uuid()::text);
