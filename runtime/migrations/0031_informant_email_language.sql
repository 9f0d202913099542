-- The informant's confirmations by email are written in the language they used the
-- journey in (runtime.web.i18n): English or Welsh.
ALTER TABLE informant_email ADD COLUMN language text NOT NULL DEFAULT 'en' CHECK (language IN ('en', 'cy'));
