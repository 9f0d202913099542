-- Agencies' accounts on the bus: who onboarded them, and whether they are cut off.
-- The Kafka principal and its ACLs live in the cluster; this row is the record an
-- operator reads, and what keeps a suspended agency from being provisioned again.
CREATE TABLE agency_account (
    agency           text PRIMARY KEY CHECK (agency ~ '^[a-z][a-z0-9-]{1,39}$'),
    principal        text NOT NULL UNIQUE,
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_by       text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    suspended_at     timestamptz,
    suspended_by     text,
    suspended_reason text,
    CHECK ((status = 'suspended') = (suspended_at IS NOT NULL))
);
