-- sts-gateway ledger, schema 7 (PostgreSQL): kept in step with SQLite's 0007, which adds the
-- events (kind, event_id) index this backend has had since schema 1.
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, event_id);
