-- An org's rate limit (SPEC §3), set by `sluice orgs set-limit`: messages per second and the
-- burst above it. NULL: the server's `org_events_per_second`.
ALTER TABLE orgs ADD COLUMN events_per_second INTEGER;
ALTER TABLE orgs ADD COLUMN events_burst INTEGER;
