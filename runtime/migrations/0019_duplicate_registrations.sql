-- Duplicate registrations: a person is registered dead once, a child born once.
--
-- Each death or birth claims what identifies its subject (producers/duplicates.py
-- says what that is). A claim is a keyed hash or the pseudonymous subject id, never
-- the name or NINO in clear. The partial unique index lets only one current claim
-- hold each value, so two simultaneous duplicates cannot both be stored: the second
-- insert waits for the first transaction and then fails. A void releases its
-- registration's claims; a supervisor's override stores claims that hold nothing.
CREATE TABLE registration_claim (
    claim       text NOT NULL CHECK (length(claim) BETWEEN 1 AND 200),
    event_id    uuid NOT NULL REFERENCES intake_record (event_id),
    overridden  boolean NOT NULL DEFAULT false,  -- recorded over an existing registration
    released_at timestamptz,                     -- the registration was voided
    PRIMARY KEY (claim, event_id)
);
CREATE UNIQUE INDEX registration_claim_held ON registration_claim (claim)
    WHERE released_at IS NULL AND NOT overridden;
CREATE INDEX registration_claim_event ON registration_claim (event_id);

-- A supervisor recorded a registration although it duplicates an existing one:
-- who, when, why, and which registration it duplicates.
CREATE TABLE duplicate_override (
    event_id           uuid PRIMARY KEY REFERENCES intake_record (event_id),
    existing_reference text NOT NULL REFERENCES intake_record (reference),
    reason             text NOT NULL CHECK (length(reason) BETWEEN 3 AND 500),
    overridden_by      text NOT NULL CHECK (length(overridden_by) BETWEEN 1 AND 200),
    overridden_at      timestamptz NOT NULL DEFAULT now()
);

-- Deaths recorded before this migration, where the NINO was known: their claim is
-- their subject id (already a keyed hash of the NINO), so it can be made here; the
-- earliest current one per subject holds it. Deaths without a NINO and births need
-- the pseudonym key and the sealed payload, which SQL has not: they claim nothing.
INSERT INTO registration_claim (claim, event_id)
SELECT DISTINCT ON (i.subject_id) 'death:' || i.subject_id, i.event_id
  FROM intake_record i
 WHERE i.event_type = 'DeathRegistered'
   AND i.subject_id LIKE 'n-%'
   AND NOT EXISTS (SELECT 1 FROM intake_record v
                    WHERE v.follows_event_id = i.event_id AND v.event_type = 'EventVoided')
 ORDER BY i.subject_id, i.recorded_at, i.reference;
