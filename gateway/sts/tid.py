"""Token identifiers (TID): minutes since the key's base date (IEC 62055-41; docs/sts.md §8).

A TID is the number of whole minutes from 00:00 on 1 January of the base date (1993, 2014 or
2035, an attribute of the vending key) to the time the token is issued, in 24 bits. A meter
refuses a TID it has seen, and one older than everything in its TID store, so the vending side
must hand out TIDs that are unique and increasing per meter:

* minute 00:01 of every day (``tid % 1440 == 1``) is reserved and never issued;
* several tokens for one meter in the same minute take consecutive TIDs;
* past 2**24 - 1 minutes the base date's range has ended (1993: 2024-11-24 20:15 UTC) and the
  meter needs a key change with the TID-rollover flag (RO = 1) to a key with a later base date.

Time zone: the sources do not say in which zone the minutes are counted (vendors use local
time). We count in **UTC** (:data:`TID_ZONE`) unless a caller passes the zone its keys were
issued in; every issuer for one meter must use the same zone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from typing import Final

from gateway.sts.errors import InvalidField, TidRangeExhausted

TID_BITS: Final = 24
TID_MAX: Final = 2**TID_BITS - 1
MINUTES_PER_DAY: Final = 1440
#: ``tid % 1440`` of the reserved minute (00:01 of every day), never issued.
RESERVED_MINUTE: Final = 1
#: The base dates of IEC 62055-41 (the KLF attribute BDT of a vending key).
BASE_DATES: Final = (1993, 2014, 2035)
#: The zone the minutes are counted in unless the caller says otherwise.
TID_ZONE: Final[tzinfo] = UTC


def _check_base_date(base_date: int) -> int:
    if base_date not in BASE_DATES:
        raise InvalidField("base_date", base_date, f"must be one of {BASE_DATES}")
    return base_date


def range_end(base_date: int, *, zone: tzinfo = TID_ZONE) -> datetime:
    """The last minute a key with ``base_date`` can issue a TID for (TID 2**24 - 1)."""
    start = datetime(_check_base_date(base_date), 1, 1, tzinfo=zone)
    return start + timedelta(minutes=TID_MAX)


def tid_for(now: datetime, base_date: int, *, zone: tzinfo = TID_ZONE) -> int:
    """Whole minutes from ``base_date``-01-01 00:00 to ``now``, counted in ``zone``.

    ``now`` must be timezone-aware. This is the raw minute count: it does not skip the reserved
    minute nor look at earlier TIDs (that is :func:`next_tid`).

    Raises:
        InvalidField: ``now`` is naive or before the base date, or the base date is unknown.
        TidRangeExhausted: the minute count no longer fits in 24 bits.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise InvalidField("now", now, "the issue time must be timezone-aware")
    _check_base_date(base_date)
    local = now.astimezone(zone).replace(tzinfo=None)
    minutes = int((local - datetime(base_date, 1, 1)).total_seconds() // 60)  # noqa: DTZ001 - wall clock in zone
    if minutes < 0:
        raise InvalidField("now", now, f"the issue time is before the base date {base_date}")
    if minutes > TID_MAX:
        raise TidRangeExhausted(
            f"the {base_date} base date's TID range ended at"
            f" {range_end(base_date, zone=zone):%Y-%m-%d %H:%M %Z}"
            f" (2**24 - 1 minutes); the meter needs a TID-rollover key change (RO = 1) to a key"
            f" with a later base date before it can take new tokens"
        )
    return minutes


def is_reserved(tid: int) -> bool:
    """Whether ``tid`` falls on the reserved minute 00:01, which is never issued."""
    return tid % MINUTES_PER_DAY == RESERVED_MINUTE


def next_tid(
    now: datetime, base_date: int, last_tid: int | None, *, zone: tzinfo = TID_ZONE
) -> int:
    """The TID to issue at ``now`` for a meter whose last issued TID is ``last_tid``.

    It is ``max(tid_for(now), last_tid + 1)``, moved past the reserved minute, so two tokens in
    the same minute get consecutive TIDs and TIDs never go backwards (even if the clock does).

    Raises:
        TidRangeExhausted: the result would not fit in 24 bits.
        InvalidField: as :func:`tid_for`.
    """
    tid = tid_for(now, base_date, zone=zone)
    if last_tid is not None:
        tid = max(tid, last_tid + 1)
    if is_reserved(tid):
        tid += 1
    if tid > TID_MAX:
        raise TidRangeExhausted(
            f"the {base_date} base date's TID range is used up (last TID {last_tid}); the meter"
            f" needs a TID-rollover key change (RO = 1) to a key with a later base date"
        )
    return tid
