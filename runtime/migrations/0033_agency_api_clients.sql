-- Agencies on HTTPS (consumers.agency_api): OAuth2 clients (client credentials) and the
-- access tokens issued to them. Only hashes of secrets and tokens are stored: a secret is
-- shown once when it is made, a token once when it is issued.
CREATE TABLE agency_api_client (
    client_id   text PRIMARY KEY CHECK (client_id ~ '^[a-z][a-z0-9-]{1,39}\.[0-9a-f]{16}$'),
    agency      text NOT NULL REFERENCES agency_account (agency),
    secret_hash bytea NOT NULL CHECK (length(secret_hash) = 32),
    -- What its tokens may do: no more than it was made for.
    scopes      text[] NOT NULL CHECK (scopes <@ ARRAY['receipts:write', 'events:read', 'interest:write']
                                       AND cardinality(scopes) > 0),
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    revoked_by  text
);
CREATE INDEX agency_api_client_of ON agency_api_client (agency);

CREATE TABLE agency_api_token (
    token_hash bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    client_id  text NOT NULL REFERENCES agency_api_client (client_id),
    agency     text NOT NULL,
    scope      text[] NOT NULL,
    issued_at  timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX agency_api_token_expiry ON agency_api_token (expires_at);

-- The agencies' pull feed reads what was delivered to one agency, in time order.
CREATE INDEX routing_decision_delivered_to ON routing_decision (agency, decided_at, event_id)
    WHERE outcome = 'DELIVERED';
