-- The relay's claim on outbox rows: the number of the batch (one Kafka
-- transaction) that carries them. The same number goes into that transaction as
-- the relay's ledger offset, so after a crash the relay can tell whether a
-- claimed batch reached the topic (see producers/relay.py).
CREATE SEQUENCE outbox_relay_batch;
ALTER TABLE outbox ADD COLUMN relay_batch bigint;
