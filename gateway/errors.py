"""The root of the gateway's error trees.

```
GatewayError                      gateway/errors.py
  ConfigError                     a setting is missing or malformed (names the setting)
  LedgerMissing                   the ledger file is gone from a data directory in use
  PaymentError                    gateway/payments/base.py (provider, reference, retryable)
  LedgerError                     gateway/ledger/base.py
  SmsError                        gateway/sms/base.py
StsError                          gateway/sts/errors.py, standalone: sts/ imports nothing of ours
```

Every error carries its context as attributes and a message that says what was expected and what
arrived. Whether an error is worth retrying is decided once, by the adapter that raised it
(``retryable``); callers read the flag and never guess from the text.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose.

    Args:
        message: operator-facing text: what was expected and what arrived.
        retryable: whether the same call may succeed if simply tried again later.
    """

    retryable: bool

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ConfigError(GatewayError):
    """A setting is missing or malformed; the message names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting


class LedgerMissing(GatewayError):
    """The ledger file is gone from a data directory that shows the gateway ran there before."""
