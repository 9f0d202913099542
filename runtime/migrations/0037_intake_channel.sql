-- How each event was captured (desk, phone, online, system), kept beside its record so
-- that the public performance dashboard (citizens/performance.py) can count events by
-- channel without opening sealed payloads. Events stored before this migration have none.
ALTER TABLE intake_record ADD COLUMN channel text
    CHECK (channel IN ('desk', 'phone', 'online', 'system'));
