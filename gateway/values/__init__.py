"""Value types every layer may import: they import nothing of ours but the error root.

- :mod:`gateway.values.money`: money as integer minor units plus an ISO 4217 currency;
- :mod:`gateway.values.phone`: E.164 mobile numbers (``Msisdn``);
- :mod:`gateway.values.ids`: ``PurchaseId`` and ``MeterNumber``;
- :mod:`gateway.values.messages`: outbox messages and SMS delivery reports, seen by the ledger
  (which stores them) and by ``gateway/sms/`` (which sends them) without either importing the other.

See docs/architecture.md, "Who may import whom".
"""
