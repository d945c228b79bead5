-- sts-gateway ledger, schema 1 (PostgreSQL). The same tables, columns and constraints as
-- migrations/sqlite/0001_initial.sql, in PostgreSQL's types: money is BIGINT minor units plus an
-- ISO 4217 currency, timestamps are TIMESTAMPTZ (UTC), raw bodies BYTEA, event data JSONB.
-- Units are tenths of a kWh (the STS credit transfer amount).

CREATE TABLE tariffs (
    tariff_id            TEXT PRIMARY KEY,
    name                 TEXT NOT NULL,
    currency             TEXT NOT NULL CHECK (length(currency) = 3),
    price_per_kwh_minor  BIGINT NOT NULL CHECK (price_per_kwh_minor > 0),
    vat_basis_points     INTEGER NOT NULL CHECK (vat_basis_points >= 0),
    fixed_charge_minor   BIGINT NOT NULL CHECK (fixed_charge_minor >= 0),
    min_purchase_minor   BIGINT NOT NULL CHECK (min_purchase_minor > 0),
    max_purchase_minor   BIGINT NOT NULL CHECK (max_purchase_minor >= min_purchase_minor)
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
    last_tid       BIGINT,            -- the vend transaction locks this row (SELECT … FOR UPDATE)
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
    nonce       BYTEA NOT NULL,
    ciphertext  BYTEA NOT NULL,
    tag         BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (sgc, krn)
);

CREATE TABLE purchases (
    purchase_id         TEXT PRIMARY KEY,
    channel             TEXT NOT NULL,
    phone               TEXT,
    meter               TEXT NOT NULL REFERENCES meters (drn),
    amount_minor        BIGINT NOT NULL CHECK (amount_minor > 0),
    currency            TEXT NOT NULL CHECK (length(currency) = 3),
    units               INTEGER NOT NULL CHECK (units > 0),
    tariff_id           TEXT NOT NULL REFERENCES tariffs (tariff_id),
    state               TEXT NOT NULL,
    idempotency_key     TEXT NOT NULL UNIQUE,
    provider            TEXT NOT NULL,
    provider_reference  TEXT,
    check_attempts      INTEGER NOT NULL DEFAULT 0,
    next_check_at       TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL
);
CREATE INDEX purchases_phone ON purchases (phone, created_at);
CREATE INDEX purchases_meter ON purchases (meter, created_at);
CREATE INDEX purchases_state ON purchases (state, next_check_at);

CREATE TABLE payments (
    payment_id    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    purchase_id   TEXT REFERENCES purchases (purchase_id),
    provider      TEXT NOT NULL,
    reference     TEXT NOT NULL,
    amount_minor  BIGINT,
    currency      TEXT,
    state         TEXT NOT NULL,
    payer         TEXT,
    receipt       TEXT,
    payload       BYTEA,
    payload_hash  TEXT,
    created_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    UNIQUE (provider, reference)
);
CREATE INDEX payments_purchase ON payments (purchase_id);

CREATE TABLE vends (
    vend_id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    purchase_id  TEXT NOT NULL UNIQUE REFERENCES purchases (purchase_id),
    meter        TEXT NOT NULL REFERENCES meters (drn),
    tid          BIGINT NOT NULL,
    token        TEXT NOT NULL CHECK (length(token) = 20),
    units        INTEGER NOT NULL CHECK (units > 0),
    receipt      TEXT,
    created_at   TIMESTAMPTZ NOT NULL,
    UNIQUE (meter, tid)
);

CREATE TABLE outbox (
    message_id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    purchase_id          TEXT REFERENCES purchases (purchase_id),
    kind                 TEXT NOT NULL,
    recipient            TEXT,
    body                 TEXT NOT NULL,
    state                TEXT NOT NULL,
    attempts             INTEGER NOT NULL DEFAULT 0,
    next_try_at          TIMESTAMPTZ NOT NULL,
    provider_message_id  TEXT UNIQUE,
    cost                 TEXT,
    last_error           TEXT,
    created_at           TIMESTAMPTZ NOT NULL,
    updated_at           TIMESTAMPTZ NOT NULL
);
CREATE INDEX outbox_due ON outbox (state, next_try_at);
CREATE INDEX outbox_purchase ON outbox (purchase_id);
-- Exactly one token message per vend; reprints are kind 'reprint' and may repeat.
CREATE UNIQUE INDEX outbox_one_token_per_purchase ON outbox (purchase_id) WHERE kind = 'token';

CREATE TABLE events (
    event_id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    purchase_id  TEXT,
    kind         TEXT NOT NULL,
    actor        TEXT NOT NULL,
    data         JSONB NOT NULL,
    at           TIMESTAMPTZ NOT NULL
);
CREATE INDEX events_purchase ON events (purchase_id, event_id);
CREATE INDEX events_kind ON events (kind, event_id);

-- Events are append-only: UPDATE, DELETE and TRUNCATE raise (SQLSTATE P0001).
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only';
END;
$$;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

CREATE TABLE saved_meters (
    phone       TEXT NOT NULL,
    meter       TEXT NOT NULL REFERENCES meters (drn),
    nickname    TEXT NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (phone, meter)
);

CREATE TABLE customer_preferences (
    phone       TEXT PRIMARY KEY,
    language    TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
