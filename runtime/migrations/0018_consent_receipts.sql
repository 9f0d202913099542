-- Every consent receipt issued (citizens/consent_receipts.py), so that a citizen can
-- list and download their receipts later, whoever recorded the choice: the informant
-- at the desk (the intake form or API), the citizen online, or a proxy. The token is
-- the signed JWT as issued; the other columns repeat its claims for listing, so the
-- page need not parse tokens. A receipt names the subject only by the pseudonymous
-- subject id, as consent_record does.

CREATE TABLE consent_receipt (
    receipt_id        uuid PRIMARY KEY,  -- the receipt's jti and Kantara consentReceiptID
    subject_id        text NOT NULL,
    agency            text NOT NULL,
    event_type        text NOT NULL,
    choice            text NOT NULL CHECK (choice IN ('given', 'refused', 'withdrawn')),
    recorded_by       text NOT NULL CHECK (recorded_by IN ('informant', 'citizen', 'proxy')),
    recorded_at       timestamptz NOT NULL,
    -- The desk's choices name their consent row and the event they came with; a receipt
    -- goes with its consent row if that is ever erased.
    consent_record_id bigint UNIQUE REFERENCES consent_record (id) ON DELETE CASCADE,
    event_id          uuid,
    key_id            text NOT NULL REFERENCES consent_receipt_key (key_id),
    issued_at         timestamptz NOT NULL,
    token             text NOT NULL
);
CREATE INDEX consent_receipt_by_subject ON consent_receipt (subject_id, issued_at DESC);
CREATE INDEX consent_receipt_by_event ON consent_receipt (event_id) WHERE event_id IS NOT NULL;
