-- sts-gateway ledger, schema 3 (SQLite): a provider's receipt pays for at most one purchase.
-- A receipt (M-Pesa: the STK MpesaReceiptNumber and the C2B TransID share one namespace; MoMo's
-- financialTransactionId; Airtel's id) proven paid (succeeded) or proven of the wrong amount
-- (mismatched) may be claimed by one payment row only, whatever route, instance or restart
-- claims it again. A second claim is refused in the claiming transaction (ReceiptReused).

CREATE UNIQUE INDEX payments_receipt_once ON payments (provider, receipt)
    WHERE receipt IS NOT NULL AND state IN ('succeeded', 'mismatched');

-- Our outstanding asynchronous status queries (Daraja Transaction Status) and their results: a
-- result posted to any instance is accepted only for the request the provider acknowledged
-- (conversation and originator ids), once, for the transaction asked about; whichever
-- instance waits reads it from here.
CREATE TABLE status_queries (
    conversation_id  TEXT PRIMARY KEY,
    originator_id    TEXT NOT NULL,
    provider         TEXT NOT NULL,
    transaction_id   TEXT NOT NULL,
    asked_at         TEXT NOT NULL,
    result           BLOB,
    answered_at      TEXT
);
CREATE INDEX status_queries_asked ON status_queries (asked_at);
