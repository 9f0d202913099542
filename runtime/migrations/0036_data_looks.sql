-- Every look at personal data by the service's staff, for the person to see (issue 25):
-- an operator's `tuo status`, `tuo dlq show` or replay of one person's events, and a
-- registrar's attempt to open another office's registration (refused, recorded all the
-- same). Who (an operator's or registrar's name: shown to no citizen), in what role,
-- when, what, why (shown to the citizen), whether it was refused, and whose records
-- (pseudonymous subject ids) and which events it concerned. Chained like
-- routing_decision (router.looks, router.audit): each row holds the previous row's hash
-- and a SHA-256 over its content and that hash, so `tuo audit verify` finds a row altered,
-- removed or inserted.
CREATE TABLE data_look (
    seq         bigint PRIMARY KEY CHECK (seq > 0),
    looked_at   timestamptz NOT NULL,
    who         text NOT NULL,
    role        text NOT NULL CHECK (role IN ('operator', 'registrar')),
    action      text NOT NULL,
    reason      text NOT NULL,
    refused     boolean NOT NULL,
    subject_ids text[] NOT NULL,
    event_ids   uuid[] NOT NULL,
    prev_hash   text NOT NULL,
    hash        text NOT NULL
);
CREATE INDEX data_look_by_subject ON data_look USING gin (subject_ids);
