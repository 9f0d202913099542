-- A correction that fixes the subject's NINO moves one registration (and its
-- corrections and voids) from the subject id derived from the wrong NINO to the one
-- derived from the right NINO. Only that registration moves: other events under the
-- old id may be another person's (whose NINO was wrongly used), and must stay theirs.
-- intake_record.subject_id keeps the id each message was keyed by (Kafka order,
-- consent look-ups); whose registration it is now is the latest link for it.
-- No NINO is stored here: the new NINO stays inside the correction's sealed message.
CREATE TABLE subject_link (
    id                  bigserial PRIMARY KEY,  -- the order links were made in
    correction_event_id uuid NOT NULL UNIQUE REFERENCES intake_record (event_id),
    corrected_event_id  uuid NOT NULL REFERENCES intake_record (event_id),
    previous_subject_id text NOT NULL,
    new_subject_id      text NOT NULL,
    linked_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (previous_subject_id <> new_subject_id)
);
CREATE INDEX subject_link_corrected ON subject_link (corrected_event_id, id DESC);
CREATE INDEX subject_link_new_subject ON subject_link (new_subject_id);
