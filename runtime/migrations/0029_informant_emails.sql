-- The informant's confirmations by email (citizens.emails), for a request to tell more
-- organisations (a ServicesRequested): the first lists who is being told, the second,
-- once every one has answered or is overdue, says what each did. The address is sealed
-- at rest with the data key, and erased when the second email has been sent.
CREATE TABLE informant_email (
    request_event_id uuid PRIMARY KEY REFERENCES intake_record (event_id),
    sealed_address   bytea,            -- NULL once the last email is sent
    created_at       timestamptz NOT NULL DEFAULT now(),
    listed_at        timestamptz,      -- the first email sent
    answered_at      timestamptz,      -- the second email sent
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    CHECK ((sealed_address IS NULL) = (answered_at IS NOT NULL))
);
CREATE INDEX informant_email_due ON informant_email (next_attempt_at) WHERE answered_at IS NULL;
