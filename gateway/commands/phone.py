"""``gateway phone``: an interactive phone in the terminal against a running gateway.

```
gateway phone [--gateway URL] [--sim URL] [--number +2547…] [--code *384*123#]
```

Dial the USSD code, answer screens, read the SMS inbox and text the shortcode (see
``gateway.sim.phone``). ``--sim`` is the Africa's Talking simulator the gateway sends SMS
through (default ``<gateway>/sim/africastalking``). Exit status 1 when the gateway or the
simulator cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio

from gateway.sim.phone import PhoneSettings, TerminalPhone, stdin_line


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``phone`` command."""
    parser = subparsers.add_parser(
        "phone", help="an interactive phone: dial the USSD code, read SMS, text the shortcode"
    )
    parser.add_argument(
        "--gateway",
        default="http://127.0.0.1:8080",
        help="the running gateway (default: %(default)s)",
    )
    parser.add_argument(
        "--sim", default=None, help="AT simulator base URL (default: <gateway>/sim/africastalking)"
    )
    parser.add_argument("--number", default="+254711000001", help="this phone's number (E.164)")
    parser.add_argument("--code", default="*384*123#", help="USSD code to dial")
    parser.add_argument(
        "--admin-token",
        default=None,
        help="the gateway's admin token: needed only when the gateway runs on another host"
        " (its simulator's SMS pages answer loopback callers without it)",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    settings = PhoneSettings(
        gateway_url=args.gateway,
        sim_url=args.sim,
        number=args.number,
        service_code=args.code,
        admin_token=args.admin_token,
    )
    phone = TerminalPhone(settings, stdin_line, print)
    try:
        return asyncio.run(phone.run())
    except KeyboardInterrupt:
        return 0
