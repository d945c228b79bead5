-- sts-gateway ledger, schema 2 (PostgreSQL): the same as migrations/sqlite/0002_key_changes.sql.

CREATE TABLE key_changes (
    change_id          BIGSERIAL PRIMARY KEY,
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
    planned_at         TIMESTAMPTZ NOT NULL,
    applied_at         TIMESTAMPTZ,
    purchase_id        TEXT REFERENCES purchases (purchase_id)
);
CREATE UNIQUE INDEX key_changes_one_pending ON key_changes (meter) WHERE state = 'pending';
CREATE INDEX key_changes_meter ON key_changes (meter, change_id);

ALTER TABLE vends ADD COLUMN key_change_tokens TEXT NOT NULL DEFAULT '';

CREATE TABLE early_delivery_reports (
    provider_message_id  TEXT PRIMARY KEY,
    state                TEXT NOT NULL,
    failure_reason       TEXT,
    received_at          TIMESTAMPTZ NOT NULL
);
CREATE INDEX early_delivery_reports_age ON early_delivery_reports (received_at);

CREATE INDEX meters_key ON meters (sgc, krn);
