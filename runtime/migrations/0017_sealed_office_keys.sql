-- Registration offices' private signing keys sealed at rest, as consent-receipt keys
-- are (0010): AES-256-GCM with the data key (runtime/sealing.py), bound to the key
-- id, so that whoever can read the database still cannot forge an office's signature.
--
-- The data key lives in settings, never in SQL. So, in this migration's own
-- transaction and just before this file runs, the migration runner
-- (runtime/database.py, _seal_office_keys) locks office_signing_key against writes
-- and seals every stored raw key into the temporary table
-- office_key_sealed (key_id, sealed). This file moves the sealed keys in and drops
-- the raw column: no code can read a raw key any more, and a raw 32-byte key
-- cannot be stored where a sealed one belongs. If any key was left unsealed, SET
-- NOT NULL fails and the whole migration rolls back, changing nothing.

ALTER TABLE office_signing_key ADD COLUMN sealed_private_key bytea;

-- Null the raw key in the same update, so that the live row versions no longer hold
-- it (DROP COLUMN alone leaves the bytes in every row until it is rewritten).
ALTER TABLE office_signing_key ALTER COLUMN private_key DROP NOT NULL;
UPDATE office_signing_key AS k
   SET sealed_private_key = s.sealed, private_key = NULL
  FROM office_key_sealed AS s
 WHERE s.key_id = k.key_id;
ALTER TABLE office_signing_key DROP COLUMN private_key;

-- A sealed Ed25519 key: marker 0x01, data key id (8), nonce (12), key (32), GCM tag (16).
ALTER TABLE office_signing_key ALTER COLUMN sealed_private_key SET NOT NULL;
ALTER TABLE office_signing_key ADD CONSTRAINT office_signing_key_sealed
    CHECK (length(sealed_private_key) = 1 + 8 + 12 + 32 + 16 AND get_byte(sealed_private_key, 0) = 1);
