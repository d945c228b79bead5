-- sts-gateway ledger, schema 2 (SQLite): key changes delivered with the next vend, early delivery
-- reports, and the indexes the metrics read. PostgreSQL's 0002 keeps the same shape.

-- One row per planned key change of a meter; at most one PENDING per meter. The vend that
-- delivers it marks it APPLIED (with its purchase) in the same transaction.
CREATE TABLE key_changes (
    change_id          INTEGER PRIMARY KEY,
    meter              TEXT NOT NULL REFERENCES meters (drn),
    from_sgc           TEXT NOT NULL,
    from_krn           INTEGER NOT NULL,
    from_tariff_index  TEXT NOT NULL,
    from_base_date     INTEGER NOT NULL,
    sgc                TEXT NOT NULL,
    krn                INTEGER NOT NULL,
    tariff_index       TEXT NOT NULL,
    base_date          INTEGER NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('pending', 'applied', 'superseded')),
    planned_at         TEXT NOT NULL,
    applied_at         TEXT,
    purchase_id        TEXT REFERENCES purchases (purchase_id)
);
CREATE UNIQUE INDEX key_changes_one_pending ON key_changes (meter) WHERE state = 'pending';
CREATE INDEX key_changes_meter ON key_changes (meter, change_id);

-- The key-change tokens a vend delivered before its credit token (space-separated, in order).
ALTER TABLE vends ADD COLUMN key_change_tokens TEXT NOT NULL DEFAULT '';

-- Delivery reports that arrived before the outbox recorded their provider message id.
CREATE TABLE early_delivery_reports (
    provider_message_id  TEXT PRIMARY KEY,
    state                TEXT NOT NULL,
    failure_reason       TEXT,
    received_at          TEXT NOT NULL
);
CREATE INDEX early_delivery_reports_age ON early_delivery_reports (received_at);

CREATE INDEX meters_key ON meters (sgc, krn);
