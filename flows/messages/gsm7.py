"""How many SMS segments a text takes: GSM-7 septets (extension characters count twice) or UCS-2.

One GSM-7 segment holds 160 septets; a concatenated message holds 153 per segment (the rest is
the user data header). A single character outside the GSM-7 tables makes the whole message UCS-2:
70 code units in one segment, 67 per segment when concatenated (docs/protocols.md §5). The token
SMS builder (``flows.messages.tokens``) and the Africa's Talking simulator count with these
functions, so what we plan is what the simulator bills.
"""

from __future__ import annotations

import math
from typing import Final

GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED: Final = frozenset("^{}\\[~]|€\f")
GSM7_SINGLE: Final = 160  # septets in one segment
GSM7_PER_PART: Final = 153  # septets per segment of a concatenated message
UCS2_SINGLE: Final = 70
UCS2_PER_PART: Final = 67


def is_gsm7(text: str) -> bool:
    """Whether every character of ``text`` is in the GSM-7 basic or extension table."""
    return all(ch in GSM7_BASIC or ch in GSM7_EXTENDED for ch in text)


def sms_segments(text: str) -> tuple[str, int]:
    """The encoding a network would use for ``text`` (``GSM-7`` or ``UCS-2``) and its segments."""
    if is_gsm7(text):
        septets = sum(2 if ch in GSM7_EXTENDED else 1 for ch in text)
        return "GSM-7", 1 if septets <= GSM7_SINGLE else math.ceil(septets / GSM7_PER_PART)
    units = len(text.encode("utf-16-le")) // 2
    return "UCS-2", 1 if units <= UCS2_SINGLE else math.ceil(units / UCS2_PER_PART)


def segment_count(text: str) -> int:
    """How many SMS segments ``text`` takes."""
    return sms_segments(text)[1]


__all__ = [
    "GSM7_BASIC",
    "GSM7_EXTENDED",
    "GSM7_PER_PART",
    "GSM7_SINGLE",
    "UCS2_PER_PART",
    "UCS2_SINGLE",
    "is_gsm7",
    "segment_count",
    "sms_segments",
]
