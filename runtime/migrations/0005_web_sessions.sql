-- Registrars' web sessions, kept server-side. The browser holds a random token;
-- only its SHA-256 is stored. ``data`` holds the draft answers between form
-- steps (personal data), so a session row is deleted at sign-out and once it
-- has expired.

CREATE TABLE web_session (
    token_hash   bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    username     text NOT NULL REFERENCES registrar (username) ON DELETE CASCADE,
    csrf_token   text NOT NULL,
    data         jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX web_session_last_seen ON web_session (last_seen_at);

-- Failed sign-ins per attempted username (known or not, so the count reveals
-- nothing), to slow down password guessing.
CREATE TABLE sign_in_failure (
    username        text PRIMARY KEY CHECK (length(username) <= 100),
    failures        integer NOT NULL,
    first_failed_at timestamptz NOT NULL
);
