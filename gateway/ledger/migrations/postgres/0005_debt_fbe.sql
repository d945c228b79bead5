-- sts-gateway ledger, schema 5 (PostgreSQL): debt recovery and free basic electricity (FBE).
-- The same as migrations/sqlite/0005_debt_fbe.sql.

-- A meter's debt to the utility (XMLVend DebtRecoveryTx). Rows are never deleted: clearing a
-- debt sets its balance to 0. Every change is an event (debt_set, debt_cleared, debt_recovered).
CREATE TABLE meter_debts (
    meter                   TEXT PRIMARY KEY REFERENCES meters (drn),
    currency                TEXT NOT NULL CHECK (length(currency) = 3),
    balance_minor           BIGINT NOT NULL CHECK (balance_minor >= 0),
    rate_basis_points       INTEGER NOT NULL CHECK (rate_basis_points BETWEEN 0 AND 10000),
    min_per_purchase_minor  BIGINT NOT NULL DEFAULT 0 CHECK (min_per_purchase_minor >= 0),
    cap_per_purchase_minor  BIGINT CHECK (cap_per_purchase_minor > 0),
    recovered_total_minor   BIGINT NOT NULL DEFAULT 0 CHECK (recovered_total_minor >= 0),
    updated_at              TIMESTAMPTZ NOT NULL
);

-- What a purchase's vend recovered: at most one row per purchase, written by record_vend.
CREATE TABLE debt_recoveries (
    purchase_id          TEXT PRIMARY KEY REFERENCES purchases (purchase_id),
    meter                TEXT NOT NULL REFERENCES meters (drn),
    amount_minor         BIGINT NOT NULL CHECK (amount_minor > 0),
    currency             TEXT NOT NULL CHECK (length(currency) = 3),
    balance_after_minor  BIGINT NOT NULL CHECK (balance_after_minor >= 0),
    created_at           TIMESTAMPTZ NOT NULL
);
CREATE INDEX debt_recoveries_meter ON debt_recoveries (meter, created_at);

-- The recovery the purchase's quote planned (its units were priced after it).
ALTER TABLE purchases ADD COLUMN debt_recovery_minor BIGINT NOT NULL DEFAULT 0
    CHECK (debt_recovery_minor >= 0);

-- A tariff's monthly free basic electricity, in tenths of a kWh.
CREATE TABLE fbe_allowances (
    tariff_id        TEXT PRIMARY KEY REFERENCES tariffs (tariff_id),
    units_per_month  INTEGER NOT NULL CHECK (units_per_month > 0),
    updated_at       TIMESTAMPTZ NOT NULL
);

-- FBE tokens issued: a vend of zero money with its own TID, at most one per meter and month
-- (YYYY-MM in the FBE time zone), delivered with the purchase it came with.
CREATE TABLE fbe_issues (
    issue_id     BIGSERIAL PRIMARY KEY,
    meter        TEXT NOT NULL REFERENCES meters (drn),
    month        TEXT NOT NULL CHECK (length(month) = 7),
    purchase_id  TEXT NOT NULL UNIQUE REFERENCES purchases (purchase_id),
    tid          INTEGER NOT NULL,
    token        TEXT NOT NULL CHECK (length(token) = 20),
    units        INTEGER NOT NULL CHECK (units > 0),
    created_at   TIMESTAMPTZ NOT NULL,
    UNIQUE (meter, month),
    UNIQUE (meter, tid)
);
