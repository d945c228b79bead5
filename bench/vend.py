"""Durable vends per second: paid confirmation → vend → outbox, with N concurrent callers.

Each measured call is ``Vending.confirm(purchase_id)`` for a purchase awaiting payment whose
provider (in memory, instant) answers "paid": the payment is proven, recorded PAID, the TID is
allocated on the meter row, the token made by the real ``LocalTokenEngine``, and the vend, the
token SMS in the outbox and the events are committed. A call returns only after its writes are
durable: SQLite in WAL mode with ``synchronous=FULL`` (every COMMIT fsyncs the WAL, so an
acknowledged vend survives a power cut, not only a crash).

Two ledgers are measured in the same run, on the same machine and disk:

* group commit: the ledger's single writer drains its queue and commits whatever queued up
  while the previous commit ran, in one transaction (one fsync), one SAVEPOINT per operation;
* naive: one commit per step, no group commit (``max_batch=1``): the proven payment is
  committed (``mark_paid``), then the vend with its TID, SMS and events (``vend``), each in its
  own transaction with its own fsync, as a straightforward implementation would do.

A third figure isolates the ledger: the same durable write (proven payment, TID
compare-and-set, vend, outbox message, events: one ``record_vend``) for tokens made beforehand,
one purchase per meter, so it shows what the single writer sustains when the saga's Python work
(token engine, reads) does not compete with it for the interpreter.

Prints the figures, the ratio, and as the last line a JSON object of them.

    python bench/vend.py [--purchases 20000] [--concurrency 64] [--meters 2000]
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
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from gateway.ledger import (
    ConfirmedPayment,
    MeterNumber,
    MeterRecord,
    VendDraft,
    open_sqlite_ledger,
)
from gateway.money import Money
from gateway.payments import (
    CallbackAck,
    CollectionRequest,
    CollectionStarted,
    PaymentNotice,
    PaymentState,
    PaymentStatus,
    ProviderReference,
)
from gateway.phone import Msisdn
from gateway.sts import LocalTokenEngine, VendingKey, next_tid
from gateway.sts.pan import luhn_check_digit
from gateway.tariff import Tariff
from gateway.vending import SagaPolicy, Vending, token_message

PHONE = Msisdn("+254712345678")
AMOUNT = Money(11600, "KES")
KEY = VendingKey(sgc="123457", krn=1, dkga=4, base_date=2014, key=bytes(range(20)))
TARIFF = Tariff(
    tariff_id="domestic",
    name="Domestic",
    currency="KES",
    price_per_kwh_minor=2500,
    vat_basis_points=1600,
    min_purchase_minor=1000,
    max_purchase_minor=3_500_000,
)


class InstantProvider:
    """Every collection is paid at once, for the amount requested (kept in memory)."""

    idempotent_requests = False  # the saga guards unknown outcomes (as for STK)

    name = "bench"

    def __init__(self) -> None:
        self.amounts: dict[str, Money] = {}

    async def request_collection(self, request: CollectionRequest) -> CollectionStarted:
        """Accept, remembering the amount."""
        reference = ProviderReference(f"B-{request.purchase_id}")
        self.amounts[reference] = request.amount
        return CollectionStarted(provider=self.name, reference=reference)

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> PaymentNotice:
        """Not used."""
        raise NotImplementedError

    async def query_status(self, reference: ProviderReference) -> PaymentStatus:
        """Paid, for the amount requested."""
        return PaymentStatus(
            provider=self.name,
            reference=reference,
            state=PaymentState.SUCCEEDED,
            amount=self.amounts[reference],
            payer=PHONE,
            receipt=reference[-10:],
        )

    def acknowledgement(self) -> CallbackAck:
        """An empty 200."""
        return CallbackAck()


@dataclass(frozen=True)
class Result:
    """One mode's figures."""

    mode: str
    vends: int
    seconds: float
    vends_per_s: float
    p50_ms: float
    p99_ms: float
    commits: int
    writes: int
    cpu_us_per_vend: float  # the whole process (event loop and writer thread), per vend
    loop_cpu_us_per_vend: float  # the event loop's thread alone, per vend


def drn(number: int) -> str:
    """A valid 11-digit DRN from a serial number."""
    body = f"{number:010d}"
    return body + luhn_check_digit(body)


async def measure(
    mode: str, directory: Path, *, purchases: int, concurrency: int, meters: int, max_batch: int
) -> Result:
    """Prepare ``purchases`` awaiting payment, then confirm them with ``concurrency`` callers."""
    path = directory / f"{mode}.db"
    async with open_sqlite_ledger(path, max_batch=max_batch) as ledger:
        await ledger.put_tariff(TARIFF)
        drns = [drn(i) for i in range(meters)]
        await asyncio.gather(
            *(
                ledger.put_meter(
                    MeterRecord(
                        drn=MeterNumber(d),
                        customer_name="Bench Customer",
                        sgc=KEY.sgc,
                        tariff_index="01",
                        krn=KEY.krn,
                        tariff_id=TARIFF.tariff_id,
                    )
                )
                for d in drns
            )
        )
        provider = InstantProvider()
        vending = Vending(
            ledger=ledger,
            engine=LocalTokenEngine([KEY]),
            providers={provider.name: provider},
            default_provider=provider.name,
            policy=SagaPolicy(),
        )

        async def prepare(index: int) -> str:
            purchase = await vending.start_purchase(
                channel="bench",
                phone=PHONE,
                meter=drns[index % meters],
                amount=AMOUNT,
                idempotency_key=f"{mode}-{index}",
            )
            await vending.request_payment(purchase.purchase_id)
            return purchase.purchase_id

        ids: list[str] = []
        for start in range(0, purchases, 500):
            ids += await asyncio.gather(
                *(prepare(i) for i in range(start, min(purchases, start + 500)))
            )

        queue: asyncio.Queue[str] = asyncio.Queue()
        for purchase_id in ids:
            queue.put_nowait(purchase_id)
        latencies: list[float] = []

        async def step_by_step(purchase_id: str) -> None:
            purchase = await ledger.get_purchase(purchase_id)
            status = await provider.query_status(ProviderReference(f"B-{purchase_id}"))
            await ledger.mark_paid(
                purchase_id,
                ConfirmedPayment(
                    provider=status.provider,
                    reference=status.reference,
                    amount=purchase.amount,
                    payer=status.payer,
                    receipt=status.receipt,
                ),
                actor="bench",
            )
            await vending.vend(purchase_id)

        confirm = vending.confirm if max_batch > 1 else step_by_step

        async def caller() -> None:
            while not queue.empty():
                purchase_id = queue.get_nowait()
                began = time.perf_counter()
                await confirm(purchase_id)
                latencies.append(time.perf_counter() - began)

        batches_before, writes_before = ledger.write_stats
        cpu_began, loop_cpu_began = time.process_time(), time.thread_time()
        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        seconds = time.perf_counter() - began
        cpu = time.process_time() - cpu_began
        loop_cpu = time.thread_time() - loop_cpu_began
        batches_after, writes_after = ledger.write_stats
    latencies.sort()
    return Result(
        mode=mode,
        vends=purchases,
        seconds=round(seconds, 3),
        vends_per_s=round(purchases / seconds, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 2),
        p99_ms=round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        commits=batches_after - batches_before,
        writes=writes_after - writes_before,
        cpu_us_per_vend=round(cpu / purchases * 1e6, 1),
        loop_cpu_us_per_vend=round(loop_cpu / purchases * 1e6, 1),
    )


async def measure_ledger_only(directory: Path, *, purchases: int, concurrency: int) -> Result:
    """The durable vend write alone, for tokens made beforehand (one purchase per meter)."""
    async with open_sqlite_ledger(directory / "ledger_only.db") as ledger:
        await ledger.put_tariff(TARIFF)
        drns = [drn(i) for i in range(purchases)]
        await asyncio.gather(
            *(
                ledger.put_meter(
                    MeterRecord(
                        drn=MeterNumber(d),
                        customer_name="Bench Customer",
                        sgc=KEY.sgc,
                        tariff_index="01",
                        krn=KEY.krn,
                        tariff_id=TARIFF.tariff_id,
                    )
                )
                for d in drns
            )
        )
        provider = InstantProvider()
        vending = Vending(
            ledger=ledger,
            engine=LocalTokenEngine([KEY]),
            providers={provider.name: provider},
            default_provider=provider.name,
        )
        engine = LocalTokenEngine([KEY])
        now = datetime.now(UTC)
        work: list[tuple[VendDraft, ConfirmedPayment]] = []
        for start in range(0, purchases, 500):
            started = await asyncio.gather(
                *(
                    vending.start_purchase(
                        channel="bench",
                        phone=PHONE,
                        meter=drns[i],
                        amount=AMOUNT,
                        idempotency_key=f"ledger-{i}",
                    )
                    for i in range(start, min(purchases, start + 500))
                )
            )
            for purchase in started:
                context = await ledger.vend_context(purchase.purchase_id)
                tid = next_tid(now, 2014, None)
                token = engine.credit_token_sync(vending._profile(context.meter), 40, tid)  # noqa: SLF001
                work.append(
                    (
                        VendDraft(
                            purchase_id=purchase.purchase_id,
                            meter=purchase.meter,
                            tid=tid,
                            expected_last_tid=None,
                            token=token.digits,
                            units=purchase.units,
                            receipt="BENCH",
                            recipient=PHONE,
                            message=token_message(
                                token=token.digits,
                                units=purchase.units,
                                amount=AMOUNT,
                                meter=purchase.meter,
                                receipt="BENCH",
                            ),
                        ),
                        ConfirmedPayment(
                            provider=provider.name,
                            reference=f"L-{purchase.purchase_id}",
                            amount=AMOUNT,
                            payer=PHONE,
                            receipt="BENCH",
                        ),
                    )
                )
        queue: asyncio.Queue[tuple[VendDraft, ConfirmedPayment]] = asyncio.Queue()
        for item in work:
            queue.put_nowait(item)
        latencies: list[float] = []

        async def caller() -> None:
            while not queue.empty():
                draft, payment = queue.get_nowait()
                began = time.perf_counter()
                await ledger.record_vend(draft, actor="bench", payment=payment)
                latencies.append(time.perf_counter() - began)

        batches_before, writes_before = ledger.write_stats
        cpu_began, loop_cpu_began = time.process_time(), time.thread_time()
        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        seconds = time.perf_counter() - began
        cpu = time.process_time() - cpu_began
        loop_cpu = time.thread_time() - loop_cpu_began
        batches_after, writes_after = ledger.write_stats
    latencies.sort()
    return Result(
        mode="ledger_only",
        vends=purchases,
        seconds=round(seconds, 3),
        vends_per_s=round(purchases / seconds, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 2),
        p99_ms=round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        commits=batches_after - batches_before,
        writes=writes_after - writes_before,
        cpu_us_per_vend=round(cpu / purchases * 1e6, 1),
        loop_cpu_us_per_vend=round(loop_cpu / purchases * 1e6, 1),
    )


def count_vends(path: Path) -> int:
    """Vends in a database file (the bench checks nothing was lost)."""
    import sqlite3  # noqa: PLC0415 - only the verification needs it

    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM vends").fetchone()[0])


async def main(args: argparse.Namespace) -> dict[str, object]:
    """Both modes, in one run; returns the figures."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        grouped = await measure(
            "group_commit",
            directory,
            purchases=args.purchases,
            concurrency=args.concurrency,
            meters=args.meters,
            max_batch=512,
        )
        naive = await measure(
            "naive",
            directory,
            purchases=args.naive_purchases,
            concurrency=args.concurrency,
            meters=args.meters,
            max_batch=1,
        )
        ledger_only = await measure_ledger_only(
            directory, purchases=args.ledger_purchases, concurrency=args.concurrency
        )
        grouped_vends = count_vends(directory / "group_commit.db")
        naive_vends = count_vends(directory / "naive.db")
        ledger_vends = count_vends(directory / "ledger_only.db")
    expected = (args.purchases, args.naive_purchases, args.ledger_purchases)
    if (grouped_vends, naive_vends, ledger_vends) != expected:
        raise SystemExit(f"vends lost: {grouped_vends}, {naive_vends}, {ledger_vends}")
    for result in (grouped, naive, ledger_only):
        print(
            f"{result.mode:>13}: {result.vends_per_s:>9,.1f} vends/s"
            f"  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
            f"  ({result.vends} vends, {result.commits} commits for {result.writes} writes;"
            f" CPU {result.cpu_us_per_vend:.0f} µs/vend,"
            f" event loop {result.loop_cpu_us_per_vend:.0f})"
        )
    ratio = round(grouped.vends_per_s / naive.vends_per_s, 2)
    print(f"group commit / naive: {ratio}x  (synchronous=FULL, WAL, {os.cpu_count()} CPUs)")
    return {
        "bench": "vend",
        "synchronous": "FULL",
        "journal_mode": "WAL",
        "concurrency": args.concurrency,
        "meters": args.meters,
        "cpus": os.cpu_count(),
        "group_commit": asdict(grouped) | {"vends": grouped_vends},
        "naive": asdict(naive) | {"vends": naive_vends},
        "ledger_only": asdict(ledger_only) | {"vends": ledger_vends},
        "ratio": ratio,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--purchases", type=int, default=20_000)
    parser.add_argument("--naive-purchases", type=int, default=2_000)
    parser.add_argument("--ledger-purchases", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--meters", type=int, default=2_000)
    parser.add_argument("--dir", default=None, help="where the database files go (a real disk)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    figures = asyncio.run(main(parse(sys.argv[1:])))
    print(json.dumps(figures, sort_keys=True))
