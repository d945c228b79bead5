"""``gateway demo``: scripted purchases (USSD, SMS, C2B paybill) through every layer on loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from gateway.demo import DemoFailedError, run_demo
from gateway.errors import GatewayError
from gateway.logging import configure_logging


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gateway demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="buy tokens by USSD, SMS and paybill against the simulators, end to end",
        description="Serve a gateway on loopback with its simulators, then buy a token by USSD, "
        "by SMS BUY and by C2B paybill, keying each token into a meter emulator. Prints what "
        "each party saw; exits non-zero if any step fails.",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="keep the ledger here (default: scratch)"
    )
    parser.add_argument("--json", action="store_true", help="end with the results as JSON")
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    configure_logging(json=False, level="warning", stream=sys.stderr)
    try:
        report = asyncio.run(run_demo(sys.stdout, data_dir=args.data_dir))
    except (DemoFailedError, GatewayError) as exc:
        print(f"\ngateway demo FAILED: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "scenarios": [
                        {"name": r.name, "kwh": r.kwh, "credit_kwh": r.credit_kwh}
                        for r in report.results
                    ]
                }
            )
        )
    return 0
