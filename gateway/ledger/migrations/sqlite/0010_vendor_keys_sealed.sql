-- sts-gateway ledger, schema 10 (SQLite): vendor keys sealed at rest, rotation, a read scope.
-- PostgreSQL's 0010 gives the same shape.
--
-- Schema 8 kept each key's derived signing key in the clear (signing_key). From here a key is
-- kept sealed (AES-256-GCM under the gateway's master key, gateway/vendor/sealing.py) in
-- sealed_key, with key_hash (its SHA-256, for display) beside it. SQL cannot seal (the master key
-- never enters the database), so a schema-8 row keeps signing_key until the gateway's start
-- re-seals it (gateway/vendor/service.py reseal_vendor_keys): then signing_key is NULL. A row
-- has one form or the other, never both.
--
-- Rotation: a key replaced by another (replaced_by) stays valid until expires_at (the overlap
-- window in which the vendor moves its clients to the new key).
--
-- Scopes: 'read' (last response, reprint) is new; every key that could vend could read its
-- vends, so it gets 'read'.
CREATE TABLE vendor_keys_v10 (
    key_id       TEXT PRIMARY KEY,
    vendor_id    TEXT NOT NULL REFERENCES vendors (vendor_id),
    sealed_key   BLOB,
    key_hash     TEXT,
    signing_key  TEXT,
    scopes       TEXT NOT NULL,
    terminal_id  TEXT,
    status       TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at   TEXT NOT NULL,
    revoked_at   TEXT,
    expires_at   TEXT,
    replaced_by  TEXT,
    CHECK ((sealed_key IS NULL) = (key_hash IS NULL)),
    CHECK ((sealed_key IS NULL) <> (signing_key IS NULL))
);
INSERT INTO vendor_keys_v10 (key_id, vendor_id, signing_key, scopes, terminal_id, status,
                             created_at, revoked_at)
    SELECT key_id, vendor_id, signing_key, scopes, terminal_id, status, created_at, revoked_at
    FROM vendor_keys;
DROP TABLE vendor_keys;
ALTER TABLE vendor_keys_v10 RENAME TO vendor_keys;
CREATE INDEX vendor_keys_vendor ON vendor_keys (vendor_id);
UPDATE vendor_keys SET scopes = scopes || ' read' WHERE ' ' || scopes || ' ' LIKE '% vend %';
