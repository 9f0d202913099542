-- Tokens for monitoring systems: they may read /metrics (counts per agency, no
-- personal data) and nothing else; they can neither submit nor look up events.
-- Registrars (people) keep the two roles they had.

ALTER TABLE api_token DROP CONSTRAINT api_token_role_check;
ALTER TABLE api_token ADD CONSTRAINT api_token_role_check
    CHECK (role IN ('registrar', 'supervisor', 'monitoring'));
