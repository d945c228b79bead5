"""``gateway keys``: vending keys sealed in the ledger under the master key.

```
gateway keys add --sgc 123457 --krn 1 --dkga 4 --base-date 2014 (--key-hex HEX | --key-file F)
                 [--key-type 2] [--ea 7]
gateway keys list [--check]     attributes only (never a key); --check opens each one
gateway keys rotate --sgc 123457 --from-krn 1 --to-krn 2 (--all | --meters FILE)
                 [--to-sgc SGC] [--tariff-index TI] [--base-date 2014] [--dry-run] [--json]
```

``rotate`` plans a key change for each meter on the old key: its next purchase delivers the
key-change tokens (made under the old key) before the credit token (made under the new key),
in one SMS, and the meter record takes the new key's attributes in the same transaction. A
change of base date (a 1993 key, whose TIDs ran out on 2024-11-24, moving to a 2014 key) sets
the rollover flag (RO = 1); the meters' purchases waiting in ``vend_failed`` (a 1993 key past
its range) are queued again and the sweeper vends them. A rotation keeps the meters' decoder key
only if it changes nothing: rotating a key to itself is refused, for DKGA02 with the reason (its
decoder keys do not depend on the base date, so a rollover needs another KRN or SGC, else the
meters would take their old tokens again). The new key must be imported first
(``keys add``); running gateway instances load keys at start, so restart them after importing
(until then a purchase is vended under the old key and the change stays pending).

The master key comes from ``GATEWAY_MASTER_KEY`` (32 bytes, base64) or the configuration
file. A key that does not match its attributes (wrong length for its DKGA, bad parity) is
refused before anything is stored; a wrong master key is named as such, never a garbled key.
Keys are never printed or logged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from gateway.commands._common import add_config_arguments, load_config
from gateway.errors import ConfigError, GatewayError
from gateway.ledger import (
    KeyRotation,
    Ledger,
    MeterNumber,
    PurchaseState,
    SealedVendingKey,
    VendingKeyMaterial,
    VendingKeyUnreadable,
    open_ledger,
    open_vending_key,
    seal_vending_key,
)
from gateway.logging import configure_logging
from gateway.sts import StsError, VendingKey


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``keys`` command group."""
    parser = subparsers.add_parser("keys", help="vending keys sealed under the master key")
    commands = parser.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)

    add = commands.add_parser("add", help="seal and store a vending key")
    add_config_arguments(add)
    add.add_argument("--sgc", required=True, help="supply group code, 6 digits")
    add.add_argument("--krn", type=int, required=True, help="key revision number, 1-9")
    add.add_argument("--dkga", type=int, required=True, choices=[2, 4], help="DKGA 2 or 4")
    add.add_argument("--base-date", type=int, required=True, choices=[1993, 2014, 2035])
    add.add_argument("--key-type", type=int, default=2, help="STS key type (default 2)")
    add.add_argument("--ea", type=int, default=7, choices=[7, 11], help="encryption algorithm")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--key-hex", help="the key in hexadecimal (visible in shell history!)")
    source.add_argument("--key-file", type=Path, help="a file holding the key in hexadecimal")
    add.add_argument("--json", action="store_true", help="print one JSON object")
    add.set_defaults(handler=_add)

    listing = commands.add_parser("list", help="the stored keys' attributes (never the keys)")
    add_config_arguments(listing)
    listing.add_argument("--check", action="store_true", help="open each key with the master key")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_list)

    rotate = commands.add_parser(
        "rotate", help="move meters to a new key revision at their next purchase"
    )
    add_config_arguments(rotate)
    rotate.add_argument("--sgc", required=True, help="the meters' supply group code")
    rotate.add_argument("--from-krn", type=int, required=True, help="their current KRN")
    rotate.add_argument("--to-krn", type=int, required=True, help="the new key's KRN")
    rotate.add_argument("--to-sgc", help="the new key's SGC (default: the same)")
    rotate.add_argument("--tariff-index", help="a new tariff index, 2 digits (default: kept)")
    rotate.add_argument(
        "--base-date",
        type=int,
        choices=[1993, 2014, 2035],
        help="the new key's base date (default: the imported key's; must agree with it)",
    )
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every meter on the old key")
    which.add_argument("--meters", type=Path, help="a file of meter numbers, one per line")
    rotate.add_argument(
        "--dry-run", action="store_true", help="say what would change, change nothing"
    )
    rotate.add_argument("--json", action="store_true", help="print one JSON object")
    rotate.set_defaults(handler=_rotate)


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
    with _quiet_logs():
        try:
            return asyncio.run(work)
        except GatewayError as exc:
            print(f"gateway keys {name}: {exc}", file=sys.stderr)
            return 1


def _key_bytes(args: argparse.Namespace) -> bytes:
    """The key from ``--key-hex`` or ``--key-file``.

    Raises:
        ConfigError: not readable or not hexadecimal (the message never shows the key).
    """
    if args.key_file is not None:
        try:
            text = args.key_file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("--key-file", f"cannot read {args.key_file}: {exc}") from exc
        option = "--key-file"
    else:
        text, option = args.key_hex, "--key-hex"
    try:
        return bytes.fromhex("".join(text.split()))
    except ValueError as exc:
        raise ConfigError(option, "the key is not hexadecimal") from exc


def _master_key(args: argparse.Namespace) -> bytes:
    master = load_config(args).master_key_bytes()
    if master is None:
        raise ConfigError("GATEWAY_MASTER_KEY", "is not set: it seals the vending keys")
    return master


def _add(args: argparse.Namespace) -> int:
    async def work() -> int:
        master = _master_key(args)
        key = _key_bytes(args)
        try:  # the engine's own checks: length for the DKGA, parity, SGC/KRN/base date ranges
            VendingKey(
                sgc=args.sgc, krn=args.krn, dkga=args.dkga, base_date=args.base_date, key=key
            )
        except StsError as exc:
            raise ConfigError("vending key", str(exc)) from exc
        material = VendingKeyMaterial(
            sgc=args.sgc,
            krn=args.krn,
            key_type=args.key_type,
            ea=args.ea,
            dkga=args.dkga,
            base_date=args.base_date,
            key=key,
        )
        async with open_ledger(load_config(args).effective_database_url) as ledger:
            await ledger.put_vending_key(seal_vending_key(material, master))
        if args.json:
            print(json.dumps({"sgc": args.sgc, "krn": args.krn, "stored": True}))
        else:
            print(f"vending key sgc={args.sgc} krn={args.krn} sealed and stored")
        return 0

    return _run("add", work())


def _list(args: argparse.Namespace) -> int:
    async def work() -> int:
        master = _master_key(args) if args.check else None
        async with open_ledger(load_config(args).effective_database_url) as ledger:
            sealed = await ledger.vending_keys()
        failed = 0
        for key in sealed:
            opens: bool | None = None
            if master is not None:
                try:
                    open_vending_key(key, master)
                    opens = True
                except VendingKeyUnreadable as exc:
                    opens = False
                    failed += 1
                    print(f"gateway keys list: {exc}", file=sys.stderr)
            row = {
                "sgc": key.sgc,
                "krn": key.krn,
                "key_type": key.key_type,
                "ea": key.ea,
                "dkga": key.dkga,
                "base_date": key.base_date,
                "opens": opens,
            }
            if args.json:
                print(json.dumps(row))
            else:
                status = "" if opens is None else ("  opens" if opens else "  DOES NOT OPEN")
                print(
                    f"sgc={key.sgc} krn={key.krn} kt={key.key_type} ea={key.ea:02d}"
                    f" dkga={key.dkga:02d} base_date={key.base_date}{status}"
                )
        return 1 if failed else 0

    return _run("list", work())


def _meter_list(path: Path) -> list[MeterNumber]:
    """Meter numbers from a file: one per line; blank lines and ``#`` comments are skipped.

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--meters", f"cannot read {path}: {exc}") from exc
    meters = []
    for line in text.splitlines():
        drn = line.split("#", 1)[0].strip().strip(",")
        if drn:
            meters.append(MeterNumber(drn))
    return meters


def _rotation_keys(
    args: argparse.Namespace, keys: list[SealedVendingKey]
) -> tuple[SealedVendingKey, SealedVendingKey]:
    """The old and the new vending key of the rotation, checked against each other.

    Raises:
        ConfigError: a key is not imported, or the two cannot make a key change.
    """
    by_slot = {(key.sgc, key.krn): key for key in keys}
    to_sgc = args.to_sgc or args.sgc
    old = by_slot.get((args.sgc, args.from_krn))
    new = by_slot.get((to_sgc, args.to_krn))
    if old is None:
        raise ConfigError(
            "--from-krn",
            f"no vending key sgc={args.sgc} krn={args.from_krn}: the key-change"
            " tokens are made under it; import it with `gateway keys add`",
        )
    if new is None:
        raise ConfigError(
            "--to-krn",
            f"no vending key sgc={to_sgc} krn={args.to_krn}: import it first with"
            " `gateway keys add`",
        )
    if new is old:
        if old.dkga == 2:  # DKGA02
            raise ConfigError(
                "--to-krn",
                f"the new key is the old one (sgc={old.sgc} krn={old.krn}): DKGA02 does not"
                " derive the decoder key from the base date, so a change of base date alone"
                " gives each meter its current key with the rollover flag (RO = 1), and the"
                " meters would accept their old tokens again; import the new base date's key"
                " under another KRN (`gateway keys add --krn N`) and rotate to that KRN",
            )
        raise ConfigError("--to-krn", "the new key is the old one")
    if (new.ea, new.dkga) != (old.ea, old.dkga):
        raise ConfigError(
            "--to-krn",
            f"a key change keeps the algorithm: the old key is EA{old.ea:02d}"
            f" DKGA{old.dkga:02d}, the new one EA{new.ea:02d} DKGA{new.dkga:02d}",
        )
    if args.base_date is not None and args.base_date != new.base_date:
        raise ConfigError(
            "--base-date",
            f"the key sgc={to_sgc} krn={args.to_krn} was imported with base date"
            f" {new.base_date}, not {args.base_date}",
        )
    if args.tariff_index is not None and not (
        len(args.tariff_index) == 2 and args.tariff_index.isdigit()
    ):
        raise ConfigError("--tariff-index", "a tariff index is 2 digits")
    return old, new


async def _vend_failed_of(ledger: Ledger, meters: set[str]) -> list[str]:
    """Purchases of ``meters`` in VEND_FAILED (a 1993 key past its TID range …)."""
    failed = await ledger.find_purchases(states=[PurchaseState.VEND_FAILED], limit=1000)
    return [purchase.purchase_id for purchase in failed if purchase.meter in meters]


def _rotate(args: argparse.Namespace) -> int:
    async def work() -> int:
        wanted = _meter_list(args.meters) if args.meters is not None else None
        async with open_ledger(load_config(args).effective_database_url) as ledger:
            old, new = _rotation_keys(args, await ledger.vending_keys())
            rotation = KeyRotation(
                sgc=args.sgc,
                from_krn=args.from_krn,
                to_krn=args.to_krn,
                to_base_date=new.base_date,
                to_sgc=args.to_sgc,
                to_tariff_index=args.tariff_index,
            )
            found = await ledger.meters_on_key(args.sgc, args.from_krn, meters=wanted)
            meters: list[str] = [meter.drn for meter in found]
            stuck = await _vend_failed_of(ledger, set(meters))
            if not args.dry_run:
                planned = await ledger.plan_key_rotation(
                    rotation, meters=wanted, actor="operator:cli"
                )
                meters = [change.meter for change in planned]
        skipped = sorted(set(wanted) - set(meters)) if wanted is not None else []
        report = {
            "sgc": args.sgc,
            "from_krn": args.from_krn,
            "to_sgc": args.to_sgc or args.sgc,
            "to_krn": args.to_krn,
            "from_base_date": old.base_date,
            "to_base_date": new.base_date,
            "rollover": old.base_date != new.base_date,
            "dry_run": args.dry_run,
            "meters": meters,
            "skipped": skipped,
            "vend_failed": stuck,
        }
        if args.json:
            print(json.dumps(report))
        else:
            _print_rotation(report)
        return 0

    return _run("rotate", work())


def _print_rotation(report: dict[str, Any]) -> None:
    verb = "would plan" if report["dry_run"] else "planned"
    roll = ", rollover (RO=1)" if report["rollover"] else ""
    print(
        f"{verb} a key change for {len(report['meters'])} meter(s):"
        f" sgc={report['sgc']} krn={report['from_krn']} base {report['from_base_date']}"
        f" -> sgc={report['to_sgc']} krn={report['to_krn']} base {report['to_base_date']}{roll}"
    )
    print("each meter's next purchase delivers the key-change tokens before its credit token")
    for drn in report["skipped"]:
        print(f"skipped {drn}: not on sgc={report['sgc']} krn={report['from_krn']}")
    if report["vend_failed"]:
        queued = "would be queued" if report["dry_run"] else "are queued"
        print(
            f"{len(report['vend_failed'])} vend_failed purchase(s) of these meters {queued} again"
            f" ({', '.join(report['vend_failed'][:10])}): the sweeper vends them, key change first"
        )
    if not report["dry_run"]:
        print("restart running gateway instances if the new key was imported after they started")
