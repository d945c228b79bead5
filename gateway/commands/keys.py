"""``gateway keys``: vending keys sealed in the ledger under the master key.

```
gateway keys add --sgc 123457 --krn 1 --dkga 4 --base-date 2014 (--key-hex HEX | --key-file F)
                 [--key-type 2] [--ea 7]
gateway keys list [--check]     attributes only (never a key); --check opens each one
```

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
