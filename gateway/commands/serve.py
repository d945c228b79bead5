"""``gateway serve``: run the gateway (on the embedded defaults when nothing is configured)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Final, Protocol, TextIO

import structlog
from aiohttp import web
from aiohttp.web_runner import GracefulExit

from gateway import __version__
from gateway.app import (
    RUNTIME,
    Simulators,
    build_app,
    freeze_startup_heap,
    payment_callback_url,
    routes_summary,
)
from gateway.commands._common import add_config_arguments, load_config
from gateway.commands._workers import supervise
from gateway.config import Config, Secret
from gateway.errors import ConfigError, GatewayError
from gateway.ledger.postgres import is_postgres_url
from gateway.logging import configure_logging, mask_secrets, register_secrets

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
    parser.add_argument(
        "--workers",
        type=_positive,
        default=None,
        metavar="N",
        help="worker processes sharing the port (SO_REUSEPORT), each with its own database"
        " pool, watched by a parent that restarts one that dies. Default: the number of cores"
        " on PostgreSQL, 1 otherwise. PostgreSQL only: SQLite has one writer per file (a"
        " second process would only queue behind the first), and the demo's in-process"
        " simulators run once, so both refuse N > 1 (as do in-memory USSD sessions)."
        " Background work is shared among workers"
        " and instances through row claims (docs/operations.md, 'Workers and instances').",
    )
    parser.set_defaults(handler=_serve)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def resolve_workers(config: Config, asked: int | None) -> int:
    """How many worker processes ``gateway serve`` runs for ``config``.

    Raises:
        ConfigError: more than one was asked where only one can run (says why).
    """
    on_postgres = is_postgres_url(config.effective_database_url)
    shared_sessions = config.session_store != "memory"
    if asked is None:
        several = on_postgres and not config.uses_simulators and shared_sessions
        return (os.cpu_count() or 1) if several else 1
    if asked > 1 and not on_postgres:
        raise ConfigError(
            "--workers",
            f"{asked} asked, but the ledger is SQLite: one process writes a SQLite file (its"
            " one writer serialises every vend), so more workers would only wait on its lock."
            " Run one worker, or use PostgreSQL (GATEWAY_DATABASE_URL) to run several",
        )
    if asked > 1 and config.uses_simulators:
        raise ConfigError(
            "--workers",
            f"{asked} asked, but the simulated providers (GATEWAY_PAYMENTS/GATEWAY_SMS = sim)"
            " run inside the gateway process, once: run one worker, or run the simulators"
            " apart (gateway sim) and configure their URLs",
        )
    if asked > 1 and not shared_sessions:
        raise ConfigError(
            "--workers",
            f"{asked} asked, but USSD sessions are kept in memory (GATEWAY_SESSION_STORE ="
            " memory): a session's next hop may reach another worker. Use redis (or sqlite"
            " on one machine)",
        )
    return asked


BANNER_END: Final = "-- end of banner: JSON log lines follow on stderr --"


class Serving(Protocol):
    """What the banner reads: a worker's ``Runtime``, or the parent's view of its workers."""

    @property
    def config(self) -> Config: ...  # noqa: D102 - as in Runtime

    @property
    def simulators(self) -> Simulators | None: ...  # noqa: D102

    @property
    def admin_token(self) -> Secret: ...  # noqa: D102

    @property
    def base_url(self) -> str: ...  # noqa: D102

    def callback_url(self, provider: str, tail: str) -> str: ...  # noqa: D102


def banner(runtime: Serving, out: TextIO, *, workers: Sequence[int] = ()) -> None:
    """The first lines an operator reads: what runs, where, and how to try it.

    Plain text on stdout (the logs are on stderr), ending with ``BANNER_END``. Every configured
    secret is masked (``********``): the database password, the callback secret inside the
    callback URLs, API keys. One exception, on purpose: in demo mode an admin token the
    gateway generated itself is shown, since the operator has no other way to learn it.
    """
    config = runtime.config
    lines = [f"sts-gateway {__version__} listening on {runtime.base_url}"]
    if workers:
        pids = " ".join(str(pid) for pid in workers)
        lines.append(
            f"  workers:    {len(workers)} processes on one port (SO_REUSEPORT), pids {pids}"
        )
    if runtime.simulators is not None:
        sims = ", ".join(f"{name} {url}" for name, url in runtime.simulators.urls.items())
        lines += [
            "Running on SIMULATORS (demo mode): no real money moves and no real SMS is sent.",
            f"  simulators: {sims}",
            (
                f"  try it:     gateway phone --gateway {runtime.base_url}"
                f"   (dial {config.service_code})"
            ),
            "  demo meters: 04000000010 04000000028 04000000036 (EA07), 04000000044 (EA11)",
        ]
    for line in lines:
        print(mask_secrets(line), file=out)
    if runtime.simulators is not None:
        if config.admin_token is None:  # generated: printed unmasked, the operator needs it
            shown = f"token {runtime.admin_token.reveal()}"
        else:
            shown = "token as set in GATEWAY_ADMIN_TOKEN"
        print(f"  admin:      {runtime.base_url}/admin  {shown}", file=out)
    lines = [f"  database:   {config.effective_database_url}", "  routes:"]
    lines += [f"    {url:<72} {purpose}" for url, purpose in routes_summary(runtime)]
    if config.callback_secret is not None:
        lines.append("  (******** in the callback URLs: the value of GATEWAY_CALLBACK_SECRET)")
    lines.append(BANNER_END)
    for line in lines:
        print(mask_secrets(line), file=out)
    out.flush()


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args, host=args.host, port=args.port)
        workers = resolve_workers(config, args.workers)
    except GatewayError as exc:
        print(f"gateway serve: {mask_secrets(str(exc))}", file=sys.stderr)
        return 2
    register_secrets(*config.secret_values())
    os.umask(0o077)  # every file this process creates is private (ledger, sessions, keys)
    as_json = configure_logging(json=config.log_json, level=config.log_level, stream=sys.stderr)
    if workers == 1:
        return run(config, out=sys.stdout, json_errors=as_json)
    config = dataclasses.replace(config, log_json=as_json)  # the workers log as the parent does
    return supervise(
        config,
        workers,
        announce=_announce,
        out=sys.stdout,
        fail=lambda message: _fail(message, json_errors=as_json),
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Workers:
    """What the banner shows of a gateway whose workers listen (the parent has no runtime)."""

    config: Config
    callback_secret: Secret
    admin_token: Secret
    simulators: None = None

    @property
    def base_url(self) -> str:
        return self.config.effective_public_url

    def callback_url(self, provider: str, tail: str) -> str:
        return payment_callback_url(self.base_url, self.callback_secret, provider, tail)


def _announce(config: Config, pids: list[int], out: TextIO) -> None:
    assert config.callback_secret is not None  # noqa: S101 - shared_secrets set it
    assert config.admin_token is not None  # noqa: S101
    banner(
        _Workers(
            config=config,
            callback_secret=config.callback_secret,
            admin_token=config.admin_token,
        ),
        out,
        workers=pids,
    )


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
            workers=1,
            **_one_worker_because(config),
        )
        await asyncio.Event().wait()  # until a signal raises GracefulExit
    finally:
        await runner.cleanup()


def _one_worker_because(config: Config) -> dict[str, str]:
    """Why this gateway runs one process, when that is not a choice (the start's log line)."""
    if not is_postgres_url(config.effective_database_url):
        return {
            "one_worker": "SQLite: one process writes the ledger file (--workers needs PostgreSQL)"
        }
    if config.uses_simulators:
        return {"one_worker": "the simulators run inside this process, once"}
    if config.session_store == "memory":
        return {"one_worker": "USSD sessions are kept in this process's memory"}
    return {}


def _fail(message: str, *, json_errors: bool) -> int:
    """Report a failed start (masked): a JSON log line when logs are JSON, plain text otherwise."""
    if json_errors:
        log.error("serve_failed", error=message)
    else:
        print(f"gateway serve: {mask_secrets(message)}", file=sys.stderr)
    return 1


def run(config: Config, *, out: TextIO, json_errors: bool = False) -> int:
    """Build the app and serve it until interrupted; the exit status."""
    try:
        asyncio.run(serve(config, out))
    except GatewayError as exc:
        return _fail(str(exc), json_errors=json_errors)
    except OSError as exc:
        where = f"{config.host}:{config.port}"
        return _fail(f"cannot listen on {where}: {exc}", json_errors=json_errors)
    except (KeyboardInterrupt, GracefulExit):
        return 0
    return 0
