"""Operator commands over the ledger, with the semantics of XMLVend's advice messages.

```
gateway migrate                                   apply pending schema migrations
gateway purchases find [--id ID] [--phone P] [--meter M] [--state S] [--limit N]
gateway purchases timeline ID                     the purchase's events, oldest first
gateway purchases reprint ID                      queue the same token again (never a new one)
gateway report daily [--date YYYY-MM-DD] [--csv]  counts and sums by provider and state
```

Every command takes ``--config``, ``--data-dir`` and ``--database-url``; those that print data
take ``--json``. Exit status: 0 on success, 1 on failure (the reason on stderr), 2 for usage.
Tokens are printed masked except by ``reprint``, which prints nothing of the token at all.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, date, datetime
from typing import Any

import structlog

from gateway.commands._common import add_config_arguments, load_config
from gateway.errors import GatewayError
from gateway.ledger import (
    Event,
    Purchase,
    PurchaseState,
    ReportRow,
    Vend,
    open_ledger,
)
from gateway.logging import configure_logging
from gateway.money import Money
from gateway.vending import reprint_token


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``migrate``, ``purchases`` and ``report``."""
    migrate = subparsers.add_parser("migrate", help="apply pending ledger schema migrations")
    add_config_arguments(migrate)
    migrate.add_argument("--json", action="store_true", help="print one JSON object")
    migrate.set_defaults(handler=_migrate)

    purchases = subparsers.add_parser("purchases", help="look up purchases; timeline; reprint")
    commands = purchases.add_subparsers(dest="purchases_command", metavar="COMMAND", required=True)
    find = commands.add_parser("find", help="purchases by id, phone, meter or state")
    add_config_arguments(find)
    find.add_argument("--id", dest="purchase_id", help="one purchase id")
    find.add_argument("--phone", help="E.164 phone number (+2547…)")
    find.add_argument("--meter", help="meter number (DRN)")
    find.add_argument(
        "--state", action="append", choices=[s.value for s in PurchaseState], help="repeatable"
    )
    find.add_argument("--limit", type=int, default=20)
    find.add_argument("--json", action="store_true", help="one JSON object per line")
    find.set_defaults(handler=_find)

    timeline = commands.add_parser("timeline", help="a purchase's events, oldest first")
    add_config_arguments(timeline)
    timeline.add_argument("purchase_id")
    timeline.add_argument("--json", action="store_true", help="one JSON object per line")
    timeline.set_defaults(handler=_timeline)

    reprint = commands.add_parser("reprint", help="send the same token again by SMS")
    add_config_arguments(reprint)
    reprint.add_argument("purchase_id")
    reprint.add_argument("--actor", default="operator", help="who asked (kept in the timeline)")
    reprint.add_argument("--json", action="store_true", help="print one JSON object")
    reprint.set_defaults(handler=_reprint)

    report = subparsers.add_parser("report", help="reconciliation reports")
    reports = report.add_subparsers(dest="report_command", metavar="COMMAND", required=True)
    daily = reports.add_parser("daily", help="one day's purchases by provider and state")
    add_config_arguments(daily)
    daily.add_argument("--date", type=date.fromisoformat, default=None, help="UTC day (today)")
    output = daily.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="CSV with a header line")
    output.add_argument("--json", action="store_true", help="one JSON object per line")
    daily.set_defaults(handler=_daily)


# --------------------------------------------------------------------------------------- running


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """Warnings and errors only, on stderr: stdout carries the command's output."""
    saved = structlog.get_config()
    configure_logging(level="warning", stream=sys.stderr)
    try:
        yield
    finally:
        structlog.configure(**saved)


def _run(name: str, work: Coroutine[Any, Any, int]) -> int:
    """Run one command's coroutine; a ``GatewayError`` is one line on stderr and status 1."""
    with _quiet_logs():
        try:
            return asyncio.run(work)
        except GatewayError as exc:
            print(f"gateway {name}: {exc}", file=sys.stderr)
            return 1


def _url(args: argparse.Namespace) -> str:
    return load_config(args).effective_database_url


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# -------------------------------------------------------------------------------------- commands


def _migrate(args: argparse.Namespace) -> int:
    async def work() -> int:
        url = _url(args)
        async with open_ledger(url):
            pass
        if args.json:
            print(json.dumps({"database_url": url, "migrated": True}))
        else:
            print(f"ledger schema is up to date: {url}")
        return 0

    return _run("migrate", work())


def _purchase_json(purchase: Purchase, vend: Vend | None) -> dict[str, object]:
    return {
        "purchase_id": purchase.purchase_id,
        "state": purchase.state.value,
        "channel": purchase.channel,
        "phone": purchase.phone,
        "meter": purchase.meter,
        "amount_minor": purchase.amount.amount_minor,
        "currency": purchase.amount.currency,
        "units": purchase.units,
        "provider": purchase.provider,
        "provider_reference": purchase.provider_reference,
        "created_at": purchase.created_at.isoformat(),
        "updated_at": purchase.updated_at.isoformat(),
        "tid": vend.tid if vend else None,
        "token": vend.masked_token if vend else None,
        "receipt": vend.receipt if vend else None,
    }


def _find(args: argparse.Namespace) -> int:
    async def work() -> int:
        async with open_ledger(_url(args)) as ledger:
            if args.purchase_id:
                found = [await ledger.get_purchase(args.purchase_id)]
            else:
                if not (args.phone or args.meter or args.state):
                    print("gateway purchases find: give --id, --phone, --meter or --state",
                          file=sys.stderr)  # fmt: skip
                    return 2
                found = await ledger.find_purchases(
                    phone=args.phone,
                    meter=args.meter,
                    states=[PurchaseState(s) for s in args.state or []] or None,
                    limit=args.limit,
                )
            vends = [await ledger.get_vend(p.purchase_id) for p in found]
        for purchase, vend in zip(found, vends, strict=True):
            if args.json:
                print(json.dumps(_purchase_json(purchase, vend)))
            else:
                token = f"  token {vend.masked_token} tid {vend.tid}" if vend else ""
                print(
                    f"{purchase.purchase_id}  {_when(purchase.created_at)}  {purchase.state:<16}"
                    f" {purchase.amount}  meter {purchase.meter}  {purchase.phone or '-'}"
                    f"  {purchase.channel}/{purchase.provider}{token}"
                )
        if not found and not args.json:
            print("no purchases found", file=sys.stderr)
        return 0

    return _run("purchases find", work())


def _event_json(event: Event) -> dict[str, object]:
    return {
        "event_id": event.event_id,
        "at": event.at.isoformat(),
        "kind": event.kind,
        "actor": event.actor,
        "data": dict(event.data),
    }


def _timeline(args: argparse.Namespace) -> int:
    async def work() -> int:
        async with open_ledger(_url(args)) as ledger:
            purchase = await ledger.get_purchase(args.purchase_id)
            events = await ledger.timeline(purchase.purchase_id)
        for event in events:
            if args.json:
                print(json.dumps(_event_json(event), default=str))
            else:
                details = " ".join(f"{k}={v}" for k, v in sorted(event.data.items()))
                print(f"{_when(event.at)}  {event.kind:<24} by {event.actor:<20} {details}")
        return 0

    return _run("purchases timeline", work())


def _reprint(args: argparse.Namespace) -> int:
    async def work() -> int:
        async with open_ledger(_url(args)) as ledger:
            message = await reprint_token(ledger, args.purchase_id, actor=args.actor)
        if args.json:
            print(
                json.dumps(
                    {
                        "purchase_id": args.purchase_id,
                        "message_id": message.message_id,
                        "recipient": message.recipient,
                        "state": message.state.value,
                    }
                )
            )
        else:
            print(
                f"reprint queued for {message.recipient or 'no recipient (held)'}:"
                f" message {message.message_id}; the outbox worker sends it"
            )
        return 0

    return _run("purchases reprint", work())


def report_csv(rows: list[ReportRow]) -> str:
    """The daily report as CSV: day, provider, state, currency, count, amount in minor units."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["day", "provider", "state", "currency", "count", "amount_minor"])
    for row in rows:
        writer.writerow(
            [row.day.isoformat(), row.provider, row.state.value, row.currency, row.count,
             row.amount_minor]
        )  # fmt: skip
    return buffer.getvalue()


def _daily(args: argparse.Namespace) -> int:
    async def work() -> int:
        day = args.date or datetime.now(UTC).date()
        async with open_ledger(_url(args)) as ledger:
            rows = await ledger.daily_report(day)
        if args.csv:
            sys.stdout.write(report_csv(rows))
        elif args.json:
            for row in rows:
                print(json.dumps(asdict(row) | {"day": row.day.isoformat()}))
        else:
            print(f"purchases created on {day.isoformat()} (UTC)")
            for row in rows:
                print(
                    f"  {row.provider:<12} {row.state.value:<16} {row.count:>7}"
                    f"  {Money(row.amount_minor, row.currency)!s:>18}"
                )
            if not rows:
                print("  none")
        return 0

    return _run("report daily", work())
