-- sts-gateway ledger, schema 3 (SQLite): a provider's receipt pays for at most one purchase.
-- A receipt (M-Pesa: the STK MpesaReceiptNumber and the C2B TransID share one namespace; MoMo's
-- financialTransactionId; Airtel's id) proven paid (succeeded) or proven of the wrong amount
-- (mismatched) may be claimed by one payment row only, whatever route, instance or restart
-- claims it again. A second claim is refused in the claiming transaction (ReceiptReused).

CREATE UNIQUE INDEX payments_receipt_once ON payments (provider, receipt)
    WHERE receipt IS NOT NULL AND state IN ('succeeded', 'mismatched');
