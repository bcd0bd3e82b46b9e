-- What a key may do (SPEC §3): `full` (everything), `write` (ingest only: a key for web
-- pages and SDKs), `read` (reads and search only). Keys made before scopes existed are full.
ALTER TABLE api_keys ADD COLUMN scope TEXT NOT NULL DEFAULT 'full';
