-- Subscriptions grant field paths (schemas/fieldpaths.py), not whole top-level fields.
-- A field holding related people (a partner, next of kin, an executor, parents, people
-- moving too) is now granted part by part. A subscription that granted such a field
-- whole keeps exactly what it received before: every part of it, named explicitly, so
-- that an operator can see it and narrow it (`tuo subscriptions list`). The envelope's
-- personal fields (nino aside, which was always its own grant) were never granted by
-- anyone, so no subscription gains them: from now on they are withheld unless granted.
UPDATE subscription s
   SET fields = (
       SELECT array_agg(DISTINCT path ORDER BY path)
         FROM unnest(s.fields) AS f(field),
              unnest(CASE WHEN f.field IN ('surviving_partner', 'next_of_kin', 'executor', 'parents', 'moving_with')
                          THEN ARRAY[f.field || '.person', f.field || '.relationship',
                                     f.field || '.nino', f.field || '.address']
                          ELSE ARRAY[f.field] END) AS p(path))
 WHERE s.fields && ARRAY['surviving_partner', 'next_of_kin', 'executor', 'parents', 'moving_with'];
