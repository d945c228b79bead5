"""Scheduled retries in one place: capped exponential backoff, with or without jitter.

A call retried at once, in the same await (the Redis session store), uses tenacity. Work retried
later, when a row comes due again, stores the time of its next try; that time is ``base · 2^n``
seconds from now capped at ``cap`` (``n`` the number of earlier retries), optionally jittered so
that many failures at once do not come back at once:

- ``full``: a random part of the whole delay;
- ``equal``: half the delay plus a random part of the other half (the outbox: spread out, never
  immediate);
- none: the delay itself (the saga's deferred payment requests, which the sweeper picks up).

It imports nothing of ours, so every layer may use it.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from typing import Literal

Jitter = Literal["none", "full", "equal"]


def backoff_s(
    retries: int,
    *,
    base_s: float,
    cap_s: float,
    jitter: Jitter = "none",
    random: Callable[[], float] = _random.random,
) -> float:
    """The wait before the next try, seconds, after ``retries`` earlier retries (0 for the first).

    Args:
        retries: how many retries came before this one (negative counts as 0).
        base_s: the first retry's delay before jitter.
        cap_s: the largest delay before jitter.
        jitter: how much of the delay is random (see the module docstring).
        random: a source of floats in [0, 1) (a seam for tests).
    """
    delay = min(cap_s, base_s * 2.0 ** max(0, retries))
    if jitter == "full":
        return random() * delay
    if jitter == "equal":
        return delay / 2 + delay / 2 * random()
    return delay
