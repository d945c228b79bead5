"""The ``gateway`` command: thin, it parses arguments and calls builders.

Each command group lives in its own module under ``gateway/commands/`` and exposes
``register(subparsers)``; this module finds them, so adding a group never edits this file.
Conventions (docs/architecture.md): ``--json`` on every command that prints data; exit status
non-zero on failure.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import cast

import gateway.commands
from gateway import __version__

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one sub-command per registered command module."""
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="sts-gateway: prepaid electricity over USSD/SMS and mobile money.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(gateway.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"gateway.commands.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = cast("Handler | None", getattr(args, "handler", None))
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)
