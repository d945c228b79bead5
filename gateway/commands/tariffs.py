"""``gateway tariffs``: set and show the price of energy for a group of meters.

```
gateway tariffs set ID --name N --currency KES --price-per-kwh 25.00 [--vat-percent 16]
                      [--fixed-charge 0] --min 50 --max 35000 [--json]
gateway tariffs show ID [--json]
```

Amounts are given in major units (``25.00`` KES) and stored as integer minor units; a price with
more decimals than the currency has is refused, never rounded. VAT is given in percent with at
most two decimals and stored in basis points. Meters name their tariff (``gateway meters
import``); a changed tariff applies to the next quote, never to a purchase already opened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.commands._common import add_config_arguments, load_config
from gateway.errors import GatewayError
from gateway.ledger import NotFound, open_ledger
from gateway.money import Money
from gateway.tariff import Tariff


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gateway tariffs set|show``."""
    parser = subparsers.add_parser("tariffs", help="set and show tariffs (price per kWh, limits)")
    commands = parser.add_subparsers(dest="tariffs_command", metavar="COMMAND", required=True)
    put = commands.add_parser("set", help="create or replace a tariff")
    add_config_arguments(put)
    put.add_argument("tariff_id", metavar="ID")
    put.add_argument("--name", required=True)
    put.add_argument("--currency", required=True, help="ISO 4217 code, e.g. KES")
    put.add_argument("--price-per-kwh", required=True, help="before VAT, major units (25.00)")
    put.add_argument("--vat-percent", default="0", help="VAT included in the price paid (16)")
    put.add_argument("--fixed-charge", default="0", help="taken from every purchase (major units)")
    put.add_argument("--min", dest="minimum", required=True, help="smallest purchase")
    put.add_argument("--max", dest="maximum", required=True, help="largest purchase")
    put.add_argument("--json", action="store_true", help="print the tariff as JSON")
    put.set_defaults(handler=_set)
    show = commands.add_parser("show", help="one tariff")
    add_config_arguments(show)
    show.add_argument("tariff_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print the tariff as JSON")
    show.set_defaults(handler=_show)


def _basis_points(percent: str) -> int:
    try:
        value = Decimal(percent) * 100
    except InvalidOperation as exc:
        raise ValueError(f"--vat-percent: not a number: {percent!r}") from exc
    if value != value.to_integral_value() or value < 0:
        raise ValueError(f"--vat-percent: at most two decimals and not negative: {percent!r}")
    return int(value)


def tariff_from_args(args: argparse.Namespace) -> Tariff:
    """The tariff the flags describe. Raises ValueError naming the bad flag."""
    currency = str(args.currency).upper()

    def minor(flag: str, text: str) -> int:
        try:
            return Money.of(text, currency).amount_minor
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from exc

    return Tariff(
        tariff_id=args.tariff_id,
        name=args.name,
        currency=currency,
        price_per_kwh_minor=minor("--price-per-kwh", args.price_per_kwh),
        vat_basis_points=_basis_points(args.vat_percent),
        fixed_charge_minor=minor("--fixed-charge", args.fixed_charge),
        min_purchase_minor=minor("--min", args.minimum),
        max_purchase_minor=minor("--max", args.maximum),
    )


def _describe(tariff: Tariff) -> dict[str, Any]:
    def money(minor: int) -> str:
        return str(Money(minor, tariff.currency))

    return {
        "tariff_id": tariff.tariff_id,
        "name": tariff.name,
        "currency": tariff.currency,
        "price_per_kwh": money(tariff.price_per_kwh_minor),
        "vat_percent": str(Decimal(tariff.vat_basis_points) / 100),
        "fixed_charge": money(tariff.fixed_charge_minor),
        "min_purchase": money(tariff.min_purchase_minor),
        "max_purchase": money(tariff.max_purchase_minor),
    }


def _print(tariff: Tariff, *, as_json: bool) -> None:
    described = _describe(tariff)
    if as_json:
        print(json.dumps(described))
        return
    for key, value in described.items():
        print(f"{key:>14}: {value}")


def _set(args: argparse.Namespace) -> int:
    try:
        tariff = tariff_from_args(args)
    except ValueError as exc:
        print(f"gateway tariffs set: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        async with open_ledger(load_config(args).effective_database_url) as ledger:
            await ledger.put_tariff(tariff)

    try:
        asyncio.run(run())
    except GatewayError as exc:
        print(f"gateway tariffs set: {exc}", file=sys.stderr)
        return 1
    _print(tariff, as_json=args.json)
    return 0


def _show(args: argparse.Namespace) -> int:
    async def run() -> Tariff:
        async with open_ledger(load_config(args).effective_database_url) as ledger:
            return await ledger.get_tariff(args.tariff_id)

    try:
        tariff = asyncio.run(run())
    except NotFound:
        print(f"gateway tariffs show: no tariff {args.tariff_id!r}", file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"gateway tariffs show: {exc}", file=sys.stderr)
        return 1
    _print(tariff, as_json=args.json)
    return 0
