-- sts-gateway ledger, schema 12 (PostgreSQL): background work shared among workers and instances.
-- A sweeper claims a purchase before it asks the provider about it (a payment check) or vends
-- it (paid, not vended): lease_until is when that claim lapses (a crashed claimer's purchase
-- comes back then). NULL: nobody holds it. Claims use FOR UPDATE SKIP LOCKED (core.py).
ALTER TABLE purchases ADD COLUMN IF NOT EXISTS lease_until TIMESTAMPTZ;
