-- sts-gateway ledger, schema 3 (PostgreSQL): the same as migrations/sqlite/0003_receipt_once.sql.
-- A provider's receipt proven paid (or of the wrong amount) belongs to one payment row only.

CREATE UNIQUE INDEX payments_receipt_once ON payments (provider, receipt)
    WHERE receipt IS NOT NULL AND state IN ('succeeded', 'mismatched');

-- Our outstanding asynchronous status queries (Daraja Transaction Status) and their results.
CREATE TABLE status_queries (
    conversation_id  TEXT PRIMARY KEY,
    originator_id    TEXT NOT NULL,
    provider         TEXT NOT NULL,
    transaction_id   TEXT NOT NULL,
    asked_at         TIMESTAMPTZ NOT NULL,
    result           BYTEA,
    answered_at      TIMESTAMPTZ
);
CREATE INDEX status_queries_asked ON status_queries (asked_at);
