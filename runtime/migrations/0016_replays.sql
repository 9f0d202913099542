-- Replays: an operator sends stored life events again to one named agency, decided
-- on today's subscriptions and consent. Each replay is recorded (who, why, what it
-- selected, how many were sent and withheld) and is resumable from its position.

CREATE TABLE replay (
    id            uuid PRIMARY KEY,
    agency        text NOT NULL CHECK (agency ~ '^[a-z][a-z0-9-]{1,39}$'),
    selection     jsonb NOT NULL,
    reason        text NOT NULL CHECK (length(reason) BETWEEN 3 AND 500),
    requested_by  text NOT NULL CHECK (length(requested_by) BETWEEN 1 AND 100),
    dry_run       boolean NOT NULL,
    rate_limit    integer NOT NULL CHECK (rate_limit > 0),
    status        text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'finished')),
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at   timestamptz,
    -- The stored events it covers: outbox rows up to ``upto`` (fixed at the start, so a
    -- resumed replay covers what the first attempt would have); done up to ``position``.
    upto          bigint NOT NULL,
    position      bigint NOT NULL DEFAULT 0,
    selected      bigint NOT NULL,
    examined      bigint NOT NULL DEFAULT 0,
    sent          bigint NOT NULL DEFAULT 0,
    withheld      jsonb NOT NULL DEFAULT '{}'::jsonb,  -- outcome → count
    attempts      integer NOT NULL DEFAULT 0  -- runs started: 1, then one more per resume
);

-- What each replay sent, so citizens and operators see it beside the routing decisions.
CREATE TABLE replay_delivery (
    replay_id        uuid NOT NULL REFERENCES replay (id),
    event_id         uuid NOT NULL,
    agency           text NOT NULL,
    legal_basis      text NOT NULL,
    fields_delivered text[] NOT NULL,
    sent_at          timestamptz NOT NULL,
    PRIMARY KEY (replay_id, event_id)
);
CREATE INDEX replay_delivery_event ON replay_delivery (event_id, agency);

-- Selecting stored events by when they were recorded (outbox (event_id) has its index).
CREATE INDEX intake_record_recorded_at ON intake_record (recorded_at);
