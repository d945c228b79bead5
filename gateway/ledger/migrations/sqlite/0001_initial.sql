-- sts-gateway ledger, schema 1 (SQLite). PostgreSQL keeps the same tables, columns and constraints.
-- Money is integer minor units plus an ISO 4217 currency. Timestamps are ISO-8601 UTC text with
-- microseconds (they sort as text). Units are tenths of a kWh (the STS credit transfer amount).

CREATE TABLE tariffs (
    tariff_id            TEXT PRIMARY KEY,
    name                 TEXT NOT NULL,
    currency             TEXT NOT NULL CHECK (length(currency) = 3),
    price_per_kwh_minor  INTEGER NOT NULL CHECK (price_per_kwh_minor > 0),
    vat_basis_points     INTEGER NOT NULL CHECK (vat_basis_points >= 0),
    fixed_charge_minor   INTEGER NOT NULL CHECK (fixed_charge_minor >= 0),
    min_purchase_minor   INTEGER NOT NULL CHECK (min_purchase_minor > 0),
    max_purchase_minor   INTEGER NOT NULL CHECK (max_purchase_minor >= min_purchase_minor)
);

CREATE TABLE meters (
    drn            TEXT PRIMARY KEY,
    customer_name  TEXT NOT NULL,
    area           TEXT NOT NULL DEFAULT '',
    iin            TEXT NOT NULL DEFAULT '600727',
    sgc            TEXT NOT NULL,     -- supply group code, 6 digits (leading zeros kept)
    tariff_index   TEXT NOT NULL,     -- 2 digits
    krn            INTEGER NOT NULL,
    key_type       INTEGER NOT NULL DEFAULT 2,
    ea             INTEGER NOT NULL DEFAULT 7,
    dkga           INTEGER NOT NULL DEFAULT 4,
    base_date      INTEGER NOT NULL DEFAULT 2014,
    ken            INTEGER NOT NULL DEFAULT 255,
    last_tid       INTEGER,
    tariff_id      TEXT NOT NULL REFERENCES tariffs (tariff_id),
    status         TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked'))
);

CREATE TABLE vending_keys (
    sgc         TEXT NOT NULL,
    krn         INTEGER NOT NULL,
    key_type    INTEGER NOT NULL,
    ea          INTEGER NOT NULL,
    dkga        INTEGER NOT NULL,
    base_date   INTEGER NOT NULL,
    nonce       BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    tag         BLOB NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (sgc, krn)
);

CREATE TABLE purchases (
    purchase_id         TEXT PRIMARY KEY,
    channel             TEXT NOT NULL,
    phone               TEXT,
    meter               TEXT NOT NULL REFERENCES meters (drn),
    amount_minor        INTEGER NOT NULL CHECK (amount_minor > 0),
    currency            TEXT NOT NULL CHECK (length(currency) = 3),
    units               INTEGER NOT NULL CHECK (units > 0),
    tariff_id           TEXT NOT NULL REFERENCES tariffs (tariff_id),
    state               TEXT NOT NULL,
    idempotency_key     TEXT NOT NULL UNIQUE,
    provider            TEXT NOT NULL,
    provider_reference  TEXT,
    check_attempts      INTEGER NOT NULL DEFAULT 0,
    next_check_at       TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);
CREATE INDEX purchases_phone ON purchases (phone, created_at);
CREATE INDEX purchases_meter ON purchases (meter, created_at);
CREATE INDEX purchases_state ON purchases (state, next_check_at);

CREATE TABLE payments (
    payment_id    INTEGER PRIMARY KEY,
    purchase_id   TEXT REFERENCES purchases (purchase_id),
    provider      TEXT NOT NULL,
    reference     TEXT NOT NULL,
    amount_minor  INTEGER,
    currency      TEXT,
    state         TEXT NOT NULL,
    payer         TEXT,
    receipt       TEXT,
    payload       BLOB,
    payload_hash  TEXT,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    UNIQUE (provider, reference)
);
CREATE INDEX payments_purchase ON payments (purchase_id);

CREATE TABLE vends (
    vend_id      INTEGER PRIMARY KEY,
    purchase_id  TEXT NOT NULL UNIQUE REFERENCES purchases (purchase_id),
    meter        TEXT NOT NULL REFERENCES meters (drn),
    tid          INTEGER NOT NULL,
    token        TEXT NOT NULL CHECK (length(token) = 20),
    units        INTEGER NOT NULL CHECK (units > 0),
    receipt      TEXT,
    created_at   TEXT NOT NULL,
    UNIQUE (meter, tid)
);

CREATE TABLE outbox (
    message_id           INTEGER PRIMARY KEY,
    purchase_id          TEXT REFERENCES purchases (purchase_id),
    kind                 TEXT NOT NULL,
    recipient            TEXT,
    body                 TEXT NOT NULL,
    state                TEXT NOT NULL,
    attempts             INTEGER NOT NULL DEFAULT 0,
    next_try_at          TEXT NOT NULL,
    provider_message_id  TEXT UNIQUE,
    cost                 TEXT,
    last_error           TEXT,
    created_at           TEXT NOT NULL,
    updated_at           TEXT NOT NULL
);
CREATE INDEX outbox_due ON outbox (state, next_try_at);
CREATE INDEX outbox_purchase ON outbox (purchase_id);
-- Exactly one token message per vend; reprints are kind 'reprint' and may repeat.
CREATE UNIQUE INDEX outbox_one_token_per_purchase ON outbox (purchase_id) WHERE kind = 'token';

CREATE TABLE events (
    event_id     INTEGER PRIMARY KEY,
    purchase_id  TEXT,
    kind         TEXT NOT NULL,
    actor        TEXT NOT NULL,
    data         TEXT NOT NULL,
    at           TEXT NOT NULL
);
CREATE INDEX events_purchase ON events (purchase_id, event_id);

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TABLE saved_meters (
    phone       TEXT NOT NULL,
    meter       TEXT NOT NULL REFERENCES meters (drn),
    nickname    TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    PRIMARY KEY (phone, meter)
);

CREATE TABLE customer_preferences (
    phone       TEXT PRIMARY KEY,
    language    TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
