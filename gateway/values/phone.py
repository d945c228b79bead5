"""Phone numbers: E.164 inside the product, formatted per provider only at the edge.

``Msisdn`` is an E.164 string such as ``"+254712345678"``. Parsing uses the ``phonenumbers`` library
(Google's libphonenumber metadata) rather than hand-written prefix rules.
"""

from __future__ import annotations

from typing import NewType

import phonenumbers

from gateway.errors import GatewayError

Msisdn = NewType("Msisdn", str)
"""A mobile subscriber number in E.164 form (``+`` and digits), validated."""


class InvalidPhoneNumber(GatewayError):
    """The text is not a valid mobile number for the region."""

    def __init__(self, text: str, region: str) -> None:
        super().__init__(f"not a valid phone number for {region}: {text!r}")
        self.text = text
        self.region = region


def parse_msisdn(text: str, default_region: str = "KE") -> Msisdn:
    """Normalise ``text`` (``0712…``, ``254712…``, ``+254 712 …``) to E.164.

    Args:
        text: the number as a customer, provider or operator wrote it.
        default_region: ISO 3166 region assumed when the number has no country code.

    Raises:
        InvalidPhoneNumber: it cannot be parsed or is not a valid number.
    """
    candidate = text.strip()
    digits = candidate.lstrip("+")
    # Providers (Daraja, MoMo) send international numbers without the "+": 2547…, 2567…
    if not candidate.startswith("+") and digits.isdigit() and len(digits) > 10:
        candidate = "+" + digits
    try:
        number = phonenumbers.parse(candidate, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidPhoneNumber(text, default_region) from exc
    if not phonenumbers.is_valid_number(number):
        raise InvalidPhoneNumber(text, default_region)
    return Msisdn(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def international_digits(msisdn: Msisdn) -> str:
    """The number without ``+``, as Daraja and MoMo expect it (``254712345678``)."""
    return msisdn.removeprefix("+")


def national_significant(msisdn: Msisdn) -> str:
    """The number without country code or trunk prefix, as Airtel expects it (``712345678``)."""
    number = phonenumbers.parse(msisdn)
    return phonenumbers.national_significant_number(number)


def masked(msisdn: Msisdn) -> str:
    """The number for logs and screens: country code and last 3 digits (``+254******678``)."""
    return msisdn[:4] + "*" * max(0, len(msisdn) - 7) + msisdn[-3:]
