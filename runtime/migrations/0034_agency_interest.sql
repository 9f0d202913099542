-- The people an agency holds records for and wants to hear about (the Dutch BRP's
-- afnemersindicatie): by pseudonymous subject id only; the NINOs it registers with are
-- turned into subject ids and not kept. A withdrawal deletes the row: the bus keeps no
-- trace that the agency once held the person's record. A subscription whose condition
-- says "registered_subjects" tells the agency only of these people (router.rules).
CREATE TABLE agency_interest (
    agency        text NOT NULL REFERENCES agency_account (agency),
    subject_id    text NOT NULL CHECK (subject_id ~ '^n-[0-9a-f]{32}$'),
    registered_at timestamptz NOT NULL DEFAULT now(),
    registered_by text NOT NULL,
    PRIMARY KEY (agency, subject_id)
);
-- The router reads it by subject, for each batch's subjects.
CREATE INDEX agency_interest_by_subject ON agency_interest (subject_id);
