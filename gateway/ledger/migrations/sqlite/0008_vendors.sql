-- sts-gateway ledger, schema 8 (SQLite): the vendor API (banks, agents, sales points).
-- PostgreSQL's 0008 keeps the same shape. Money in integer minor units; rows are never deleted.

-- A vendor sells from a prepaid float; it may go down to -credit_limit_minor, never below
-- (the CHECK is the last guard: the debit is conditional). The float moves only with a
-- float_movements row in the same transaction.
CREATE TABLE vendors (
    vendor_id           TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    currency            TEXT NOT NULL CHECK (length(currency) = 3),
    balance_minor       INTEGER NOT NULL DEFAULT 0,
    credit_limit_minor  INTEGER NOT NULL DEFAULT 0 CHECK (credit_limit_minor >= 0),
    commission_bp       INTEGER NOT NULL DEFAULT 0 CHECK (commission_bp BETWEEN 0 AND 10000),
    ip_allowlist        TEXT NOT NULL DEFAULT '',
    rate_per_minute     INTEGER NOT NULL DEFAULT 600 CHECK (rate_per_minute > 0),
    status              TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    CHECK (balance_minor >= -credit_limit_minor)
);

CREATE TABLE vendor_terminals (
    vendor_id        TEXT NOT NULL REFERENCES vendors (vendor_id),
    terminal_id      TEXT NOT NULL,
    label            TEXT NOT NULL DEFAULT '',
    rate_per_minute  INTEGER NOT NULL DEFAULT 60 CHECK (rate_per_minute > 0),
    status           TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at       TEXT NOT NULL,
    PRIMARY KEY (vendor_id, terminal_id)
);

-- API keys: the secret is shown once; only its derived signing key is kept (see
-- gateway/vendor/signing.py). Scopes are space-separated; a key may be bound to a terminal.
CREATE TABLE vendor_keys (
    key_id       TEXT PRIMARY KEY,
    vendor_id    TEXT NOT NULL REFERENCES vendors (vendor_id),
    signing_key  TEXT NOT NULL,
    scopes       TEXT NOT NULL,
    terminal_id  TEXT,
    status       TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at   TEXT NOT NULL,
    revoked_at   TEXT
);
CREATE INDEX vendor_keys_vendor ON vendor_keys (vendor_id);

-- Every move of a float: a top-up (+), a vend's debit (-), a refund (+). balance_after_minor is
-- the float after it, so a statement's opening and closing balances are rows, not sums.
-- A purchase is debited at most once and refunded at most once; a top-up reference counts once.
CREATE TABLE float_movements (
    movement_id          INTEGER PRIMARY KEY,
    vendor_id            TEXT NOT NULL REFERENCES vendors (vendor_id),
    kind                 TEXT NOT NULL CHECK (kind IN ('top_up', 'debit', 'refund')),
    amount_minor         INTEGER NOT NULL CHECK (amount_minor <> 0),
    commission_minor     INTEGER NOT NULL DEFAULT 0 CHECK (commission_minor >= 0),
    balance_after_minor  INTEGER NOT NULL,
    purchase_id          TEXT REFERENCES purchases (purchase_id),
    reference            TEXT NOT NULL,
    actor                TEXT NOT NULL,
    created_at           TEXT NOT NULL,
    UNIQUE (vendor_id, kind, reference)
);
CREATE UNIQUE INDEX float_movements_purchase ON float_movements (purchase_id, kind)
    WHERE purchase_id IS NOT NULL;
CREATE INDEX float_movements_vendor ON float_movements (vendor_id, created_at);

-- One vendor request per (vendor, Idempotency-Key): its body's SHA-256, the purchase it opened,
-- and, once answered, the status and the exact response bytes every replay returns.
CREATE TABLE vendor_requests (
    vendor_id        TEXT NOT NULL REFERENCES vendors (vendor_id),
    idempotency_key  TEXT NOT NULL,
    request_hash     TEXT NOT NULL,
    terminal_id      TEXT,
    purchase_id      TEXT UNIQUE REFERENCES purchases (purchase_id),
    state            TEXT NOT NULL CHECK (state IN ('running', 'done')),
    status_code      INTEGER,
    response         BLOB,
    lease_until      TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    PRIMARY KEY (vendor_id, idempotency_key)
);

-- Request nonces seen within the signature window (replays refused on every instance).
CREATE TABLE vendor_nonces (
    vendor_id  TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    seen_at    TEXT NOT NULL,
    PRIMARY KEY (vendor_id, nonce)
);
CREATE INDEX vendor_nonces_seen ON vendor_nonces (seen_at);
