-- Every version of every subscription is kept (issue 24). ``subscription`` still holds
-- the terms in force, one row per agency and event type, and is what the router reads;
-- each row now names its version. Any change to a row's terms, however it is made
-- (`tuo subscriptions`, an agency's request through the API once approved, plain SQL),
-- closes the version in force and opens a new one, by trigger, so that no writer can
-- change terms without leaving the old ones behind. Who changed them, why, and under
-- which request, are read from transaction-local settings the writer sets
-- (router.subscription_versions); a writer that sets none is recorded as the database
-- user, with no reason given.

-- An agency's request to change its subscription: the whole terms it asks for. A
-- narrowing applies at once; anything that widens (more fields, a new event type, a
-- changed legal basis or statute, a wider condition or validity, resuming) waits for an
-- operator to approve or reject it, with a reason.
CREATE TABLE subscription_change (
    id              bigserial PRIMARY KEY,
    agency          text NOT NULL REFERENCES agency_account (agency),
    event_type      text NOT NULL,
    proposed        jsonb NOT NULL,
    widens          text[] NOT NULL,  -- what needs approval, in words; empty: a narrowing
    requested_by    text NOT NULL,
    requested_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    reason          text NOT NULL,
    state           text NOT NULL CHECK (state IN ('pending', 'applied', 'rejected')),
    decided_by      text,
    decided_at      timestamptz,
    decision_reason text,
    CHECK ((state = 'pending') = (decided_at IS NULL))
);
-- One request waiting per agency and event type: a second is refused until the first is decided.
CREATE UNIQUE INDEX subscription_change_one_pending ON subscription_change (agency, event_type)
    WHERE state = 'pending';

CREATE TABLE subscription_version (
    id             bigserial PRIMARY KEY,
    agency         text NOT NULL,
    event_type     text NOT NULL,
    fields         text[],
    legal_basis    text NOT NULL,
    statute        text,
    condition      jsonb,
    valid_from     timestamptz,
    valid_to       timestamptz,
    status         text NOT NULL,
    in_force_from  timestamptz NOT NULL DEFAULT clock_timestamp(),
    in_force_to    timestamptz,  -- NULL: in force now
    changed_by     text NOT NULL,
    approved_by    text,         -- an operator who approved an agency's widening request
    reason         text NOT NULL,
    change_id      bigint REFERENCES subscription_change (id)
);
CREATE INDEX subscription_version_by_subscription ON subscription_version (agency, event_type, id);

-- An AFTER trigger, so that it sees only rows really written: a BEFORE INSERT trigger
-- also fires for an INSERT … ON CONFLICT that ends as an update, or as nothing.
CREATE FUNCTION subscription_versioned() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    opened bigint;
    moment timestamptz := clock_timestamp();  -- one version ends as the next begins
BEGIN
    IF TG_OP = 'UPDATE'
       AND NEW.agency = OLD.agency AND NEW.event_type = OLD.event_type
       AND NEW.fields IS NOT DISTINCT FROM OLD.fields
       AND NEW.legal_basis = OLD.legal_basis AND NEW.statute IS NOT DISTINCT FROM OLD.statute
       AND NEW.condition IS NOT DISTINCT FROM OLD.condition
       AND NEW.valid_from IS NOT DISTINCT FROM OLD.valid_from
       AND NEW.valid_to IS NOT DISTINCT FROM OLD.valid_to AND NEW.status = OLD.status THEN
        RETURN NULL;  -- the same terms (or only the version, set below): the same version
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE subscription_version SET in_force_to = moment
         WHERE id = OLD.version AND in_force_to IS NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN NULL;
    END IF;
    INSERT INTO subscription_version (agency, event_type, fields, legal_basis, statute, condition,
                                      valid_from, valid_to, status, in_force_from, changed_by, approved_by,
                                      reason, change_id)
    VALUES (NEW.agency, NEW.event_type, NEW.fields, NEW.legal_basis, NEW.statute, NEW.condition,
            NEW.valid_from, NEW.valid_to, NEW.status, moment,
            coalesce(nullif(current_setting('tuo.changed_by', true), ''), session_user),
            nullif(current_setting('tuo.approved_by', true), ''),
            coalesce(nullif(current_setting('tuo.change_reason', true), ''), 'not given'),
            nullif(current_setting('tuo.change_id', true), '')::bigint)
    RETURNING id INTO opened;
    UPDATE subscription SET version = opened WHERE id = NEW.id;
    RETURN NULL;
END
$$;

-- Set by the trigger within the statement that writes the row; NULL only for a moment.
ALTER TABLE subscription ADD COLUMN version bigint REFERENCES subscription_version (id);

-- The terms in force today become everyone's first version.
WITH opened AS (
    INSERT INTO subscription_version (agency, event_type, fields, legal_basis, statute, condition,
                                      valid_from, valid_to, status, changed_by, reason)
    SELECT agency, event_type, fields, legal_basis, statute, condition, valid_from, valid_to, status,
           'migration 0035', 'the terms in force when versions began to be kept'
      FROM subscription
    RETURNING id, agency, event_type)
UPDATE subscription s SET version = o.id FROM opened o
 WHERE s.agency = o.agency AND s.event_type = o.event_type;

CREATE TRIGGER subscription_versioned
    AFTER INSERT OR UPDATE OR DELETE ON subscription
    FOR EACH ROW EXECUTE FUNCTION subscription_versioned();

-- Which version each routing decision was made on (NULL: no subscription covered the
-- event, or the decision predates versions); and each replayed copy's.
ALTER TABLE routing_decision ADD COLUMN subscription_version bigint;
ALTER TABLE replay_delivery ADD COLUMN subscription_version bigint;

-- Agencies' clients may be given the scope to see their subscriptions and ask for changes.
ALTER TABLE agency_api_client DROP CONSTRAINT agency_api_client_scopes_check;
ALTER TABLE agency_api_client ADD CONSTRAINT agency_api_client_scopes_check
    CHECK (scopes <@ ARRAY['receipts:write', 'events:read', 'interest:write', 'subscriptions:manage']
           AND cardinality(scopes) > 0);
