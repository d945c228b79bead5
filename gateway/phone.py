"""Phone numbers: moved to :mod:`gateway.values.phone`, re-exported here for older imports."""

from gateway.values.phone import (
    InvalidPhoneNumber,
    Msisdn,
    international_digits,
    masked,
    national_significant,
    parse_msisdn,
)

__all__ = [
    "InvalidPhoneNumber",
    "Msisdn",
    "international_digits",
    "masked",
    "national_significant",
    "parse_msisdn",
]
