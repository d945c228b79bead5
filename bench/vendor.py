"""Vendor API vends per second: signed requests against the same vend without signing, one run.

Two gateways' vendor routes are served on loopback over one SQLite ledger each (the same
schema, the real saga and ``LocalTokenEngine``, a vendor with a float large enough):

* signed: every request is signed by ``gateway.vendor_client`` and verified in full (key look-up,
  Content-Digest, HMAC-SHA256, clock skew, the nonce remembered in the ledger, rate limits);
* unsigned: the same client, the same vend route and service, but ``authenticate`` returns the
  vendor without looking at the request (what a gateway without signing would do).

Each vend has its own idempotency key (a fresh sale), one meter per concurrent caller (so TIDs
do not serialise the callers on one meter). Prints the figures, the ratio, and as the last line a
JSON object of them.

    python bench/vendor.py [--vends 2000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import web

from gateway.ledger import Ledger, MeterNumber, MeterRecord, open_sqlite_ledger
from gateway.ledger.vendor import VendorLedger, VendorSteps
from gateway.payments import PaymentProvider
from gateway.sts import LocalTokenEngine, VendingKey
from gateway.sts.pan import luhn_check_digit
from gateway.tariff import Tariff
from gateway.vending import SagaPolicy, Vending
from gateway.vendor.service import Caller, VendorService
from gateway.vendor_client import VendorClient

KEY = VendingKey(sgc="123457", krn=1, dkga=4, base_date=2014, key=bytes.fromhex("0abc" * 10))
TARIFF = Tariff(
    tariff_id="domestic",
    name="Domestic",
    currency="KES",
    price_per_kwh_minor=2500,
    vat_basis_points=1600,
    min_purchase_minor=1000,
    max_purchase_minor=3_500_000,
)


class UnsignedService(VendorService):
    """The same service, trusting every request as the bench vendor (no signature checked)."""

    caller: Caller | None = None

    async def authenticate(self, **_request: Any) -> Caller:  # noqa: ANN401 - as the parent's
        """The vendor, unchecked."""
        assert self.caller is not None  # noqa: S101 - set before the run
        return self.caller


def _drn(number: int) -> str:
    body = f"04{number:08d}"
    return body + luhn_check_digit(body)


async def _seed(ledger: Ledger, meters: int) -> None:
    await ledger.put_tariff(TARIFF)
    for number in range(meters):
        await ledger.put_meter(
            MeterRecord(
                drn=MeterNumber(_drn(number)),
                customer_name="Bench Meter",
                sgc="123457",
                tariff_index="01",
                krn=1,
                tariff_id=TARIFF.tariff_id,
            )
        )


async def _serve(service: VendorService) -> tuple[web.AppRunner, str]:
    from gateway.web.vendor import vendor_routes  # noqa: PLC0415 - the web layer, served here

    app = web.Application()
    app.add_routes(vendor_routes(service))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _measure(
    path: Path, *, signed: bool, vends: int, concurrency: int
) -> Mapping[str, float]:
    async with open_sqlite_ledger(path) as ledger:
        await _seed(ledger, concurrency)
        vending = Vending(
            ledger=ledger,
            engine=LocalTokenEngine([KEY]),
            # Vendor sales never collect: no provider is ever asked (a placeholder for the saga).
            providers={"none": cast("PaymentProvider", object())},
            default_provider="none",
            policy=SagaPolicy(),
        )
        assert isinstance(ledger, VendorSteps)  # noqa: S101 - both backends have the port
        vendors: VendorLedger = ledger
        cls = VendorService if signed else UnsignedService
        # Keys are sealed under a master key (fresh per run); the signed run unseals each time.
        service = cls(vending, ledger, vendors, engine_wait_s=30.0, master_key=os.urandom(32))
        registered = await service.register(
            "bench", name="Bench", currency="KES", terminals=("t1",), rate_per_minute=10**9,
            actor="bench",
        )  # fmt: skip
        await vendors.top_up_float("bench", 10**12, reference="BENCH", actor="bench")
        if isinstance(service, UnsignedService):
            key = await vendors.get_vendor_key(registered.key.key_id)
            assert key is not None  # noqa: S101 - just added
            service.caller = Caller(
                vendor=await vendors.get_vendor("bench"), terminal=None, key=key
            )
        runner, url = await _serve(service)
        latencies: list[float] = []
        try:
            async with VendorClient(url, registered.key.key_id, registered.key.secret) as client:
                queue: asyncio.Queue[int] = asyncio.Queue()
                for number in range(vends):
                    queue.put_nowait(number)

                async def worker(meter: str) -> None:
                    while not queue.empty():
                        number = queue.get_nowait()
                        started = time.perf_counter()
                        reply = await client.vend(meter, 10_000, idempotency_key=f"b{number}")
                        latencies.append(time.perf_counter() - started)
                        if reply.status != 201:
                            raise RuntimeError(f"vend {number}: {reply.status} {reply.body!r}")

                started = time.perf_counter()
                await asyncio.gather(*(worker(_drn(i)) for i in range(concurrency)))
                elapsed = time.perf_counter() - started
        finally:
            await runner.cleanup()
        latencies.sort()
        return {
            "vends_per_s": round(vends / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        }


async def main(args: argparse.Namespace) -> dict[str, object]:
    """Both runs, unsigned first, in one scratch directory."""
    with tempfile.TemporaryDirectory(prefix="bench-vendor-") as scratch:
        unsigned = await _measure(
            Path(scratch) / "unsigned.db",
            signed=False,
            vends=args.vends,
            concurrency=args.concurrency,
        )
        signed = await _measure(
            Path(scratch) / "signed.db", signed=True, vends=args.vends, concurrency=args.concurrency
        )
    return {
        "vends": args.vends,
        "concurrency": args.concurrency,
        "signed_vends_per_s": signed["vends_per_s"],
        "unsigned_vends_per_s": unsigned["vends_per_s"],
        "signed_over_unsigned": round(signed["vends_per_s"] / unsigned["vends_per_s"], 3),
        "signed_p50_ms": signed["p50_ms"],
        "signed_p99_ms": signed["p99_ms"],
        "unsigned_p50_ms": unsigned["p50_ms"],
        "unsigned_p99_ms": unsigned["p99_ms"],
    }


def parse(argv: list[str]) -> argparse.Namespace:
    """The bench's options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--vends", type=int, default=2000, help="vends per run")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent terminals")
    return parser.parse_args(argv)


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    figures = asyncio.run(main(parse(sys.argv[1:])))
    print(
        f"signed   {figures['signed_vends_per_s']:>8} vends/s"
        f"  p50 {figures['signed_p50_ms']} ms  p99 {figures['signed_p99_ms']} ms"
    )
    print(
        f"unsigned {figures['unsigned_vends_per_s']:>8} vends/s"
        f"  p50 {figures['unsigned_p50_ms']} ms  p99 {figures['unsigned_p99_ms']} ms"
    )
    print(f"signed / unsigned: {figures['signed_over_unsigned']}")
    print(json.dumps(figures, sort_keys=True))
