-- What a replay needs to decide on an original life event and to cut each agency's
-- copy from its bytes (router/facts.py): kept when intake records the event, sealed
-- with the data key and bound to the event's id, like message_value beside it.
-- NULL for other messages, corrections and voids, and events recorded before this:
-- replay reads those as the router does (decode, verify, encode).
ALTER TABLE outbox ADD COLUMN routing_facts bytea;
