-- sts-gateway ledger, schema 7 (SQLite): events are also read by kind (admin session revocations,
-- security and operator lists), newest first; PostgreSQL has had this index since schema 1.
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, event_id);
