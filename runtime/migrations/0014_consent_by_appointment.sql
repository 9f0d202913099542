-- A change a proxy made names the appointment it was made under, so it can be traced
-- to the person who acted and the authority they acted on.
ALTER TABLE consent_record ADD COLUMN appointment_id uuid REFERENCES proxy_appointment (id);
