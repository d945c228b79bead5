"""``gateway daraja``: one-time Daraja set-up calls an operator makes per shortcode.

```
gateway daraja pull-register --nominated-number +254722000000 --callback-url URL
                             [--shortcode SC] [--base-url URL] [--config FILE] [--json]
```

``pull-register`` registers the shortcode for Pull Transactions (``POST
/pulltransactions/v1/register``), which the gateway's recovery of STK pushes whose outcome a
crash left unknown relies on (``find_payments``). Production registration is one-time per
shortcode: a shortcode registered before answers "already registered", which is success too.
The Daraja app's consumer key and secret, the shortcode and the base URL come from the
configuration (``GATEWAY_DARAJA_KEY``, ``GATEWAY_DARAJA_SECRET``, ``GATEWAY_DARAJA_SHORTCODE``,
``GATEWAY_DARAJA_BASE_URL``); flags override the shortcode and base URL. Secrets are never
printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field

import aiohttp

from gateway.commands._common import add_config_arguments, load_config
from gateway.errors import ConfigError, GatewayError
from gateway.payments.daraja import DarajaProvider, PullRegistration
from gateway.phone import InvalidPhoneNumber, Msisdn, parse_msisdn


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``daraja`` command group."""
    parser = subparsers.add_parser("daraja", help="one-time Daraja set-up (per shortcode)")
    commands = parser.add_subparsers(dest="daraja_command", metavar="COMMAND", required=True)
    pull = commands.add_parser(
        "pull-register", help="register the shortcode for Pull Transactions (once)"
    )
    add_config_arguments(pull)
    pull.add_argument(
        "--nominated-number", required=True, help="the Safaricom number nominated (+2547…)"
    )
    pull.add_argument("--callback-url", required=True, help="the CallBackURL Daraja keeps")
    pull.add_argument("--shortcode", default=None, help="default: GATEWAY_DARAJA_SHORTCODE")
    pull.add_argument("--base-url", default=None, help="default: GATEWAY_DARAJA_BASE_URL")
    pull.add_argument("--timeout", type=float, default=30.0, help="seconds for the call")
    pull.add_argument("--json", action="store_true", help="print one JSON object")
    pull.set_defaults(handler=_pull_register)


@dataclass(frozen=True, slots=True, kw_only=True)
class _PullRequest:
    base_url: str
    key: str = field(repr=False)
    secret: str = field(repr=False)
    shortcode: str
    nominated: Msisdn
    callback_url: str
    timeout_s: float


def _pull_request(args: argparse.Namespace) -> _PullRequest:
    """What to send, from the configuration and the flags.

    Raises:
        ConfigError: a setting is missing.
        ValueError: a flag is malformed (the message names it).
    """
    config = load_config(args)
    settings = config.daraja
    shortcode = args.shortcode or settings.extra.get("shortcode", "")
    base_url = args.base_url or settings.base_url
    if not shortcode:
        raise ConfigError("GATEWAY_DARAJA_SHORTCODE", "required (or --shortcode)")
    if not base_url:
        raise ConfigError("GATEWAY_DARAJA_BASE_URL", "required (or --base-url)")
    if not (settings.key.reveal() and settings.secret.reveal()):
        raise ConfigError("GATEWAY_DARAJA_KEY", "the consumer key and secret are required")
    if not args.callback_url.startswith(("https://", "http://")):
        raise ValueError(f"--callback-url: not an http(s) URL: {args.callback_url!r}")
    try:
        nominated = parse_msisdn(args.nominated_number, "KE")
    except InvalidPhoneNumber as exc:
        raise ValueError(f"--nominated-number: {exc}") from exc
    return _PullRequest(
        base_url=base_url,
        key=settings.key.reveal(),
        secret=settings.secret.reveal(),
        shortcode=shortcode,
        nominated=nominated,
        callback_url=args.callback_url,
        timeout_s=args.timeout,
    )


def _pull_register(args: argparse.Namespace) -> int:
    try:
        answer = asyncio.run(_register(_pull_request(args)))
    except (GatewayError, ValueError) as exc:
        print(f"gateway daraja pull-register: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "shortcode": answer.shortcode,
                    "status": answer.status,
                    "description": answer.description,
                    "reference": answer.reference,
                    "already_registered": answer.already_registered,
                }
            )
        )
    else:
        said = "already registered" if answer.already_registered else "registered"
        print(f"shortcode {answer.shortcode}: {said} for Pull Transactions ({answer.description})")
    return 0


async def _register(request: _PullRequest) -> PullRegistration:
    async with aiohttp.ClientSession() as session:
        provider = DarajaProvider(
            session,
            base_url=request.base_url,
            consumer_key=request.key,
            consumer_secret=request.secret,
            shortcode=request.shortcode,
            passkey="",
            callback_url="",
            timeout_s=request.timeout_s,
        )
        return await provider.register_pull(
            nominated_number=request.nominated, callback_url=request.callback_url
        )
