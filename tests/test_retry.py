"""The one backoff formula: capped exponential, with full, equal or no jitter."""

from __future__ import annotations

import pytest

from gateway.retry import backoff_s


@pytest.mark.parametrize(("retries", "expected"), [(-1, 5.0), (0, 5.0), (1, 10.0), (3, 40.0)])
def test_the_delay_doubles_from_the_base(retries: int, expected: float) -> None:
    """``base · 2^n``, with a negative count read as none."""
    assert backoff_s(retries, base_s=5.0, cap_s=900.0) == expected


def test_the_delay_is_capped() -> None:
    """Past the cap the delay stays at the cap, however many retries came before."""
    assert backoff_s(60, base_s=5.0, cap_s=900.0) == 900.0


def test_full_jitter_is_a_random_part_of_the_delay() -> None:
    """``full``: random · delay, from 0 to the delay."""
    assert backoff_s(2, base_s=1.0, cap_s=10.0, jitter="full", random=lambda: 0.0) == 0.0
    assert backoff_s(2, base_s=1.0, cap_s=10.0, jitter="full", random=lambda: 0.5) == 2.0


def test_equal_jitter_keeps_half_the_delay() -> None:
    """``equal``: half the delay plus a random part of the other half, never immediate."""
    assert backoff_s(2, base_s=1.0, cap_s=10.0, jitter="equal", random=lambda: 0.0) == 2.0
    assert backoff_s(2, base_s=1.0, cap_s=10.0, jitter="equal", random=lambda: 0.5) == 3.0
