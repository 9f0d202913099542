-- Who may submit: registration offices, the registrars who sign in for them,
-- API tokens bound to an office, and each office's Ed25519 signing keys.

CREATE TABLE registration_office (
    code       text PRIMARY KEY CHECK (code ~ '^[a-z][a-z0-9-]{1,39}$'),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE registrar (
    username      text PRIMARY KEY CHECK (username ~ '^[a-z][a-z0-9._-]{1,59}$'),
    display_name  text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 200),
    office        text NOT NULL REFERENCES registration_office (code),
    role          text NOT NULL CHECK (role IN ('registrar', 'supervisor')),
    password_hash text NOT NULL,  -- argon2id, PHC string
    created_at    timestamptz NOT NULL DEFAULT now(),
    disabled_at   timestamptz
);

-- Bearer tokens for systems that submit through the API. Only a SHA-256 of the
-- secret is kept; the token is shown once, when issued.
CREATE TABLE api_token (
    id          uuid PRIMARY KEY,
    token_hash  bytea NOT NULL UNIQUE,
    office      text NOT NULL REFERENCES registration_office (code),
    role        text NOT NULL CHECK (role IN ('registrar', 'supervisor')),
    label       text NOT NULL CHECK (length(label) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);

-- One active key per office at a time; retired keys stay published so that old
-- events still verify.
CREATE TABLE office_signing_key (
    key_id      text PRIMARY KEY,
    office      text NOT NULL REFERENCES registration_office (code),
    public_key  bytea NOT NULL CHECK (length(public_key) = 32),
    private_key bytea NOT NULL CHECK (length(private_key) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz
);
CREATE UNIQUE INDEX office_signing_key_active ON office_signing_key (office) WHERE retired_at IS NULL;

-- A correction or void names the event it follows; a voided event takes no more.
ALTER TABLE intake_record ADD COLUMN follows_event_id uuid REFERENCES intake_record (event_id);
CREATE INDEX intake_record_follows ON intake_record (follows_event_id) WHERE follows_event_id IS NOT NULL;
