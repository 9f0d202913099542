-- The key that signs consent receipts (citizens/consent_receipts.py). One active key
-- at a time; retired keys stay published so that receipts issued before rotation
-- still verify. The private key is sealed with the data key (runtime/sealing.py,
-- AES-256-GCM, bound to the key id), so the database alone cannot forge a receipt.

CREATE TABLE consent_receipt_key (
    key_id             text PRIMARY KEY,  -- the RFC 7638 thumbprint of the public key
    public_key         bytea NOT NULL CHECK (length(public_key) = 32),  -- raw Ed25519
    sealed_private_key bytea NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    retired_at         timestamptz,
    CHECK (retired_at IS NULL OR retired_at >= created_at)
);
CREATE UNIQUE INDEX consent_receipt_key_active ON consent_receipt_key ((true)) WHERE retired_at IS NULL;
