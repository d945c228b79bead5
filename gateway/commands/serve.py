"""``gateway serve``: run the gateway (on the embedded defaults when nothing is configured)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

import structlog
from aiohttp import web
from aiohttp.web_runner import GracefulExit

from gateway import __version__
from gateway.app import RUNTIME, Runtime, build_app, freeze_startup_heap, routes_summary
from gateway.commands._common import add_config_arguments, load_config
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.logging import configure_logging

log = structlog.get_logger()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gateway serve``."""
    parser = subparsers.add_parser(
        "serve",
        help="run the gateway (simulators and SQLite when nothing is configured)",
        description="Run the gateway. With no configuration it runs on the embedded defaults: "
        "a SQLite file in ./var, the local STS engine with a generated test key, demo meters, "
        "and every provider simulated on loopback.",
    )
    add_config_arguments(parser)
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default 8080)")
    parser.set_defaults(handler=_serve)


def banner(runtime: Runtime, out: TextIO) -> None:
    """The first lines an operator reads: what runs, where, and how to try it."""
    config = runtime.config
    print(f"sts-gateway {__version__} listening on {runtime.base_url}", file=out)
    if runtime.simulators is not None:
        print(
            "Running on SIMULATORS (demo mode): no real money moves and no real SMS is sent.",
            file=out,
        )
        sims = ", ".join(f"{name} {url}" for name, url in runtime.simulators.urls.items())
        print(f"  simulators: {sims}", file=out)
        print(
            f"  try it:     gateway phone --gateway {runtime.base_url}"
            f"   (dial {config.service_code})",
            file=out,
        )
        print(
            "  demo meters: 04000000010 04000000028 04000000036 (EA07), 04000000044 (EA11)",
            file=out,
        )
        print(
            f"  admin:      {runtime.base_url}/admin  token {runtime.admin_token.reveal()}",
            file=out,
        )
    print(f"  database:   {config.effective_database_url}", file=out)
    print("  routes:", file=out)
    for url, purpose in routes_summary(runtime):
        print(f"    {url:<72} {purpose}", file=out)
    out.flush()


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args, host=args.host, port=args.port)
    except GatewayError as exc:
        print(f"gateway serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(json=config.log_json, level=config.log_level, stream=sys.stderr)
    return run(config, out=sys.stdout)


async def serve(config: Config, out: TextIO) -> None:
    """Serve until SIGINT/SIGTERM; the banner is printed once the port accepts connections."""
    app = await build_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    freeze_startup_heap()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        runtime = app[RUNTIME]
        banner(runtime, out)
        log.info(
            "gateway_started",
            url=runtime.base_url,
            simulated=runtime.simulators is not None,
            mode=str(config.mode),
        )
        await asyncio.Event().wait()  # until a signal raises GracefulExit
    finally:
        await runner.cleanup()


def run(config: Config, *, out: TextIO) -> int:
    """Build the app and serve it until interrupted; the exit status."""
    try:
        asyncio.run(serve(config, out))
    except GatewayError as exc:
        print(f"gateway serve: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{config.host}:{config.port}"
        print(f"gateway serve: cannot listen on {where}: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, GracefulExit):
        return 0
    return 0
