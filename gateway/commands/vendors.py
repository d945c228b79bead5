"""``gateway vendors``: banks, agents and sales points selling from a prepaid float.

```
gateway vendors add VENDOR --name NAME [--currency KES] [--credit-limit 0] [--commission-percent 2]
                    [--terminal T]... [--allow-ip CIDR]... [--rate-per-minute 600] [--json]
gateway vendors list [--json]                     every vendor, its float and status
gateway vendors suspend VENDOR [--resume] [--json]  stop (or resume) its sales
gateway vendors top-up VENDOR AMOUNT --reference REF [--json]  add to its float, once per REF
gateway vendors statement VENDOR [--day YYYY-MM-DD] [--format text|csv|jsonl]  a day's float
gateway vendors key VENDOR [--scope S]... [--terminal T] [--revoke KEY_ID] [--json]
```

``add`` and ``key`` print the new key's secret once: it is never stored (the ledger keeps only
the signing key derived from it) and cannot be shown again. Amounts are in major units of the
vendor's currency, stored as integer minor units (more decimals than the currency has are
refused). Every change is an event with the actor ``operator:cli``. Exit status: 0 done,
1 refused (no such vendor, a duplicate), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.commands._common import add_config_arguments, load_config, minor_units
from gateway.errors import GatewayError
from gateway.ledger import Ledger, NotFound, open_ledger
from gateway.ledger.vendor import Vendor, VendorLedger, VendorStatus, VendorSteps
from gateway.money import Money
from gateway.vendor import signing
from gateway.vendor.service import add_vendor_key, register_vendor, vendor_statement
from gateway.vendor.statement import render_statement, statement_records

_ACTOR = "operator:cli"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gateway vendors add|list|suspend|top-up|statement|key``."""
    parser = subparsers.add_parser("vendors", help="vendors selling from a prepaid float")
    commands = parser.add_subparsers(dest="vendors_command", metavar="COMMAND", required=True)
    add = commands.add_parser("add", help="register a vendor (prints its first key once)")
    add_config_arguments(add)
    add.add_argument("vendor", metavar="VENDOR")
    add.add_argument("--name", required=True, help="the vendor's name")
    add.add_argument("--currency", default="KES", help="the float's currency (ISO 4217)")
    add.add_argument("--credit-limit", default="0", help="how far below zero the float may go")
    add.add_argument("--commission-percent", default="0", help="the vendor's share of each sale")
    add.add_argument("--terminal", action="append", default=[], help="a terminal id (repeat)")
    add.add_argument("--allow-ip", action="append", default=[], help="an address or CIDR")
    add.add_argument("--rate-per-minute", type=int, default=600, help="requests a minute")
    add.add_argument("--json", action="store_true", help="print as JSON")
    add.set_defaults(handler=_add)
    listing = commands.add_parser("list", help="every vendor, its float and status")
    add_config_arguments(listing)
    listing.add_argument("--json", action="store_true", help="print as JSON")
    listing.set_defaults(handler=_list)
    suspend = commands.add_parser("suspend", help="stop a vendor's sales (--resume: restart)")
    add_config_arguments(suspend)
    suspend.add_argument("vendor", metavar="VENDOR")
    suspend.add_argument("--resume", action="store_true", help="reactivate instead")
    suspend.add_argument("--json", action="store_true", help="print as JSON")
    suspend.set_defaults(handler=_suspend)
    top_up = commands.add_parser("top-up", help="add to a vendor's float (once per reference)")
    add_config_arguments(top_up)
    top_up.add_argument("vendor", metavar="VENDOR")
    top_up.add_argument("amount", metavar="AMOUNT", help="major units, e.g. 5000.00")
    top_up.add_argument("--reference", required=True, help="the bank transfer's reference")
    top_up.add_argument("--json", action="store_true", help="print as JSON")
    top_up.set_defaults(handler=_top_up)
    statement = commands.add_parser("statement", help="a vendor's float over one UTC day")
    add_config_arguments(statement)
    statement.add_argument("vendor", metavar="VENDOR")
    statement.add_argument("--day", default=None, help="YYYY-MM-DD (default: today, UTC)")
    statement.add_argument("--format", choices=("text", "csv", "jsonl"), default="text")
    statement.add_argument("--json", action="store_true", help="the same as --format jsonl")
    statement.set_defaults(handler=_statement)
    key = commands.add_parser("key", help="add a key (prints its secret once) or revoke one")
    add_config_arguments(key)
    key.add_argument("vendor", metavar="VENDOR")
    key.add_argument("--scope", action="append", default=[], help="meters, vend, statement")
    key.add_argument("--terminal", default=None, help="bind the key to one terminal")
    key.add_argument("--revoke", default=None, metavar="KEY_ID", help="revoke this key instead")
    key.add_argument("--json", action="store_true", help="print as JSON")
    key.set_defaults(handler=_key)


def _port(ledger: Ledger) -> VendorLedger:
    if not isinstance(ledger, VendorSteps):
        raise GatewayError(f"{type(ledger).__name__} has no vendor port")
    return ledger


def _basis_points(percent: str) -> int:
    try:
        value = Decimal(percent) * 100
    except InvalidOperation as exc:
        raise ValueError(f"--commission-percent: not a number: {percent!r}") from exc
    if not value.is_finite() or value != value.to_integral_value() or not 0 <= value <= 10_000:
        raise ValueError(f"--commission-percent: 0 to 100, two decimals at most: {percent!r}")
    return int(value)


def _describe(vendor: Vendor) -> dict[str, Any]:
    currency = vendor.currency
    return {
        "vendor_id": vendor.vendor_id,
        "name": vendor.name,
        "status": vendor.status.value,
        "currency": currency,
        "balance": str(Money(vendor.balance_minor, currency)),
        "balance_minor": vendor.balance_minor,
        "credit_limit_minor": vendor.credit_limit_minor,
        "commission_percent": str(Decimal(vendor.commission_bp) / 100),
        "ip_allowlist": list(vendor.ip_allowlist),
        "rate_per_minute": vendor.rate_per_minute,
    }


def _print(described: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(described))
        return
    for key, value in described.items():
        print(f"{key:>20}: {value}")


def _fail(command: str, exc: Exception, status: int = 1) -> int:
    message = f"no {exc.what} {exc.key!r}" if isinstance(exc, NotFound) else str(exc)
    print(f"gateway vendors {command}: {message}", file=sys.stderr)
    return status


def _run(command: str, work: Any, args: argparse.Namespace) -> tuple[int, Any]:  # noqa: ANN401 - each command's result
    async def run() -> object:
        async with open_ledger(load_config(args).effective_database_url) as ledger:
            return await work(_port(ledger))

    try:
        return 0, asyncio.run(run())
    except ValueError as exc:
        return _fail(command, exc, 2), None
    except GatewayError as exc:
        return _fail(command, exc), None


def _add(args: argparse.Namespace) -> int:
    async def work(vendors: VendorLedger) -> dict[str, Any]:
        registered = await register_vendor(
            vendors,
            args.vendor,
            name=args.name,
            currency=args.currency,
            credit_limit_minor=minor_units("--credit-limit", args.credit_limit, args.currency),
            commission_bp=_basis_points(args.commission_percent),
            ip_allowlist=tuple(args.allow_ip),
            terminals=tuple(args.terminal),
            rate_per_minute=args.rate_per_minute,
            actor=_ACTOR,
        )
        return {
            **_describe(registered.vendor),
            "terminals": list(args.terminal),
            "key_id": registered.key.key_id,
            "secret": registered.key.secret,
            "note": "the secret is shown once: give it to the vendor now",
        }

    status, described = _run("add", work, args)
    if status == 0:
        _print(described, as_json=args.json)
    return status


def _list(args: argparse.Namespace) -> int:
    async def work(vendors: VendorLedger) -> list[Vendor]:
        return await vendors.list_vendors()

    status, found = _run("list", work, args)
    if status:
        return status
    if args.json:
        print(json.dumps([_describe(v) for v in found]))
        return 0
    for vendor in found:
        print(
            f"{vendor.vendor_id:<16} {vendor.status.value:<9} "
            f"{Money(vendor.balance_minor, vendor.currency)!s:>16}  {vendor.name}"
        )
    return 0


def _suspend(args: argparse.Namespace) -> int:
    target = VendorStatus.ACTIVE if args.resume else VendorStatus.SUSPENDED

    async def work(vendors: VendorLedger) -> Vendor:
        return await vendors.set_vendor_status(args.vendor, target, actor=_ACTOR)

    status, vendor = _run("suspend", work, args)
    if status == 0:
        _print(_describe(vendor), as_json=args.json)
    return status


def _top_up(args: argparse.Namespace) -> int:
    async def work(vendors: VendorLedger) -> dict[str, Any]:
        vendor = await vendors.get_vendor(args.vendor)
        amount = minor_units("AMOUNT", args.amount, vendor.currency)
        if amount == 0:
            raise ValueError("AMOUNT: a top-up is more than zero")
        moved = await vendors.top_up_float(
            args.vendor, amount, reference=args.reference, actor=_ACTOR
        )
        return {
            "vendor_id": args.vendor,
            "amount_minor": moved.amount_minor,
            "reference": moved.reference,
            "balance_after_minor": moved.balance_after_minor,
            "balance_after": str(Money(moved.balance_after_minor, vendor.currency)),
            "at": moved.created_at.isoformat(),
        }

    status, described = _run("top-up", work, args)
    if status == 0:
        _print(described, as_json=args.json)
    return status


def _statement(args: argparse.Namespace) -> int:
    try:
        day = date.fromisoformat(args.day) if args.day else datetime.now(UTC).date()
    except ValueError:
        print(f"gateway vendors statement: --day is YYYY-MM-DD: {args.day!r}", file=sys.stderr)
        return 2

    async def work(vendors: VendorLedger) -> object:
        return await vendor_statement(vendors, args.vendor, day)

    status, found = _run("statement", work, args)
    if status:
        return status
    form = "jsonl" if args.json else args.format
    if form != "text":
        sys.stdout.write(render_statement(found, form).decode())
        return 0
    for record in statement_records(found):
        kind = record.pop("record")
        print(f"{kind:<9} " + "  ".join(f"{k}={v}" for k, v in record.items() if v is not None))
    return 0


def _key(args: argparse.Namespace) -> int:
    async def work(vendors: VendorLedger) -> dict[str, Any]:
        await vendors.get_vendor(args.vendor)
        if args.revoke:
            found = await vendors.get_vendor_key(args.revoke)
            if found is None or found.vendor_id != args.vendor:
                raise NotFound("vendor key", args.revoke)
            await vendors.revoke_vendor_key(args.revoke, actor=_ACTOR)
            return {"vendor_id": args.vendor, "key_id": args.revoke, "status": "revoked"}
        made = await add_vendor_key(
            vendors,
            args.vendor,
            scopes=frozenset(args.scope) or signing.SCOPES,
            terminal=args.terminal,
            actor=_ACTOR,
        )
        return {
            "vendor_id": args.vendor,
            "key_id": made.key_id,
            "secret": made.secret,
            "scopes": sorted(args.scope or signing.SCOPES),
            "terminal": args.terminal,
            "note": "the secret is shown once: give it to the vendor now",
        }

    status, described = _run("key", work, args)
    if status == 0:
        _print(described, as_json=args.json)
    return status
