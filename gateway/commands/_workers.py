"""``gateway serve --workers N``: N worker processes on one port, watched by a parent.

Each worker is a fresh interpreter (multiprocessing ``spawn``: nothing of the parent's event
loop, sockets or pools is inherited) that builds the whole application from the ``Config`` the
parent hands it (its own PostgreSQL pool, its own Redis client) and listens on the same
host:port with ``SO_REUSEPORT``: the kernel spreads new connections over the workers.
Background work (the sweeper, the payment checker, the outbox) runs in every worker and is
shared through the ledger's row claims (``FOR UPDATE SKIP LOCKED`` and leases), as it is among
instances on several machines.

The parent opens no database and serves nothing. It prints the banner once, when every worker
listens; it passes SIGINT/SIGTERM on as SIGTERM and waits for the workers to finish what they
hold; and it starts a worker that died (a crash, ``kill -9``, the OOM killer) again, after a
pause that doubles while the deaths come quickly (``RESTART_BACKOFF_S`` up to
``RESTART_BACKOFF_MAX_S``; a worker that lived ``STABLE_AFTER_S`` resets it). A worker whose
parent disappears stops by itself.

Which backends allow more than one worker is decided in ``gateway.commands.serve``
(``resolve_workers``): PostgreSQL only, and not with in-process simulators.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Final, TextIO

import structlog
from aiohttp import web

from gateway.app import build_app, freeze_startup_heap
from gateway.config import Config, Mode, Secret
from gateway.demo_data import demo_master_key
from gateway.errors import GatewayError
from gateway.logging import configure_logging, mask_secrets, register_secrets

log = structlog.get_logger()

RESTART_BACKOFF_S: Final = 0.5  # the first pause before a dead worker is started again
RESTART_BACKOFF_MAX_S: Final = 30.0
STABLE_AFTER_S: Final = 30.0  # a worker that lived this long died "for the first time"
STOP_GRACE_S: Final = 30.0  # how long the workers get to finish before they are killed
_POLL_S: Final = 0.2
_PARENT_POLL_S: Final = 1.0


def shared_secrets(config: Config) -> Config:
    """``config`` with every secret a worker would otherwise make up on its own made once here.

    Outside production an unset callback secret or admin token is random per process, and the
    demo master key file is created at first start: with several workers they must be the
    same in all of them (a callback to another worker's secret would get 404).
    """
    master_key = config.master_key
    if master_key is None and config.mode is Mode.DEMO:
        master_key = Secret(base64.b64encode(demo_master_key(config.data_dir)).decode())
    return dataclasses.replace(
        config,
        callback_secret=config.callback_secret or Secret(secrets.token_urlsafe(24)),
        admin_token=config.admin_token or Secret(secrets.token_urlsafe(24)),
        master_key=master_key,
    )


# ----------------------------------------------------------------------------------- the worker


def worker_main(config: Config, index: int, report: Connection) -> None:
    """A worker process: build the app, listen with ``SO_REUSEPORT``, serve until SIGTERM.

    Tells the parent ``("ready", pid)`` once it listens, or ``("failed", message)``.
    """
    register_secrets(*config.secret_values())
    os.umask(0o077)
    configure_logging(json=config.log_json, level=config.log_level, stream=sys.stderr)
    structlog.contextvars.bind_contextvars(worker=index)
    try:
        asyncio.run(_worker(config, report, parent=os.getppid()))
    except GatewayError as exc:
        _tell(report, ("failed", mask_secrets(str(exc))))
        raise SystemExit(1) from None
    except OSError as exc:
        where = f"{config.host}:{config.port}"
        _tell(report, ("failed", mask_secrets(f"cannot listen on {where}: {exc}")))
        raise SystemExit(1) from None


def _tell(report: Connection, message: tuple[str, object]) -> None:
    with contextlib.suppress(OSError):
        report.send(message)


async def _worker(config: Config, report: Connection, *, parent: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C reaches the whole process group
        loop.add_signal_handler(signum, stop.set)
    app = await build_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    freeze_startup_heap()
    try:
        await web.TCPSite(runner, config.host, config.port, reuse_port=True).start()
        _tell(report, ("ready", os.getpid()))
        log.info("worker_started", pid=os.getpid())
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PARENT_POLL_S):
                    await stop.wait()
            if os.getppid() != parent:  # the parent died: nobody would restart or stop us
                log.warning("worker_orphaned", parent=parent)
                stop.set()
    finally:
        await runner.cleanup()
        log.info("worker_stopped", pid=os.getpid())


# ----------------------------------------------------------------------------------- the parent


@dataclass(slots=True)
class _Worker:
    index: int
    process: BaseProcess
    report: Connection
    started: float
    pid: int | None = None  # set once it listens


@dataclass(slots=True)
class _Restarts:
    """When each dead worker is started again, and its current pause."""

    due: dict[int, float] = field(default_factory=dict)
    pause: dict[int, float] = field(default_factory=dict)

    def schedule(self, index: int, lived_s: float, now: float) -> float:
        pause = self.pause.get(index, 0.0)
        pause = (
            RESTART_BACKOFF_S
            if lived_s >= STABLE_AFTER_S or pause == 0.0
            else min(pause * 2, RESTART_BACKOFF_MAX_S)
        )
        self.pause[index] = pause
        self.due[index] = now + pause
        return pause


class Supervisor:
    """Starts ``count`` workers, restarts the ones that die, stops them all on a signal."""

    def __init__(self, config: Config, count: int) -> None:
        self._config = config
        self._count = count
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        self._restarts = _Restarts()

    def _start(self, index: int) -> _Worker:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=worker_main,
            args=(self._config, index, send),
            name=f"gateway-worker-{index}",
            daemon=False,
        )
        process.start()
        send.close()  # the child holds its end; ours closes so a dead child reads as EOF
        worker = _Worker(index=index, process=process, report=receive, started=time.monotonic())
        self._workers[index] = worker
        return worker

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def _messages(self, worker: _Worker) -> list[tuple[str, object]]:
        found: list[tuple[str, object]] = []
        with contextlib.suppress(EOFError, OSError):
            while worker.report.poll():
                found.append(worker.report.recv())
        return found

    def _wait(self) -> None:
        handles: list[object] = []
        for worker in self._workers.values():
            handles += [worker.process.sentinel, worker.report]
        if not handles:  # every worker is waiting for its restart
            time.sleep(_POLL_S)
            return
        multiprocessing.connection.wait(handles, timeout=_POLL_S)  # type: ignore[arg-type]

    def start_all(self) -> str | None:
        """Start every worker and wait until each listens; the first failure's message, or None."""
        for index in range(self._count):
            self._start(index)
        while not self._stopping:
            self._wait()
            for worker in self._workers.values():
                for kind, value in self._messages(worker):
                    if kind == "failed":
                        return str(value)
                    worker.pid = int(str(value))
                if worker.pid is None and not worker.process.is_alive():
                    return f"worker {worker.index} exited ({worker.process.exitcode}) at start"
            if all(worker.pid is not None for worker in self._workers.values()):
                return None
        return None

    @property
    def pids(self) -> list[int]:
        """The listening workers' process ids, by worker index."""
        return [w.pid for _, w in sorted(self._workers.items()) if w.pid is not None]

    @property
    def stopping(self) -> bool:
        """Whether a signal asked the workers to stop."""
        return self._stopping

    def supervise(self) -> None:
        """Restart workers that die, until SIGINT or SIGTERM."""
        while not self._stopping:
            self._wait()
            now = time.monotonic()
            for index, worker in list(self._workers.items()):
                for kind, value in self._messages(worker):
                    if kind == "ready":
                        worker.pid = int(str(value))
                        log.info("worker_restarted", worker=index, pid=worker.pid)
                    else:
                        log.error("worker_start_failed", worker=index, error=str(value))
                if not worker.process.is_alive():
                    worker.process.join()
                    worker.report.close()
                    del self._workers[index]  # its sentinel no longer wakes the wait
                    pause = self._restarts.schedule(index, now - worker.started, now)
                    log.error(
                        "worker_died",
                        worker=index,
                        pid=worker.process.pid,
                        exit_code=worker.process.exitcode,
                        restart_in_s=pause,
                    )
            for index, due in list(self._restarts.due.items()):
                if due <= now and not self._stopping:
                    del self._restarts.due[index]
                    self._start(index)

    def stop(self) -> None:
        """SIGTERM every worker, wait up to ``STOP_GRACE_S`` for them, then kill the rest."""
        self._stopping = True
        alive = [w.process for w in self._workers.values() if w.process.is_alive()]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in alive:
            if process.is_alive():
                log.warning("worker_killed", pid=process.pid)
                process.kill()
                process.join()
        for worker in self._workers.values():
            worker.report.close()


def supervise(
    config: Config,
    count: int,
    *,
    announce: Callable[[Config, list[int], TextIO], None],
    out: TextIO,
    fail: Callable[[str], int],
) -> int:
    """Run ``count`` workers until SIGINT/SIGTERM; the exit status.

    ``announce(config, pids, out)`` prints the banner once every worker listens; ``fail``
    reports a start that failed (and gives the exit status).
    """
    config = shared_secrets(config)
    register_secrets(*config.secret_values())
    supervisor = Supervisor(config, count)
    previous = {
        signum: signal.signal(signum, supervisor._on_signal)  # noqa: SLF001 - its own handler
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        failure = supervisor.start_all()
        if failure is not None:
            return fail(failure)
        if supervisor.stopping:
            return 0
        announce(config, supervisor.pids, out)
        log.info(
            "gateway_started",
            url=config.effective_public_url,
            workers=count,
            pids=supervisor.pids,
            mode=str(config.mode),
        )
        supervisor.supervise()
        return 0
    finally:
        supervisor.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
