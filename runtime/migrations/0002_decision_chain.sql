-- Routing decisions become a hash chain: each row carries its place (seq), the
-- previous row's hash and its own, so altering, removing or inserting a row shows.
ALTER TABLE routing_decision
    ADD COLUMN fields_delivered text[] NOT NULL DEFAULT '{}',
    ADD COLUMN fields_withheld  text[] NOT NULL DEFAULT '{}',
    ADD COLUMN seq       bigint,
    ADD COLUMN prev_hash text,
    ADD COLUMN hash      text;

-- Chain any rows stored before this migration, in the order they were decided.
WITH ordered AS (
    SELECT event_id, agency, row_number() OVER (ORDER BY decided_at, event_id, agency) AS n
      FROM routing_decision
)
UPDATE routing_decision d SET seq = o.n FROM ordered o
 WHERE d.event_id = o.event_id AND d.agency = o.agency;

ALTER TABLE routing_decision ALTER COLUMN seq SET NOT NULL;
ALTER TABLE routing_decision ADD CONSTRAINT routing_decision_seq_unique UNIQUE (seq);
