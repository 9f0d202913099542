-- Webhook delivery for agencies that cannot run Kafka (consumers.webhooks): the
-- agency's endpoint, its signing secrets, each event queued for it, and every attempt.

-- One endpoint per agency that chooses webhooks. HTTPS only: the events carry personal data.
CREATE TABLE webhook_endpoint (
    agency         text PRIMARY KEY REFERENCES agency_account (agency),
    url            text NOT NULL CHECK (url ~ '^https://[^[:space:]]+$' AND length(url) <= 2000),
    payload_format text NOT NULL DEFAULT 'avro' CHECK (payload_format IN ('avro', 'json')),
    max_in_flight  integer NOT NULL DEFAULT 4 CHECK (max_in_flight BETWEEN 1 AND 64),
    retry_window   interval NOT NULL DEFAULT '24 hours'
                   CHECK (retry_window > interval '0' AND retry_window <= interval '30 days'),
    created_by     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_by     text NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Standard Webhooks secrets, sealed with the data key (runtime.sealing). The newest is
-- current; an older one is also signed with until it expires, so an agency can rotate
-- without missing a delivery.
CREATE TABLE webhook_secret (
    id         bigserial PRIMARY KEY,
    agency     text NOT NULL REFERENCES webhook_endpoint (agency) ON DELETE CASCADE,
    sealed     bytea NOT NULL,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz  -- set when a newer secret replaces it
);
CREATE INDEX webhook_secret_of ON webhook_secret (agency, id DESC);

-- An event (or consent change) read from the agency's topic, to be POSTed. One row per
-- event id: the endpoint gets each once (webhook-id is the event id), in order per
-- subject (seq is the order read). The message's value and its headers are kept sealed
-- (the value holds the fields delivered; the signature's salts, with its digests, would
-- let a NINO or a date of birth be guessed) only until the endpoint takes it or it is
-- given up on. A copy read again at the same place is the same delivery; a new copy of a
-- delivered or given-up event (a redelivery, a replay, a redrive) is queued afresh.
CREATE TABLE webhook_delivery (
    agency          text NOT NULL,
    event_id        uuid NOT NULL,
    seq             bigserial,
    event_type      text NOT NULL,
    subject         text NOT NULL,  -- the message key: the pseudonymous subject id
    headers         bytea,  -- sealed JSON [[name, value], …]: CloudEvents and signature headers
    value           bytea,  -- sealed; both NULL once delivered or dead
    source_partition integer NOT NULL,
    source_offset   bigint NOT NULL,
    queued_at       timestamptz NOT NULL DEFAULT now(),
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    PRIMARY KEY (agency, event_id),
    CHECK ((status = 'pending') = (finished_at IS NULL)),
    CHECK ((status = 'pending') = (value IS NOT NULL)),
    CHECK ((status = 'pending') = (headers IS NOT NULL))
);
CREATE INDEX webhook_delivery_pending ON webhook_delivery (agency, subject, seq) WHERE status = 'pending';
CREATE INDEX webhook_delivery_recent ON webhook_delivery (agency, seq DESC);

-- Every attempt: when, how long, what the endpoint answered (or why there was no answer).
CREATE TABLE webhook_attempt (
    agency      text NOT NULL,
    event_id    uuid NOT NULL,
    attempt     integer NOT NULL CHECK (attempt >= 1),
    started_at  timestamptz NOT NULL,
    latency_ms  integer NOT NULL CHECK (latency_ms >= 0),
    status_code integer,
    error       text CHECK (length(error) <= 500),
    succeeded   boolean NOT NULL,
    PRIMARY KEY (agency, event_id, attempt),
    FOREIGN KEY (agency, event_id) REFERENCES webhook_delivery (agency, event_id) ON DELETE CASCADE
);
CREATE INDEX webhook_attempt_recent ON webhook_attempt (agency, started_at DESC);
