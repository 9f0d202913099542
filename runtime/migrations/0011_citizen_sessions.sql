-- Citizens' sign-in through an OpenID Connect provider.
--
-- A sign-in under way: the browser holds a random token in a short-lived cookie;
-- the row (found by the SHA-256 of the ``state`` sent to the provider) holds that
-- token's SHA-256, the ``nonce`` and the PKCE code verifier. It is deleted when the
-- provider's answer comes back, used or not, and is only honoured for ten minutes.
CREATE TABLE citizen_sign_in (
    state_hash    bytea PRIMARY KEY CHECK (length(state_hash) = 32),
    browser_hash  bytea NOT NULL CHECK (length(browser_hash) = 32),
    nonce         text NOT NULL,
    code_verifier text NOT NULL,
    return_to     text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX citizen_sign_in_created ON citizen_sign_in (created_at);

-- Signed-in citizens, kept server-side like registrars' sessions: only the cookie
-- token's SHA-256 is stored. The citizen is known by a pseudonymous subject id
-- (a keyed hash of their NINO, never the NINO itself); the name to greet them by
-- is sealed, bound to the session.
CREATE TABLE citizen_session (
    token_hash   bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    subject_id   text NOT NULL,
    display_name bytea NOT NULL,
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX citizen_session_subject ON citizen_session (subject_id);
CREATE INDEX citizen_session_last_seen ON citizen_session (last_seen_at);
