-- Councils by local authority, not by postcode prefix (issue 17, part 8).
--
-- Postcode districts cross council boundaries (LS29 is in Bradford, most of BD23 in
-- North Yorkshire), so intake now stores each address's local authority (GSS code,
-- from the ONS Postcode Directory) in the event, and a council's subscription names
-- its authorities: {"local_authorities": ["E08000035"]}.

-- The demo councils' rows, if they still carry the old seed condition, get the
-- authority the seed now names. Any other {"postcode_areas": [...]} row is left as
-- it is: the router still reads that kind, and only the council can say which
-- authorities it meant (`tuo subscriptions add … --local-authority CODE` replaces it).
UPDATE subscription SET condition = '{"local_authorities": ["E08000035"]}'::jsonb
 WHERE agency = 'council-leeds' AND condition = '{"postcode_areas": ["LS"]}'::jsonb;
UPDATE subscription SET condition = '{"local_authorities": ["E08000032"]}'::jsonb
 WHERE agency = 'council-bradford' AND condition = '{"postcode_areas": ["BD"]}'::jsonb;

-- Which authorities an event's subject lives or lived in (the addresses the router's
-- conditions look at), so the citizen's consent page can list only the councils that
-- concern them without opening the sealed event. A council code is not an address:
-- one of some 360 authorities. NULL: none found, or an event that carries no address
-- (a void, a correction that changes none). Indexed by subject since 0013.
ALTER TABLE intake_record ADD COLUMN local_authorities text[];
