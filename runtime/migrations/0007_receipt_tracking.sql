-- Receipt tracking: when each agency received an event, repeated deliveries,
-- per-agency receipt deadlines, overdue flags and operator redeliveries.

-- When the agency's consumer took the event from its topic (from the receipt itself).
ALTER TABLE delivery_receipt ADD COLUMN received_at timestamptz;

-- The agency's store also remembers whether its receipt reached the broker, so a
-- consumer that crashed between applying and receipting sends the first receipt
-- after restarting, not a "duplicate" one.
ALTER TABLE agency.inbox ADD COLUMN receipted_at timestamptz;

-- A receipt for a delivery the agency had already handled (a redelivery or replay):
-- nothing was applied again. One row per repeated delivery (receipt_id is the
-- receipt's ce_id, which names the delivery), so re-reading receipts adds nothing.
CREATE TABLE receipt_duplicate (
    receipt_id  text PRIMARY KEY,
    event_id    uuid NOT NULL,
    agency      text NOT NULL,
    outcome     text NOT NULL,
    issued_at   timestamptz NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX receipt_duplicate_event ON receipt_duplicate (event_id, agency);

-- How long an agency has to send a final receipt (applied or rejected) after the
-- router delivered an event to it; agencies without a row get the configured default
-- (TUO_RECEIPT_DEADLINE_MINUTES).
CREATE TABLE agency_receipt_deadline (
    agency   text PRIMARY KEY CHECK (agency ~ '^[a-z][a-z0-9-]{1,39}$'),
    deadline interval NOT NULL CHECK (deadline > interval '0' AND deadline <= interval '30 days')
);

-- A delivery found without a final receipt after its deadline. Rows are kept when the
-- receipt arrives late (receipted_at is then set): the flag is history, the open ones
-- are what operators act on.
CREATE TABLE receipt_overdue (
    event_id     uuid NOT NULL,
    agency       text NOT NULL,
    delivered_at timestamptz NOT NULL,
    due_at       timestamptz NOT NULL,
    flagged_at   timestamptz NOT NULL DEFAULT now(),
    receipted_at timestamptz,
    PRIMARY KEY (event_id, agency)
);
CREATE INDEX receipt_overdue_open ON receipt_overdue (agency) WHERE receipted_at IS NULL;

-- An operator's request to deliver an event to one agency again: who, why, when.
CREATE TABLE redelivery (
    id           bigserial PRIMARY KEY,
    event_id     uuid NOT NULL REFERENCES intake_record (event_id),
    agency       text NOT NULL,
    requested_by text NOT NULL,
    reason       text NOT NULL CHECK (length(reason) BETWEEN 3 AND 500),
    requested_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX redelivery_event ON redelivery (event_id, agency);

CREATE INDEX outbox_event ON outbox (event_id);
CREATE INDEX routing_decision_delivered_at ON routing_decision (decided_at) WHERE outcome = 'DELIVERED';
