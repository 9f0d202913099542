-- A citizen's pages look up their events and consent history by pseudonymous subject id.
CREATE INDEX intake_record_subject ON intake_record (subject_id, recorded_at DESC);
