"""``gateway vendors``: banks, agents and sales points selling from a prepaid float.

```
gateway vendors add VENDOR --name NAME [--currency KES] [--credit-limit 0] [--commission-percent 2]
                    [--terminal T]... [--allow-ip CIDR]... [--rate-per-minute 600] [--json]
gateway vendors list [--json]                     every vendor, its float and status
gateway vendors suspend VENDOR [--resume] [--json]  stop (or resume) its sales
gateway vendors top-up VENDOR AMOUNT --reference REF [--json]  add to its float, once per REF
gateway vendors statement VENDOR [--day YYYY-MM-DD] [--format text|csv|jsonl]  a day's float
gateway vendors key VENDOR [--scope S]... [--terminal T] [--revoke KEY_ID] [--json]
gateway vendors keys VENDOR [--json]              its keys: id, scopes, fingerprint, status
gateway vendors rotate-key KEY_ID [--overlap-hours 24] [--json]  a new key; the old one ends
gateway vendors add-terminal VENDOR TERMINAL [--label L] [--rate-per-minute 60] [--json]
```

``add``, ``key`` and ``rotate-key`` print the new key's secret once: it is never stored (the
ledger keeps the signing key derived from it sealed under the master key, ``GATEWAY_MASTER_KEY``,
or in demo mode the data directory's ``master.key``) and cannot be shown again. ``rotate-key``
gives the new key the old one's scopes and terminal; the old one keeps working for the overlap
(0: it stops now), so the vendor can move its clients. Scopes: ``meters`` (meter confirm),
``vend`` (quote, vend, reversal, and reading its vends back), ``read`` (last response and
reprint only), ``statement``. Amounts are in major units of the
vendor's currency, stored as integer minor units (more decimals than the currency has are
refused). Every change is an event with the actor ``operator:cli``. Exit status: 0 done,
1 refused (no such vendor, a duplicate), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.commands._common import add_config_arguments, load_config, minor_units
from gateway.config import Config, Mode
from gateway.demo_data import demo_master_key
from gateway.errors import ConfigError, GatewayError
from gateway.ledger import Ledger, NotFound, open_ledger
from gateway.ledger.vendor import Vendor, VendorKey, VendorLedger, VendorStatus, VendorSteps
from gateway.money import Money
from gateway.vendor import signing
from gateway.vendor.service import (
    add_terminal,
    add_vendor_key,
    register_vendor,
    rotate_vendor_key,
    vendor_statement,
)
from gateway.vendor.statement import render_statement, statement_records

_ACTOR = "operator:cli"
_SEALS = frozenset({"add", "key", "rotate-key"})  # the commands that seal a new key


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gateway vendors`` and its commands (the module doc)."""
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
    key.add_argument("--scope", action="append", default=[], help="meters, vend, read, statement")
    key.add_argument("--terminal", default=None, help="bind the key to one terminal")
    key.add_argument("--revoke", default=None, metavar="KEY_ID", help="revoke this key instead")
    key.add_argument("--json", action="store_true", help="print as JSON")
    key.set_defaults(handler=_key)
    _register_more(commands)


def _register_more(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys``, ``rotate-key`` and ``add-terminal``."""
    keys = commands.add_parser("keys", help="a vendor's keys (never their secrets)")
    add_config_arguments(keys)
    keys.add_argument("vendor", metavar="VENDOR")
    keys.add_argument("--json", action="store_true", help="print as JSON")
    keys.set_defaults(handler=_keys)
    rotate = commands.add_parser("rotate-key", help="replace a key (prints the new secret once)")
    add_config_arguments(rotate)
    rotate.add_argument("key_id", metavar="KEY_ID")
    rotate.add_argument(
        "--overlap-hours", default="24", help="how long the old key keeps working (0: not at all)"
    )
    rotate.add_argument("--json", action="store_true", help="print as JSON")
    rotate.set_defaults(handler=_rotate)
    terminal = commands.add_parser("add-terminal", help="register a vendor's terminal")
    add_config_arguments(terminal)
    terminal.add_argument("vendor", metavar="VENDOR")
    terminal.add_argument("terminal", metavar="TERMINAL")
    terminal.add_argument("--label", default="", help="what the operator calls it")
    terminal.add_argument("--rate-per-minute", type=int, default=60, help="requests a minute")
    terminal.add_argument("--json", action="store_true", help="print as JSON")
    terminal.set_defaults(handler=_add_terminal)


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


def _master_key(config: Config) -> bytes:
    """The master key the keys are sealed under (as ``gateway serve`` finds it)."""
    master = config.master_key_bytes()
    if master is not None:
        return master
    if config.mode is Mode.DEMO:
        return demo_master_key(config.data_dir)
    raise ConfigError("GATEWAY_MASTER_KEY", "is not set: it seals the vendor keys")


def _run(command: str, work: Any, args: argparse.Namespace) -> tuple[int, Any]:  # noqa: ANN401 - each command's result
    async def run() -> object:
        config = load_config(args)
        async with open_ledger(config.effective_database_url) as ledger:
            args.master_key = _master_key(config) if args.vendors_command in _SEALS else None
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
            master_key=args.master_key,
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
            master_key=args.master_key,
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


def _describe_key(key: VendorKey) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "scopes": sorted(key.scopes),
        "terminal": key.terminal_id,
        "fingerprint": key.key_hash[:16] if key.key_hash else None,
        "status": "active" if key.active else "revoked",
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "replaced_by": key.replaced_by,
        "sealed": key.sealed_key is not None,
    }


def _keys(args: argparse.Namespace) -> int:
    async def work(vendors: VendorLedger) -> list[VendorKey]:
        await vendors.get_vendor(args.vendor)
        return await vendors.vendor_keys(args.vendor)

    status, found = _run("keys", work, args)
    if status:
        return status
    if args.json:
        print(json.dumps([_describe_key(k) for k in found]))
        return 0
    for key in found:
        d = _describe_key(key)
        ends = f" until {d['expires_at']}" if d["expires_at"] else ""
        print(
            f"{d['key_id']:<22} {d['status']:<8} fp={d['fingerprint']} "
            f"scopes={','.join(d['scopes'])} terminal={d['terminal'] or '-'}{ends}"
        )
    return 0


def _overlap(text: str) -> timedelta:
    try:
        hours = Decimal(text)
    except InvalidOperation as exc:
        raise ValueError(f"--overlap-hours: not a number: {text!r}") from exc
    if not hours.is_finite() or not 0 <= hours <= 24 * 90:
        raise ValueError(f"--overlap-hours: 0 to 2160 (90 days): {text!r}")
    return timedelta(hours=float(hours))


def _rotate(args: argparse.Namespace) -> int:
    async def work(vendors: VendorLedger) -> dict[str, Any]:
        old, made = await rotate_vendor_key(
            vendors,
            args.key_id,
            overlap=_overlap(args.overlap_hours),
            master_key=args.master_key,
            now=datetime.now(UTC),
            actor=_ACTOR,
        )
        ended = await vendors.get_vendor_key(old.key_id)
        return {
            "vendor_id": old.vendor_id,
            "key_id": made.key_id,
            "secret": made.secret,
            "scopes": sorted(old.scopes),
            "terminal": old.terminal_id,
            "old_key_id": old.key_id,
            "old_key_expires_at": ended.expires_at.isoformat()
            if ended and ended.expires_at
            else None,
            "note": "the secret is shown once: give it to the vendor now",
        }

    status, described = _run("rotate-key", work, args)
    if status == 0:
        _print(described, as_json=args.json)
    return status


def _add_terminal(args: argparse.Namespace) -> int:
    async def work(vendors: VendorLedger) -> dict[str, Any]:
        made = await add_terminal(
            vendors,
            args.vendor,
            args.terminal,
            label=args.label,
            rate_per_minute=args.rate_per_minute,
        )
        return {
            "vendor_id": made.vendor_id,
            "terminal": made.terminal_id,
            "label": made.label,
            "rate_per_minute": made.rate_per_minute,
            "status": made.status.value,
        }

    status, described = _run("add-terminal", work, args)
    if status == 0:
        _print(described, as_json=args.json)
    return status
