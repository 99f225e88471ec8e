-- How much each version is written to, in hourly buckets (see `storage::usage`).
CREATE TABLE version_usage (
    project       TEXT NOT NULL,
    version       INTEGER NOT NULL,
    hour          BIGINT NOT NULL,
    writes        BIGINT NOT NULL,
    last_write_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project, version, hour)
);
