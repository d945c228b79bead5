-- sts-gateway ledger, schema 10 (PostgreSQL): vendor keys sealed at rest, rotation, a read scope.
-- The same as migrations/sqlite/0010_vendor_keys_sealed.sql (see it for the why).
--
-- A schema-8 row keeps its signing_key until the gateway's start re-seals it under the master
-- key (sealed_key, key_hash) and clears signing_key; a row has one form or the other.
ALTER TABLE vendor_keys
    ADD COLUMN sealed_key BYTEA,
    ADD COLUMN key_hash TEXT,
    ADD COLUMN expires_at TIMESTAMPTZ,
    ADD COLUMN replaced_by TEXT,
    ALTER COLUMN signing_key DROP NOT NULL,
    ADD CONSTRAINT vendor_keys_hash_with_seal CHECK ((sealed_key IS NULL) = (key_hash IS NULL)),
    ADD CONSTRAINT vendor_keys_one_form CHECK ((sealed_key IS NULL) <> (signing_key IS NULL));
UPDATE vendor_keys SET scopes = scopes || ' read' WHERE ' ' || scopes || ' ' LIKE '% vend %';
