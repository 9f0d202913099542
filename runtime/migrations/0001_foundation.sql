-- Foundation: intake records with their outbox, subscriptions, consent history,
-- routing decisions, delivery receipts, and the reference agencies' own store.

CREATE TABLE intake_record (
    reference           text PRIMARY KEY,
    event_id            uuid NOT NULL UNIQUE,
    event_type          text NOT NULL,
    subject_id          text NOT NULL,
    registration_office text NOT NULL,
    recorded_by         text NOT NULL,
    idempotency_key     text UNIQUE,
    request_fingerprint text,
    recorded_at         timestamptz NOT NULL DEFAULT now()
);

-- Written in the same transaction as intake_record; the relay publishes it.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL REFERENCES intake_record (event_id),
    topic         text NOT NULL,
    message_key   bytea NOT NULL,
    message_value bytea NOT NULL,
    headers       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Modelled on the Dutch BRP authorisation row (afnemersindicatie).
CREATE TABLE subscription (
    id          bigserial PRIMARY KEY,
    agency      text NOT NULL CHECK (agency ~ '^[a-z][a-z0-9-]{1,39}$'),
    event_type  text NOT NULL,
    fields      text[],
    legal_basis text NOT NULL CHECK (legal_basis IN ('statutory', 'consent')),
    statute     text,
    condition   jsonb,
    valid_from  timestamptz,  -- NULL: no start limit
    valid_to    timestamptz,  -- NULL: open-ended
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    UNIQUE (agency, event_type),
    CHECK (legal_basis <> 'statutory' OR statute IS NOT NULL)
);

-- Append-only; the current choice is the latest row per subject, agency and type.
CREATE TABLE consent_record (
    id          bigserial PRIMARY KEY,
    subject_id  text NOT NULL,
    agency      text NOT NULL,
    event_type  text NOT NULL,
    choice      text NOT NULL CHECK (choice IN ('given', 'refused', 'withdrawn')),
    recorded_by text NOT NULL CHECK (recorded_by IN ('informant', 'citizen', 'proxy')),
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX consent_record_lookup ON consent_record (subject_id, agency, event_type, id DESC);

CREATE VIEW current_consent AS
SELECT DISTINCT ON (subject_id, agency, event_type)
       subject_id, agency, event_type, choice, recorded_by, recorded_at
  FROM consent_record
 ORDER BY subject_id, agency, event_type, id DESC;

CREATE TABLE routing_decision (
    event_id    uuid NOT NULL,
    agency      text NOT NULL,
    event_type  text NOT NULL,
    outcome     text NOT NULL,
    legal_basis text,
    decided_at  timestamptz NOT NULL,
    PRIMARY KEY (event_id, agency)
);

CREATE TABLE delivery_receipt (
    event_id    uuid NOT NULL,
    agency      text NOT NULL,
    outcome     text NOT NULL,
    reason      text,
    issued_at   timestamptz NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, agency, outcome)
);

-- The reference agencies' own store: what each has seen and done (de-duplication).
CREATE SCHEMA agency;
CREATE TABLE agency.inbox (
    agency     text NOT NULL,
    event_id   uuid NOT NULL,
    event_type text NOT NULL,
    outcome    text NOT NULL,
    reason     text,
    handled_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agency, event_id)
);
