"""Tokens per second on one core: whole 20-digit STS tokens, EA07 (STA) and EA11 (MISTY1).

Usage: ``python bench/tokens.py [--tokens N] [--repeat R]``

"Whole token" = data block with CRC, encryption, class-bit transposition, 20 digits. Three
pipelines are timed:

* ``engine``: the project's token path, ``gateway.sts.tokens.token_digits(UnitsCredit(...),
  cipher)`` (field validation, amount encoding, layout packing, CRC, cipher, transposition,
  digits). The targets are judged on this one.
* ``inline``: the same steps written inline below (CRC-16/MODBUS table, shifts, f-string), to
  show what the cipher costs inside a lean pipeline.
* ``product``: ``LocalTokenEngine.credit_token_sync`` for DKGA04 meters, the call a vend makes
  (KEN check, RND, the engine's LRU of derived keys and ciphers); "no cache" here is the engine
  with ``cache_size=0``, which derives the decoder key (HMAC-SHA-256) for every token as well.

Each runs "no cache" (a new cipher per token: ``make_cipher`` for the engine, ``sta_encrypt`` or a
new ``Misty1Cipher`` inline) and "cache" (one cipher per meter, reused: the per-meter cache),
over a pool of ``METERS`` meters with random decoder keys, so the tables are used the way a real
mix of meters uses them. The cipher alone is timed too. The baseline, measured in the same run,
is single-block DES with a new pycryptodome cipher object per call.

Rates are per CPU-second of this process (``time.process_time``), pinned to one core where the
OS allows, so other work on the machine does not count against them; each figure is the best of
``--repeat`` runs of ``--tokens`` tokens. The last line printed is one JSON object with all
figures and their ratios to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Crypto.Cipher import DES

from gateway.sts.cipher import make_cipher
from gateway.sts.ea07 import StaCipher, sta_encrypt
from gateway.sts.ea11 import Misty1Cipher
from gateway.sts.engine import LocalTokenEngine, MeterProfile, VendingKey
from gateway.sts.pan import luhn_check_digit
from gateway.sts.tokens import UnitsCredit, build_token, token_digits

# SPEC §11: DK 87f3ecbb2e46b48f, RND 5, TID 85740, 0.1 kWh -> 70630503470028726114.
EA07_KEY = bytes.fromhex("87f3ecbb2e46b48f")
EA11_KEY = bytes.fromhex("f94b6ed353c3bfdb113e2d3a7ea3c41d")  # vector v470's decoder key
FIRST_TID = 85740
EXPECTED_FIRST_EA07 = "70630503470028726114"
METERS = 1000
_rng = random.Random(62055)  # fixed seed: the same meters every run
EA07_KEYS = [_rng.randbytes(8) for _ in range(METERS)]
EA11_KEYS = [_rng.randbytes(16) for _ in range(METERS)]
VENDING_KEY = VendingKey(sgc="201457", krn=1, dkga=4, base_date=2014, key=_rng.randbytes(20))
_SERIALS = [f"{_rng.randrange(10**10):010d}" for _ in range(METERS)]
DRNS = [serial + luhn_check_digit(serial) for serial in _SERIALS]


def meters(ea: int) -> list[MeterProfile]:
    """The bench's meters: DKGA04, SGC 201457, KRN 1, base date 2014, algorithm ``ea``."""
    return [
        MeterProfile(drn=drn, sgc="201457", tariff_index="01", krn=1, base_date=2014, ea=ea)
        for drn in DRNS
    ]


TARGETS = {  # tokens/s/core the task set
    "ea07_no_cache": 60_000,
    "ea07_cache": 100_000,
    "ea11": 30_000,
}


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


CRC_TABLE = _crc_table()


def inline_token(tid: int, amount: int, encrypt: Callable[[int], int]) -> str:
    """Class 0 subclass 0 token with RND 5: SPEC §2-§4 and §7 written out (amount < 16384)."""
    head = 5 << 40 | tid << 16 | amount  # class 0, subclass 0: RND, TID, amount (e = 0)
    crc = 0xFFFF
    table = CRC_TABLE
    for shift in (48, 40, 32, 24, 16, 8, 0):
        crc = (crc >> 8) ^ table[(crc ^ (head >> shift)) & 0xFF]
    block = (head & 0xFFFF_FFFF_FFFF) << 16 | (crc & 0xFF) << 8 | crc >> 8
    c = encrypt(block)
    value = (c >> 27 & 3) << 64 | (c & ~(3 << 27))  # class 0: bits 28/27 become 0
    return f"{value:020d}"


def best_rate(run: Callable[[int], object], tokens: int, repeat: int) -> float:
    """The best tokens per second over ``repeat`` runs of ``run(tokens)``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        run(tokens)
        best = min(best, time.process_time() - start)
    return tokens / best


def des_baseline(n: int) -> None:
    """Single-block DES with a new pycryptodome cipher object per call."""
    key = bytes.fromhex("0123456789abcdef")
    for i in range(n):
        DES.new(key, DES.MODE_ECB).encrypt(i.to_bytes(8, "big"))  # noqa: S304 - the baseline


def ea07_engine_no_cache(n: int) -> None:
    """EA07 through token_digits, a new cipher (make_cipher) per token."""
    keys = EA07_KEYS
    for i in range(n):
        fields = UnitsCredit(rnd=5, tid=FIRST_TID + i, amount=1 + i % 16000)
        token_digits(fields, make_cipher(7, keys[i % METERS]))


def ea07_engine_cache(n: int) -> None:
    """EA07 through token_digits, each meter's cipher reused."""
    ciphers = [make_cipher(7, key) for key in EA07_KEYS]
    for i in range(n):
        fields = UnitsCredit(rnd=5, tid=FIRST_TID + i, amount=1 + i % 16000)
        token_digits(fields, ciphers[i % METERS])


def ea07_inline_no_cache(n: int) -> None:
    """EA07 inline pipeline with sta_encrypt (no per-key state)."""
    keys = EA07_KEYS
    for i in range(n):
        inline_token(FIRST_TID + i, 1 + i % 16000, partial(sta_encrypt, key=keys[i % METERS]))


def ea07_inline_cache(n: int) -> None:
    """EA07 inline pipeline, each meter's StaCipher reused."""
    encrypts = [StaCipher(key).encrypt for key in EA07_KEYS]
    for i in range(n):
        inline_token(FIRST_TID + i, 1 + i % 16000, encrypts[i % METERS])


def ea07_cipher_no_cache(n: int) -> None:
    """sta_encrypt alone."""
    keys = EA07_KEYS
    for i in range(n):
        sta_encrypt(i * 0x9E3779B97F4A7C15 & 0xFFFF_FFFF_FFFF_FFFF, keys[i % METERS])


def ea07_cipher_cache(n: int) -> None:
    """StaCipher.encrypt alone, each meter's cipher reused."""
    encrypts = [StaCipher(key).encrypt for key in EA07_KEYS]
    for i in range(n):
        encrypts[i % METERS](i * 0x9E3779B97F4A7C15 & 0xFFFF_FFFF_FFFF_FFFF)


def ea11_engine_no_cache(n: int) -> None:
    """EA11 through token_digits, a new cipher (make_cipher) per token."""
    keys = EA11_KEYS
    for i in range(n):
        fields = UnitsCredit(rnd=5, tid=FIRST_TID + i, amount=1 + i % 16000)
        token_digits(fields, make_cipher(11, keys[i % METERS]))


def ea11_engine_cache(n: int) -> None:
    """EA11 through token_digits, each meter's cipher reused."""
    ciphers = [make_cipher(11, key) for key in EA11_KEYS]
    for i in range(n):
        fields = UnitsCredit(rnd=5, tid=FIRST_TID + i, amount=1 + i % 16000)
        token_digits(fields, ciphers[i % METERS])


def ea11_inline_no_cache(n: int) -> None:
    """EA11 inline pipeline, a new Misty1Cipher per token."""
    keys = EA11_KEYS
    for i in range(n):
        inline_token(FIRST_TID + i, 1 + i % 16000, Misty1Cipher(keys[i % METERS]).encrypt)


def ea11_inline_cache(n: int) -> None:
    """EA11 inline pipeline, each meter's Misty1Cipher reused."""
    encrypts = [Misty1Cipher(key).encrypt for key in EA11_KEYS]
    for i in range(n):
        inline_token(FIRST_TID + i, 1 + i % 16000, encrypts[i % METERS])


def ea11_cipher_no_cache(n: int) -> None:
    """A new Misty1Cipher per block."""
    keys = EA11_KEYS
    for i in range(n):
        Misty1Cipher(keys[i % METERS]).encrypt(i * 0x9E3779B97F4A7C15 & 0xFFFF_FFFF_FFFF_FFFF)


def ea11_cipher_cache(n: int) -> None:
    """Misty1Cipher.encrypt alone, each meter's cipher reused."""
    encrypts = [Misty1Cipher(key).encrypt for key in EA11_KEYS]
    for i in range(n):
        encrypts[i % METERS](i * 0x9E3779B97F4A7C15 & 0xFFFF_FFFF_FFFF_FFFF)


def _product(ea: int, cache_size: int) -> Callable[[int], None]:
    # One engine and one set of profiles per case, as in the service: the first (cold) run
    # derives the keys, and only the best run counts.
    engine = LocalTokenEngine([VENDING_KEY], cache_size=cache_size)
    pool = meters(ea)

    def run(n: int) -> None:
        for i in range(n):
            engine.credit_token_sync(pool[i % METERS], 1 + i % 16000, FIRST_TID + i)

    cached = "the engine's LRU of keys and ciphers" if cache_size else "no LRU: DKGA04 per token"
    run.__doc__ = f"EA{ea:02d} LocalTokenEngine.credit_token_sync, {cached}"
    return run


CASES: dict[str, Callable[[int], None]] = {
    "ea07_engine_no_cache": ea07_engine_no_cache,
    "ea07_engine_cache": ea07_engine_cache,
    "ea07_inline_no_cache": ea07_inline_no_cache,
    "ea07_inline_cache": ea07_inline_cache,
    "ea07_cipher_no_cache": ea07_cipher_no_cache,
    "ea07_cipher_cache": ea07_cipher_cache,
    "ea11_engine_no_cache": ea11_engine_no_cache,
    "ea11_engine_cache": ea11_engine_cache,
    "ea11_inline_no_cache": ea11_inline_no_cache,
    "ea11_inline_cache": ea11_inline_cache,
    "ea11_cipher_no_cache": ea11_cipher_no_cache,
    "ea11_cipher_cache": ea11_cipher_cache,
    "ea07_product_no_cache": _product(7, 0),
    "ea07_product_cache": _product(7, 10 * METERS),
    "ea11_product_no_cache": _product(11, 0),
    "ea11_product_cache": _product(11, 10 * METERS),
}


def check_pipelines() -> None:
    """Both pipelines give SPEC §11's token before anything is timed."""
    fields = UnitsCredit(rnd=5, tid=FIRST_TID, amount=1)
    engine = token_digits(fields, make_cipher(7, EA07_KEY))
    inline = inline_token(FIRST_TID, 1, StaCipher(EA07_KEY).encrypt)
    if not build_token(fields, make_cipher(7, EA07_KEY)).digits == engine == inline:
        raise SystemExit(f"pipelines disagree: engine {engine}, inline {inline}")
    if engine != EXPECTED_FIRST_EA07:
        raise SystemExit(f"SPEC §11 expects {EXPECTED_FIRST_EA07}, the engine gave {engine}")
    for i in (0, 7, 12345):
        fields = UnitsCredit(rnd=5, tid=FIRST_TID + i, amount=1 + i)
        cipher = Misty1Cipher(EA11_KEY)
        if token_digits(fields, cipher) != inline_token(FIRST_TID + i, 1 + i, cipher.encrypt):
            raise SystemExit("EA11 pipelines disagree")


def pin_to_one_core() -> int | None:
    """Run on a single CPU where the OS allows it; returns that CPU's number."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def main() -> int:
    """Run every case, print one readable line each, then the JSON summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (best is kept)")
    args = parser.parse_args()

    cpu = pin_to_one_core()
    check_pipelines()
    for case in CASES.values():  # warm up: builds the lookup tables, fills caches
        case(200)
    baseline = best_rate(des_baseline, args.tokens, args.repeat)
    print(f"{'baseline':<23} {baseline:>10,.0f} /s  x 1.00  DES, new pycryptodome object per block")
    rates: dict[str, float] = {}
    for name, case in CASES.items():
        rates[name] = best_rate(case, args.tokens, args.repeat)
        label = (case.__doc__ or name).rstrip(".")
        print(f"{name:<23} {rates[name]:>10,.0f} /s  x{rates[name] / baseline:5.2f}  {label}")
    verdicts = {
        "ea07_no_cache": rates["ea07_engine_no_cache"] >= TARGETS["ea07_no_cache"],
        "ea07_cache": rates["ea07_engine_cache"] >= TARGETS["ea07_cache"],
        "ea11": rates["ea11_engine_cache"] >= TARGETS["ea11"],
    }
    for target, met in verdicts.items():
        print(f"target {target} >= {TARGETS[target]:,}/s with the engine path: {met}")
    summary = {
        "unit": "tokens_per_second_one_core",
        "tokens_per_run": args.tokens,
        "repeat": args.repeat,
        "cpu": cpu,
        "python": platform.python_version(),
        "baseline_des_new_object_per_block": round(baseline),
        "rates": {name: round(rate) for name, rate in rates.items()},
        "ratios_to_baseline": {name: round(rate / baseline, 3) for name, rate in rates.items()},
        "targets": TARGETS,
        "targets_met_engine_path": verdicts,
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
