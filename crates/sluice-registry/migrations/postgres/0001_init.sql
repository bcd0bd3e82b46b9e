-- Orgs, their API keys (only a SHA-256 of each key is stored) and banned users: the same
-- tables as the SQLite registry's.
CREATE TABLE orgs (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    active      BOOLEAN NOT NULL DEFAULT TRUE,
    created_at  BIGINT  NOT NULL
);

CREATE TABLE api_keys (
    key_hash    TEXT    PRIMARY KEY,
    org_id      BIGINT  NOT NULL REFERENCES orgs(id),
    -- first characters of the key, so an operator can tell keys apart without the secret
    key_prefix  TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL
);
CREATE INDEX api_keys_org ON api_keys(org_id);

CREATE TABLE banned_users (
    org_id      BIGINT  NOT NULL REFERENCES orgs(id),
    user_id     TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    PRIMARY KEY (org_id, user_id)
);
