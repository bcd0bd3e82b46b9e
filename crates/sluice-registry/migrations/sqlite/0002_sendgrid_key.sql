-- The org's SendGrid Event Webhook verification key (base64 DER of an ECDSA P-256 public key),
-- set by `sluice orgs set-sendgrid-key`; NULL: webhook signatures are not checked.
ALTER TABLE orgs ADD COLUMN sendgrid_key TEXT;
