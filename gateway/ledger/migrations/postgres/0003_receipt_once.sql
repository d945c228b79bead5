-- sts-gateway ledger, schema 3 (PostgreSQL): the same as migrations/sqlite/0003_receipt_once.sql.
-- A provider's receipt proven paid (or of the wrong amount) belongs to one payment row only.

CREATE UNIQUE INDEX payments_receipt_once ON payments (provider, receipt)
    WHERE receipt IS NOT NULL AND state IN ('succeeded', 'mismatched');
