-- API keys (the SHA-256 of their secrets, never the secrets) and the audit log, shared by every node.

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    record       JSONB NOT NULL,
    -- Kept apart from the record, so recording a use never undoes another node's change of the key.
    last_used_at TIMESTAMPTZ
);

CREATE TABLE audit (
    id    BIGSERIAL PRIMARY KEY,
    at    TIMESTAMPTZ NOT NULL,
    entry JSONB NOT NULL
);
CREATE INDEX audit_at ON audit (at);
