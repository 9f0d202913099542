-- The reference agencies' own records, which the life events they are sent change
-- (see consumers/agencies): HMRC's tax records, DWP's pension awards, DVLA's
-- driving licences, and each council's council-tax households, their residents
-- and its electoral register. agency.inbox (0001) stays the SDK's own.

CREATE DOMAIN agency.nino AS text
    CHECK (VALUE ~ '^[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z][0-9]{6}[A-D]$');
CREATE DOMAIN agency.postcode AS text
    CHECK (VALUE ~ '^[A-Z]{1,2}[0-9][A-Z0-9]? [0-9][A-Z]{2}$');
CREATE DOMAIN agency.uprn AS text CHECK (VALUE ~ '^[0-9]{1,12}$');
CREATE DOMAIN agency.address_lines AS text[] CHECK (cardinality(VALUE) BETWEEN 1 AND 5);

-- Names and address lines compared as a clerk would: case, spacing and punctuation aside.
CREATE FUNCTION agency.match_key(value text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT btrim(regexp_replace(upper(value), '[^[:alnum:]]+', ' ', 'g')) $$;

-- The same person by name: surname and first forename ("Pat Jo" is "Pat").
CREATE FUNCTION agency.same_name(given_a text, family_a text, given_b text, family_b text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT agency.match_key(family_a) = agency.match_key(family_b)
       AND split_part(agency.match_key(given_a), ' ', 1) = split_part(agency.match_key(given_b), ' ', 1)
$$;

-- The same address: by UPRN when both sides have one, else by postcode and first line.
CREATE FUNCTION agency.same_address(
    lines_a text[], postcode_a text, uprn_a text, lines_b text[], postcode_b text, uprn_b text
) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN uprn_a IS NOT NULL AND uprn_b IS NOT NULL THEN uprn_a = uprn_b
        ELSE replace(upper(postcode_a), ' ', '') = replace(upper(postcode_b), ' ', '')
             AND agency.match_key(lines_a[1]) = agency.match_key(lines_b[1])
    END
$$;

-- HMRC: one tax record per National Insurance number, closed by the holder's death.
CREATE TABLE agency.tax_record (
    nino            agency.nino PRIMARY KEY,
    given_names     text NOT NULL CHECK (length(given_names) BETWEEN 1 AND 200),
    family_name     text NOT NULL CHECK (length(family_name) BETWEEN 1 AND 200),
    address_lines   agency.address_lines NOT NULL,
    town            text NOT NULL,
    postcode        agency.postcode NOT NULL,
    uprn            agency.uprn,
    address_from    date,  -- effective date of the last change of address applied
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    closed_on       date,  -- the date of death
    closed_by_event uuid,  -- the death that closed it, so that voiding the death reopens it
    CHECK ((status = 'closed') = (closed_on IS NOT NULL)),
    CHECK (closed_by_event IS NULL OR status = 'closed')
);

-- DWP: a state pension in payment, stopped at death; what was paid for days after it is owed back.
CREATE TABLE agency.pension_award (
    nino                agency.nino PRIMARY KEY,
    weekly_amount_pence integer NOT NULL CHECK (weekly_amount_pence > 0),
    paid_until          date NOT NULL,  -- the last day covered by payments already made
    status              text NOT NULL DEFAULT 'in_payment' CHECK (status IN ('in_payment', 'stopped')),
    stopped_on          date,  -- the date of death
    stopped_by_event    uuid,
    overpayment_pence   integer NOT NULL DEFAULT 0 CHECK (overpayment_pence >= 0),
    CHECK ((status = 'stopped') = (stopped_on IS NOT NULL)),
    CHECK (stopped_by_event IS NULL OR status = 'stopped'),
    CHECK (status = 'stopped' OR overpayment_pence = 0)
);

-- DVLA: driving licences. DVLA is not sent the NINO: it finds a holder by name and
-- date of birth (or name and postcode), so those are indexed.
CREATE TABLE agency.driving_licence (
    driver_number       text PRIMARY KEY
                        CHECK (driver_number ~ '^[A-Z9]{5}[0-9]{6}[A-Z9]{2}[0-9][A-Z0-9]{2}$'),
    given_names         text NOT NULL CHECK (length(given_names) BETWEEN 1 AND 200),
    family_name         text NOT NULL CHECK (length(family_name) BETWEEN 1 AND 200),
    date_of_birth       date NOT NULL,
    address_lines       agency.address_lines NOT NULL,
    town                text NOT NULL,
    postcode            agency.postcode NOT NULL,
    uprn                agency.uprn,
    address_from        date,
    status              text NOT NULL DEFAULT 'valid' CHECK (status IN ('valid', 'cancelled')),
    cancelled_on        date,
    cancellation_reason text CHECK (cancellation_reason IN ('holder died')),
    cancelled_by_event  uuid,
    CHECK ((status = 'cancelled') = (cancelled_on IS NOT NULL AND cancellation_reason IS NOT NULL)),
    CHECK (cancelled_by_event IS NULL OR status = 'cancelled')
);
CREATE INDEX driving_licence_by_birth ON agency.driving_licence (agency.match_key(family_name), date_of_birth);
CREATE INDEX driving_licence_by_postcode ON agency.driving_licence (agency.match_key(family_name), postcode);

-- Councils: a council-tax household per address, who lives there, and the electoral register.
-- The single-person discount (25% off) holds while exactly one adult lives there.
CREATE TABLE agency.council_household (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    council                text NOT NULL CHECK (council ~ '^[a-z][a-z0-9-]{1,39}$'),
    address_lines          agency.address_lines NOT NULL,
    town                   text NOT NULL,
    postcode               agency.postcode NOT NULL,
    uprn                   agency.uprn,
    single_person_discount boolean NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX council_household_uprn ON agency.council_household (council, uprn) WHERE uprn IS NOT NULL;
CREATE INDEX council_household_address
    ON agency.council_household (council, postcode, (agency.match_key(address_lines[1])));

CREATE TABLE agency.council_resident (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    household_id  bigint NOT NULL REFERENCES agency.council_household (id),
    given_names   text NOT NULL CHECK (length(given_names) BETWEEN 1 AND 200),
    family_name   text NOT NULL CHECK (length(family_name) BETWEEN 1 AND 200),
    date_of_birth date,
    adult         boolean NOT NULL,
    moved_in_on   date,
    left_on       date,
    left_because  text CHECK (left_because IN ('died', 'moved away')),
    CHECK ((left_on IS NULL) = (left_because IS NULL))
);
CREATE INDEX council_resident_household ON agency.council_resident (household_id);

-- An elector is registered at a household's address; the register keeps those removed.
CREATE TABLE agency.electoral_register (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    household_id   bigint NOT NULL REFERENCES agency.council_household (id),
    given_names    text NOT NULL CHECK (length(given_names) BETWEEN 1 AND 200),
    family_name    text NOT NULL CHECK (length(family_name) BETWEEN 1 AND 200),
    status         text NOT NULL DEFAULT 'registered' CHECK (status IN ('registered', 'removed')),
    registered_on  date,
    removed_on     date,
    removal_reason text CHECK (removal_reason IN ('died', 'moved away')),
    CHECK ((status = 'removed') = (removed_on IS NOT NULL AND removal_reason IS NOT NULL))
);
CREATE INDEX electoral_register_household ON agency.electoral_register (household_id);
