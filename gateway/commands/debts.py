"""``gateway debts`` and ``gateway fbe``: a meter's debt to the utility, and free basic electricity.

```
gateway debts set DRN --balance 500.00 --rate-percent 20 [--min-per-purchase 5.00]
                      [--cap-per-purchase 100.00] [--reason TEXT] [--json]
gateway debts show DRN [--limit N] [--json]     the debt and what recent purchases recovered
gateway debts clear DRN [--reason TEXT] [--json]  write the debt off (balance 0, terms kept)
gateway fbe set TARIFF --kwh 50 [--json]        monthly free basic electricity (0 stops it)
gateway fbe show TARIFF [--meter DRN] [--json]  the allowance (and a meter's FBE tokens)
```

Amounts are in major units of the meter's tariff currency and stored as integer minor units
(more decimals than the currency has are refused, never rounded); the recovery rate is a percent
with at most two decimals, stored in basis points. Each purchase gives ``rate`` of its amount to
the debt (at least the minimum, at most the cap, never more than is owed) before energy is
priced. Every change is an event (``debt_set``, ``debt_cleared``, ``fbe_allowance_set``) with
the actor ``operator:cli``. Exit status: 0 done, 1 refused (no such meter, tariff or debt), 2 bad
arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.commands._common import add_config_arguments, load_config, minor_units
from gateway.errors import GatewayError
from gateway.ledger import DebtRecovery, FbeIssue, Ledger, MeterDebt, NotFound, open_ledger
from gateway.money import Money
from gateway.sts import StsError
from gateway.sts.amount import round_units_down
from gateway.tariff import UNITS_PER_KWH

_ACTOR = "operator:cli"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gateway debts set|show|clear`` and ``gateway fbe set|show``."""
    parser = subparsers.add_parser("debts", help="a meter's debt and how purchases recover it")
    commands = parser.add_subparsers(dest="debts_command", metavar="COMMAND", required=True)
    put = commands.add_parser("set", help="set a meter's debt balance and recovery terms")
    add_config_arguments(put)
    put.add_argument("meter", metavar="DRN")
    put.add_argument("--balance", required=True, help="what the meter owes (major units)")
    put.add_argument("--rate-percent", required=True, help="share of each purchase recovered (20)")
    put.add_argument("--min-per-purchase", default="0", help="recover at least this per purchase")
    put.add_argument("--cap-per-purchase", default=None, help="recover at most this per purchase")
    put.add_argument("--reason", default="", help="why (kept in the event)")
    put.add_argument("--json", action="store_true", help="print the debt as JSON")
    put.set_defaults(handler=_set)
    show = commands.add_parser("show", help="a meter's debt and its recent recoveries")
    add_config_arguments(show)
    show.add_argument("meter", metavar="DRN")
    show.add_argument("--limit", type=int, default=10, help="recoveries listed (newest first)")
    show.add_argument("--json", action="store_true", help="print as JSON")
    show.set_defaults(handler=_show)
    clear = commands.add_parser("clear", help="write a meter's debt off (balance 0)")
    add_config_arguments(clear)
    clear.add_argument("meter", metavar="DRN")
    clear.add_argument("--reason", default="", help="why (kept in the event)")
    clear.add_argument("--json", action="store_true", help="print the debt as JSON")
    clear.set_defaults(handler=_clear)

    fbe = subparsers.add_parser("fbe", help="free basic electricity: a tariff's monthly allowance")
    fbe_commands = fbe.add_subparsers(dest="fbe_command", metavar="COMMAND", required=True)
    fbe_set = fbe_commands.add_parser("set", help="a tariff's monthly allowance in kWh (0 stops)")
    add_config_arguments(fbe_set)
    fbe_set.add_argument("tariff_id", metavar="TARIFF")
    fbe_set.add_argument("--kwh", required=True, help="kWh per meter and month, one decimal")
    fbe_set.add_argument("--json", action="store_true", help="print as JSON")
    fbe_set.set_defaults(handler=_fbe_set)
    fbe_show = fbe_commands.add_parser("show", help="a tariff's allowance, a meter's FBE tokens")
    add_config_arguments(fbe_show)
    fbe_show.add_argument("tariff_id", metavar="TARIFF")
    fbe_show.add_argument("--meter", default=None, metavar="DRN", help="list its FBE tokens")
    fbe_show.add_argument("--json", action="store_true", help="print as JSON")
    fbe_show.set_defaults(handler=_fbe_show)


def _basis_points(flag: str, percent: str) -> int:
    try:
        value = Decimal(percent) * 100
    except InvalidOperation as exc:
        raise ValueError(f"{flag}: not a number: {percent!r}") from exc
    if not value.is_finite() or value != value.to_integral_value() or not 0 <= value <= 10_000:
        raise ValueError(f"{flag}: 0 to 100 with at most two decimals: {percent!r}")
    return int(value)


def _units(text: str) -> int:
    try:
        value = Decimal(text) * UNITS_PER_KWH
    except InvalidOperation as exc:
        raise ValueError(f"--kwh: not a number: {text!r}") from exc
    if not value.is_finite() or value != value.to_integral_value() or value < 0:
        raise ValueError(f"--kwh: not negative, at most one decimal (0.1 kWh): {text!r}")
    units = int(value)
    try:
        carried = round_units_down(units)
    except StsError as exc:
        raise ValueError(f"--kwh: {exc}") from exc
    if carried != units:  # above 1,638.3 kWh a token carries only every 10th, 100th… unit
        raise ValueError(
            f"--kwh: a token carries {_kwh(carried)} kWh, not {text}"
            " (docs/architecture.md, invariant 8)"
        )
    return units


def _kwh(units: int) -> str:
    return f"{units // UNITS_PER_KWH}.{units % UNITS_PER_KWH}"


def _describe_debt(debt: MeterDebt, recoveries: list[DebtRecovery] | None = None) -> dict[str, Any]:
    currency = debt.balance.currency
    cap = debt.cap_per_purchase_minor
    described: dict[str, Any] = {
        "meter": debt.meter,
        "balance": str(debt.balance),
        "balance_minor": debt.balance.amount_minor,
        "currency": currency,
        "rate_percent": str(Decimal(debt.rate_basis_points) / 100),
        "min_per_purchase": str(Money(debt.min_per_purchase_minor, currency)),
        "cap_per_purchase": str(Money(cap, currency)) if cap is not None else None,
        "recovered_total": str(Money(debt.recovered_total_minor, currency)),
        "updated_at": debt.updated_at.isoformat(),
    }
    if recoveries is not None:
        described["recoveries"] = [
            {
                "purchase_id": r.purchase_id,
                "recovered": str(r.amount),
                "recovered_minor": r.amount.amount_minor,
                "balance_after": str(r.balance_after),
                "at": r.created_at.isoformat(),
            }
            for r in recoveries
        ]
    return described


def _print(described: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(described))
        return
    for key, value in described.items():
        if isinstance(value, list):
            print(f"{key:>16}: {len(value)}")
            for row in value:
                print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
        else:
            print(f"{key:>16}: {value}")


def _fail(command: str, exc: Exception) -> int:
    message = f"no {exc.what} {exc.key!r}" if isinstance(exc, NotFound) else str(exc)
    print(f"gateway {command}: {message}", file=sys.stderr)
    return 1


def _set(args: argparse.Namespace) -> int:
    try:
        rate = _basis_points("--rate-percent", args.rate_percent)
    except ValueError as exc:
        print(f"gateway debts set: {exc}", file=sys.stderr)
        return 2

    async def run() -> MeterDebt:
        async with open_ledger(load_config(args).effective_database_url) as ledger:
            meter = await ledger.get_meter(args.meter)
            currency = (await ledger.get_tariff(meter.tariff_id)).currency
            cap = args.cap_per_purchase
            return await ledger.set_debt(
                meter.drn,
                balance=Money(minor_units("--balance", args.balance, currency), currency),
                rate_basis_points=rate,
                min_per_purchase_minor=minor_units(
                    "--min-per-purchase", args.min_per_purchase, currency
                ),
                cap_per_purchase_minor=(
                    minor_units("--cap-per-purchase", cap, currency) if cap is not None else None
                ),
                actor=_ACTOR,
                reason=args.reason,
            )

    try:
        debt = asyncio.run(run())
    except ValueError as exc:
        print(f"gateway debts set: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        return _fail("debts set", exc)
    _print(_describe_debt(debt), as_json=args.json)
    return 0


def _show(args: argparse.Namespace) -> int:
    async def run() -> tuple[MeterDebt | None, list[DebtRecovery]]:
        async with open_ledger(load_config(args).effective_database_url) as ledger:
            await ledger.get_meter(args.meter)
            return await ledger.get_debt(args.meter), await ledger.debt_recoveries(
                args.meter, limit=args.limit
            )

    try:
        debt, recoveries = asyncio.run(run())
    except GatewayError as exc:
        return _fail("debts show", exc)
    if debt is None:
        _print({"meter": args.meter, "balance": None, "recoveries": []}, as_json=args.json)
        return 0
    _print(_describe_debt(debt, recoveries), as_json=args.json)
    return 0


def _clear(args: argparse.Namespace) -> int:
    async def run() -> MeterDebt:
        async with open_ledger(load_config(args).effective_database_url) as ledger:
            await ledger.get_meter(args.meter)
            return await ledger.clear_debt(args.meter, actor=_ACTOR, reason=args.reason)

    try:
        debt = asyncio.run(run())
    except GatewayError as exc:
        return _fail("debts clear", exc)
    _print(_describe_debt(debt), as_json=args.json)
    return 0


def _describe_fbe(tariff_id: str, units: int, issues: list[FbeIssue] | None) -> dict[str, Any]:
    described: dict[str, Any] = {
        "tariff_id": tariff_id,
        "kwh_per_month": _kwh(units),
        "units_per_month": units,
    }
    if issues is not None:
        described["issued"] = [
            {
                "month": i.month,
                "kwh": _kwh(i.units),
                "tid": i.tid,
                "token_last4": i.token[-4:],
                "purchase_id": i.purchase_id,
            }
            for i in issues
        ]
    return described


def _fbe_set(args: argparse.Namespace) -> int:
    try:
        units = _units(args.kwh)
    except ValueError as exc:
        print(f"gateway fbe set: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        async with open_ledger(load_config(args).effective_database_url) as ledger:
            await ledger.set_fbe_allowance(args.tariff_id, units, actor=_ACTOR)

    try:
        asyncio.run(run())
    except GatewayError as exc:
        return _fail("fbe set", exc)
    _print(_describe_fbe(args.tariff_id, units, None), as_json=args.json)
    return 0


def _fbe_show(args: argparse.Namespace) -> int:
    async def read(ledger: Ledger) -> tuple[int, list[FbeIssue] | None]:
        await ledger.get_tariff(args.tariff_id)
        units = await ledger.fbe_allowance(args.tariff_id)
        if args.meter is None:
            return units, None
        await ledger.get_meter(args.meter)
        return units, await ledger.fbe_issues(args.meter)

    async def run() -> tuple[int, list[FbeIssue] | None]:
        async with open_ledger(load_config(args).effective_database_url) as ledger:
            return await read(ledger)

    try:
        units, issues = asyncio.run(run())
    except GatewayError as exc:
        return _fail("fbe show", exc)
    _print(_describe_fbe(args.tariff_id, units, issues), as_json=args.json)
    return 0
