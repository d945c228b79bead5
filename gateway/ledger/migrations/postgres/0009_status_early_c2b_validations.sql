-- sts-gateway ledger, schema 9 (PostgreSQL): the same as migrations/sqlite/0009_status_early_c2b_validations.sql.

-- Transaction Status results that arrived before their query was recorded (Daraja answers within
-- milliseconds of its acknowledgement, possibly to another instance). Held, capped in count and
-- size, for a few minutes; the query's recording binds it (outcome set), under the same named
-- lock as the result's own write, so that neither can miss the other.
CREATE TABLE status_results_early (
    conversation_id  TEXT PRIMARY KEY,
    provider         TEXT NOT NULL,
    originator_id    TEXT NOT NULL,
    transaction_id   TEXT NOT NULL,
    result           BYTEA NOT NULL,
    received_at      TIMESTAMPTZ NOT NULL,
    outcome          TEXT CHECK (outcome IN ('accepted', 'unmatched', 'contradicted'))
);
CREATE INDEX status_results_early_received ON status_results_early (received_at);

-- What a C2B validation request said about a payment before money moved: the account (meter)
-- the customer typed, the amount and the payer as Daraja showed them. A confirmation of that
-- TransID naming another account is refused (payment_claim_contradicted).
CREATE TABLE c2b_validations (
    provider      TEXT NOT NULL,
    trans_id      TEXT NOT NULL,
    account       TEXT NOT NULL,
    amount_minor  BIGINT NOT NULL CHECK (amount_minor > 0),
    currency      TEXT NOT NULL,
    payer         TEXT,
    validated_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (provider, trans_id)
);
CREATE INDEX c2b_validations_at ON c2b_validations (validated_at);

-- C2B confirmations recorded but not yet carried through (the route answers Daraja as soon as
-- the claim is recorded and checks it in the background): the sweeper finishes any a crash
-- left, once next_try_at has passed (a lease: whoever takes a claim moves it on).
CREATE TABLE pending_claims (
    provider     TEXT NOT NULL,
    reference    TEXT NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_try_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (provider, reference)
);
CREATE INDEX pending_claims_due ON pending_claims (next_try_at);
