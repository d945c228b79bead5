-- sts-gateway ledger, schema 12 (SQLite): kept in step with PostgreSQL's 0012. A sweeper claims
-- a purchase before it asks the provider about it or vends it (paid, not vended); lease_until
-- is when that claim lapses. The one SQLite writer serialises the claims (no row locks needed).
ALTER TABLE purchases ADD COLUMN lease_until TEXT;
