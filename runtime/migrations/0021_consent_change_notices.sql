-- Telling agencies of a withdrawal: when consent stops (withdrawn or refused), the
-- consent page writes a signed ConsentChanged message to the outbox in the same
-- transaction as the consent record; the relay publishes it to the consent-changes
-- topic and the router passes it on to each agency that holds the person's data
-- under that consent (see router/consent_changes.py).

-- The message's id, on the consent record it announces (NULL: nothing was sent, as
-- for a consent given, or for choices recorded before this migration).
ALTER TABLE consent_record ADD COLUMN change_id uuid UNIQUE;

-- The outbox now also carries consent changes, whose id is no intake event's.
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_event_id_fkey;

-- The router's answer for each consent change: whether the agency held data under
-- that consent and was therefore told. Written before the router's Kafka transaction
-- commits and only ever for a message that transaction then carries (it is routed
-- again until it commits); the agency's receipt is in delivery_receipt under change_id.
CREATE TABLE consent_notice (
    change_id  uuid NOT NULL,
    agency     text NOT NULL CHECK (agency ~ '^[a-z][a-z0-9-]{1,39}$'),
    told       boolean NOT NULL,
    decided_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (change_id, agency)
);

-- The SDK's store remembers whom each event was about, so that an agency told of a
-- withdrawal can find what it received under that consent (docs/agencies.md).
ALTER TABLE agency.inbox ADD COLUMN subject_id text;
CREATE INDEX inbox_subject ON agency.inbox (agency, subject_id, event_type) WHERE subject_id IS NOT NULL;

-- The reference agencies' side: each consent change they were told of, and the
-- received events they no longer process because of it.

CREATE TABLE agency.consent_withdrawal (
    agency        text NOT NULL,
    change_id     uuid NOT NULL,
    subject_id    text NOT NULL,
    event_type    text NOT NULL,
    choice        text NOT NULL,
    recorded_by   text NOT NULL,
    recorded_at   timestamptz NOT NULL,
    events_stopped integer NOT NULL CHECK (events_stopped >= 0),
    handled_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agency, change_id)
);

CREATE TABLE agency.consent_stopped (
    agency     text NOT NULL,
    event_id   uuid NOT NULL,
    change_id  uuid NOT NULL,
    stopped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agency, event_id),
    FOREIGN KEY (agency, change_id) REFERENCES agency.consent_withdrawal (agency, change_id)
);
