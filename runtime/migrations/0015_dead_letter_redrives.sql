-- `tuo dlq redrive`: who sent a dead letter back through the bus, why, when, and how.
-- A dead letter is named by where it sits on Kafka (topic, partition, offset), which
-- never changes; the row says what was done: the stored original published again on
-- the life-events topic (an outbox row), or redelivered to one agency (a redelivery).
CREATE TABLE dead_letter_redrive (
    id             bigserial PRIMARY KEY,
    dead_letter    text NOT NULL,  -- as `tuo dlq` names it, e.g. bus:0:17 or dwp:0:3
    topic          text NOT NULL,
    "partition"    integer NOT NULL CHECK ("partition" >= 0),
    "offset"       bigint NOT NULL CHECK ("offset" >= 0),
    event_id       uuid NOT NULL REFERENCES intake_record (event_id),
    action         text NOT NULL CHECK (action IN ('republished', 'redelivered')),
    agency         text,  -- the one agency a redelivery is for
    outbox_id      bigint REFERENCES outbox (id),
    redelivery_id  bigint REFERENCES redelivery (id),
    requested_by   text NOT NULL CHECK (length(requested_by) BETWEEN 1 AND 200),
    reason         text NOT NULL CHECK (length(reason) BETWEEN 3 AND 500),
    requested_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((action = 'republished') = (outbox_id IS NOT NULL)),
    CHECK ((action = 'redelivered') = (redelivery_id IS NOT NULL AND agency IS NOT NULL))
);
CREATE INDEX dead_letter_redrive_place ON dead_letter_redrive (topic, "partition", "offset");
