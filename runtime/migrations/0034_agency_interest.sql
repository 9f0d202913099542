-- The people an agency holds records for and wants to hear about (the Dutch BRP's
-- afnemersindicatie): by pseudonymous subject id only; the NINOs it registers with are
-- turned into subject ids and not kept. A subscription whose condition says
-- "registered_subjects" tells the agency only of these people (router.rules).
CREATE TABLE agency_interest (
    agency        text NOT NULL REFERENCES agency_account (agency),
    subject_id    text NOT NULL CHECK (subject_id ~ '^n-[0-9a-f]{32}$'),
    registered_at timestamptz NOT NULL DEFAULT now(),
    registered_by text NOT NULL,
    withdrawn_at  timestamptz,
    withdrawn_by  text,
    PRIMARY KEY (agency, subject_id),
    CHECK ((withdrawn_at IS NULL) = (withdrawn_by IS NULL))
);
-- The router reads it by subject, for each batch's subjects.
CREATE INDEX agency_interest_live ON agency_interest (subject_id) WHERE withdrawn_at IS NULL;
