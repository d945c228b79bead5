"""The SMS that carries a token, in the customer's language, sized by GSM-7 segments.

The templates are catalogue messages (``token_sms``, ``token_sms_short``, ``token_sms_key_change``,
``token_sms_key_change_short``, ``token_sms_debt``, ``token_sms_debt_short`` and ``fbe_sms`` in
``flows/messages/{en,sw,fr}.py``), so the catalogue tests see them; the length rule counts
segments as the network does (``flows.messages.gsm7``).
"""

from __future__ import annotations

from collections.abc import Sequence

from flows.messages import text
from flows.messages.gsm7 import segment_count
from flows.ports import Language
from gateway.values.money import Money

__all__ = ["fbe_message", "group_digits", "token_message"]


def group_digits(token: str) -> str:
    """``12345678…`` → ``1234-5678-…``: a token as it is typed into a meter."""
    return "-".join(token[i : i + 4] for i in range(0, len(token), 4))


def _language(language: str) -> Language:
    try:
        return Language(language)
    except ValueError:
        return Language.EN


def token_message(  # noqa: PLR0913 - keyword-only: every part of the SMS by name
    *,
    token: str,
    units: int,
    amount: Money,
    meter: str,
    receipt: str,
    language: str = "en",
    key_change_tokens: Sequence[str] = (),
    debt_recovered: Money | None = None,
    debt_remaining: Money | None = None,
) -> str:
    """The SMS that carries a token: token in groups of 4, kWh, amount, meter, receipt number.

    Fits one SMS segment when it can, falling back to a terse template, and never needs more than
    two segments. Unknown languages fall back to English. With ``key_change_tokens`` (a key
    rotation), they come first, in the order to key them in, each grouped by 4, then the credit
    token: one message of at most two segments.

    Args:
        token: the 20 digits.
        units: tenths of a kWh.
        amount: what the customer paid.
        meter: the meter number.
        receipt: the provider's receipt number (our purchase id when the provider gave none).
        language: ``en``, ``sw`` or ``fr``.
        key_change_tokens: the key-change set (20 digits each), in order.
        debt_recovered: what the purchase gave to the meter's debt; the text says so when given.
        debt_remaining: what the meter still owes after it.

    Raises:
        ValueError: even the terse text exceeds two segments (absurdly long meter or receipt).
    """
    values = {
        "token": group_digits(token),
        "kwh": f"{units // 10}.{units % 10}",
        "amount": str(amount),
        "meter": meter,
        "receipt": receipt,
        "kcts": " ".join(group_digits(kct) for kct in key_change_tokens),
    }
    lang = _language(language)
    full, short = (
        ("token_sms_key_change", "token_sms_key_change_short")
        if key_change_tokens
        else ("token_sms", "token_sms_short")
    )
    debt, short_debt = "", ""
    if debt_recovered is not None:
        owed = {
            "recovered": str(debt_recovered),
            "remaining": str(debt_remaining or Money(0, debt_recovered.currency)),
        }
        debt = text(lang, "token_sms_debt", **owed)
        short_debt = text(lang, "token_sms_debt_short", **owed)
    message = text(lang, full, **values) + debt
    if segment_count(message) == 1:
        return message
    terse = text(lang, short, **values) + short_debt
    # The fewest segments first, then the fuller text.
    for candidate in (terse, message) if segment_count(terse) == 1 else (message, terse):
        if segment_count(candidate) <= 2:
            return candidate
    raise ValueError(f"token message of {len(terse)} characters exceeds two SMS segments")


def fbe_message(*, token: str, units: int, month: str, meter: str, language: str = "en") -> str:
    """The SMS that carries a month's free basic electricity token (one GSM-7 segment)."""
    return text(
        _language(language),
        "fbe_sms",
        token=group_digits(token),
        kwh=f"{units // 10}.{units % 10}",
        month=month,
        meter=meter,
    )
