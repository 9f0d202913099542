-- The informant's own journey (citizens.informants): the registrar's reference and a
-- second fact the registrar recorded (the date of birth of the person registered)
-- open it at /tell-us-once, for 28 days after the registration (a setting).
--
-- Wrong answers are counted per reference: after five the reference is locked, and
-- the informant is told to ask the register office. A right answer resets the count.
CREATE TABLE informant_reference_lock (
    reference     text PRIMARY KEY REFERENCES intake_record (reference),
    failures      integer NOT NULL CHECK (failures > 0),
    last_failed_at timestamptz NOT NULL DEFAULT now(),
    locked_at     timestamptz
);

-- Informants' sessions, kept as registrars' and citizens' are (runtime.web.sessions),
-- in a table and a cookie of their own: a session opens one registration only.
CREATE TABLE informant_session (
    token_hash   bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    reference    text NOT NULL REFERENCES intake_record (reference),
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX informant_session_last_seen ON informant_session (last_seen_at);
