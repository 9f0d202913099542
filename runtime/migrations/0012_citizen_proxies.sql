-- Proxies: a person appointed to act for a citizen on the consent pages (a lasting
-- power of attorney, a deputy, an appointee for benefits). Both people are known
-- by their pseudonymous subject ids, never a NINO; the name the proxy sees ("act
-- for Amara Okafor") is sealed with the data key, bound to the appointment id.
--
-- An appointment covers every agency (agencies NULL) or the agencies listed; it is
-- good from valid_from until valid_to (NULL: open-ended) unless ended earlier.
-- Who recorded it and why are kept for accountability.
CREATE TABLE proxy_appointment (
    id               uuid PRIMARY KEY,
    proxy_subject_id text NOT NULL CHECK (proxy_subject_id ~ '^[ns]-[0-9a-f]{32}$'),
    subject_id       text NOT NULL CHECK (subject_id ~ '^[ns]-[0-9a-f]{32}$'),
    subject_name     bytea NOT NULL,
    agencies         text[] CHECK (agencies IS NULL OR cardinality(agencies) > 0),
    valid_from       timestamptz NOT NULL DEFAULT now(),
    valid_to         timestamptz,
    recorded_by      text NOT NULL CHECK (length(recorded_by) BETWEEN 1 AND 200),
    reason           text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    recorded_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at         timestamptz,
    CHECK (proxy_subject_id <> subject_id),
    CHECK (valid_to IS NULL OR valid_to > valid_from)
);
CREATE INDEX proxy_appointment_proxy ON proxy_appointment (proxy_subject_id);
CREATE INDEX proxy_appointment_subject ON proxy_appointment (subject_id);
