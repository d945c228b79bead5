"""USSD throughput and latency: the real gateway, the bare flows, and a trivial handler.

Server kinds, all measured in the same run so that their ratios are comparable:

- ``trivial``: an aiohttp handler that reads the form and answers ``END ok`` (the floor: HTTP
  and the event loop alone);
- ``fake-<store>``: the USSD route, the flows engine and a session store over fake customer
  services (what the flows cost without the ledger);
- ``real-<store>``: the real application, ``gateway.app.build_app`` on the embedded defaults
  (SQLite ledger seeded with the demo meters, middleware, metrics, background workers), with
  the chosen session store (``Config.session_store``: memory, sqlite or redis), and, as
  ``gateway serve`` does, ``gc.freeze()`` once started.

Each server kind runs as 1 and 2 worker processes. Workers are ``gateway serve``-like processes
(``build_app`` + ``AppRunner`` + ``TCPSite``) sharing ONE port with ``SO_REUSEPORT``: the kernel
spreads connections over them (by connection, so 64 connections may split unevenly). The
in-memory store cannot be shared between processes, so it runs with one worker only. For the
real app the data directory is prepared (migrated, seeded, master key) before the workers start,
and both workers open the same ledger and session files.

The load generator is a separate process: a raw asyncio HTTP/1.1 keep-alive client (no client
library, so that it leaves as much of the machine as it can to the server; its own CPU per hop
is printed), callback-driven: a response's last byte writes the next request from
``data_received`` (no task or future per hop), so exactly N hops stay in flight. Before
measuring it plays one whole journey and checks every reply. Each of N connections plays
customers one after another, one request in flight per connection, Africa's Talking-shaped
form POSTs with the cumulative ``text``: dial → 1 (Buy) → meter → 500 → 2 (Cancel), five hops,
the meter taken in turn from the demo meters (real kinds: each is looked up in the ledger and
quoted).

Printed per run: hops/s, p50/p99 hop latency (client side: request written → response read),
errors, the server processes' CPU per hop (``/proc``, all threads), the load generator's CPU per
hop and its share of the machine, the capacity implied by the server's CPU per hop if it had
every core, and the 1-minute load average after the run (the machine may be shared). Then one
JSON line; the exit status is 1 if a worker process died during a run. On a shared 2-core
machine the wall-clock figures move with whatever else runs; CPU per hop does much less. Run:
``python bench/ussd.py [--duration 3] [--quick] [--kinds trivial,real-sqlite] [--uvloop]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

from aiohttp import web

from flows.engine import UssdEngine
from flows.journeys import build_screens
from flows.ports import SessionStore
from flows.sessions import MemorySessionStore, SqliteSessionStore
from flows.testing import FakeCustomerServices, make_meter_number
from gateway.config import Config
from gateway.web.ussd import FollowUps, ussd_routes

FAKE_METER = make_meter_number("3701234567")
DEMO_METERS = ("04000000010", "04000000028", "04000000036", "04000000044")
PATH = "/ussd/africastalking"
ALL_KINDS = ("trivial", "fake-memory", "fake-sqlite", "real-memory", "real-sqlite", "real-redis")
DEFAULT_KINDS = ("trivial", "fake-memory", "real-memory", "real-sqlite")
TARGET = {"hops_per_s": 15000, "p99_ms": 10.0}


def _journey(meter: str) -> list[str]:
    return ["", "1", meter, "500", "2"]  # dial, Buy, meter, amount, Cancel (END)


# --- server side -----------------------------------------------------------------------------


def _trivial_app() -> web.Application:
    async def trivial(request: web.Request) -> web.Response:
        await request.post()
        return web.Response(text="END ok", content_type="text/plain")

    app = web.Application()
    app.router.add_post(PATH, trivial)
    return app


def _fake_app(store_kind: str, data_dir: Path) -> web.Application:
    services = FakeCustomerServices()
    services.add_meter(FAKE_METER)
    store: SessionStore
    if store_kind == "sqlite":
        sqlite_store = SqliteSessionStore.open(data_dir / "sessions.db")
        store = sqlite_store
    else:
        store = MemorySessionStore()
    engine = UssdEngine(services, store, build_screens())
    app = web.Application()
    app.add_routes(ussd_routes(engine, FollowUps()))
    return app


def _real_config(store_kind: str, data_dir: Path, port: int) -> Config:
    return Config(data_dir=data_dir, session_store=store_kind, port=port)


async def _prepare_real(data_dir: Path, store_kind: str) -> None:
    """Migrate and seed the ledger once, so that workers do not race to do it."""
    from gateway.app import build_app  # noqa: PLC0415
    from gateway.logging import configure_logging  # noqa: PLC0415

    configure_logging(json=True, level="warning", stream=_devnull())
    app = await build_app(_real_config(store_kind, data_dir, 0))
    runner = web.AppRunner(app)
    await runner.setup()
    await runner.cleanup()


async def _serve_async(kind: str, port: int, data_dir: Path) -> None:
    family, _, store_kind = kind.partition("-")
    if family == "real":
        from gateway.app import build_app  # noqa: PLC0415
        from gateway.logging import configure_logging  # noqa: PLC0415

        # As ``gateway serve`` does (info level: per-hop debug lines cost a no-op call); the
        # lines themselves are not the figures.
        configure_logging(json=True, level="info", stream=_devnull())
        app = await build_app(_real_config(store_kind, data_dir, port))
    elif family == "fake":
        app = _fake_app(store_kind, data_dir)
    else:
        app = _trivial_app()
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    if family == "real":
        from gateway.app import freeze_startup_heap  # noqa: PLC0415

        freeze_startup_heap()  # as ``gateway serve`` does
    try:
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
        await asyncio.Event().wait()  # until SIGTERM raises GracefulExit
    finally:
        await runner.cleanup()


def _devnull() -> TextIO:
    return open(os.devnull, "w", encoding="utf-8")  # noqa: PTH123 - for the process's life


def _serve(kind: str, port: int, data_dir: str, use_uvloop: bool) -> None:
    import logging  # noqa: PLC0415 - only in the worker process

    from aiohttp.web_runner import GracefulExit  # noqa: PLC0415

    logging.disable(logging.WARNING)
    runner: Callable[..., Any] = asyncio.run
    if use_uvloop:
        import uvloop  # noqa: PLC0415 - optional, measured on request

        runner = uvloop.run
    with contextlib.suppress(GracefulExit, KeyboardInterrupt):
        runner(_serve_async(kind, port, Path(data_dir)))


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far (Linux ``/proc``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_listening(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


# --- load generator --------------------------------------------------------------------------


def _request(session_id: str, phone: str, text: str) -> bytes:
    body = urlencode(
        {
            "sessionId": session_id,
            "serviceCode": "*384*123#",
            "phoneNumber": phone,
            "networkCode": "63902",
            "text": text,
        }
    ).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class _Customers(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection playing customers one after another.

    Callback-driven: the response's last byte arriving writes the next request from
    ``data_received`` itself (no task, no future, no wake-up per hop), so that the load
    generator costs as little CPU per hop as it can and the number of hops in flight stays
    exactly one per connection.

    A hop is an error when the status is not 200 or, when ``meters`` is not empty (a USSD
    server, not the trivial one), when the reply is not ``CON`` before the last step and
    ``END`` on it.
    """

    def __init__(
        self,
        index: int,
        meters: tuple[str, ...],
        window: tuple[float, float],
        latencies: list[int],
        done: asyncio.Future[None],
    ) -> None:
        self.index = index
        self.meters = meters
        self.record_from_ns = int(window[0] * 1e9)
        self.stop_at_ns = int(window[1] * 1e9)
        self.latencies = latencies
        self.done = done
        self.phone = f"+2547110{index:05d}"
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.sessions = self.errors = self.hops = 0
        self.session_id = ""
        self.journey: list[str] = []
        self.step = 0
        self.started_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._next_session()
        self._send()

    def _next_session(self) -> None:
        self.sessions += 1
        self.session_id = f"ATUid_{os.getpid():x}_{self.index:06x}_{self.sessions:08x}"
        meters = self.meters
        self.journey = _journey(
            meters[(self.index + self.sessions) % len(meters)] if meters else ""
        )
        self.step = 0

    def _send(self) -> None:
        assert self.transport is not None  # noqa: S101 - connected before use
        raw = _request(self.session_id, self.phone, "*".join(self.journey[1 : self.step + 1]))
        self.started_ns = time.perf_counter_ns()
        self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end]).lower()
        start = head.find(b"content-length:")
        length = int(head[start + 15 : head.find(b"\r\n", start)].strip()) if start >= 0 else 0
        total = end + 4 + length
        if len(buffer) < total:
            return
        finished_ns = time.perf_counter_ns()
        response = bytes(buffer[:total])
        del buffer[:total]
        self.hops += 1
        last = self.step == len(self.journey) - 1
        if not response.startswith(b"HTTP/1.1 200") or (
            self.meters and (b"\r\n\r\nEND " if last else b"\r\n\r\nCON ") not in response
        ):
            self.errors += 1
        if self.started_ns >= self.record_from_ns and finished_ns <= self.stop_at_ns:
            self.latencies.append(finished_ns - self.started_ns)
        if finished_ns >= self.stop_at_ns:
            assert self.transport is not None  # noqa: S101
            self.transport.close()
            return
        if last:
            self._next_session()
        else:
            self.step += 1
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        if not self.done.done():
            self.done.set_result(None)


async def _verify_journey(port: int, meter: str) -> list[str]:
    """Play one whole journey and return the replies; raise unless each is what it should be."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[str] = []
    try:
        journey = _journey(meter)
        for step in range(len(journey)):
            writer.write(_request("ATUid_verify", "+254711099999", "*".join(journey[1 : step + 1])))
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = (await reader.readexactly(length)).decode()
            replies.append(body)
            want = "END " if step == len(journey) - 1 else "CON "
            if not head.startswith(b"HTTP/1.1 200") or not body.startswith(want):
                raise RuntimeError(f"journey step {step}: expected {want!r}, got {body!r}")
    finally:
        writer.close()
    return replies


async def _drive(
    port: int, in_flight: int, meters: tuple[str, ...], warmup_s: float, duration_s: float
) -> dict[str, Any]:
    if meters:
        await _verify_journey(port, meters[0])
    loop = asyncio.get_running_loop()
    latencies: list[int] = []
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + duration_s)
    customers: list[_Customers] = []
    for i in range(in_flight):
        done: asyncio.Future[None] = loop.create_future()
        _, protocol = await loop.create_connection(
            lambda i=i, done=done: _Customers(i, meters, window, latencies, done),  # type: ignore[misc]
            "127.0.0.1",
            port,
        )
        customers.append(protocol)
    # Every connection closes itself once the window is over; a stuck one fails the run.
    await asyncio.wait_for(asyncio.gather(*(c.done for c in customers)), warmup_s + duration_s + 30)
    latencies.sort()
    count = len(latencies)
    return {
        "hops_per_s": round(count / duration_s),
        "p50_ms": round(latencies[count // 2] / 1e6, 2) if count else None,
        "p99_ms": round(latencies[min(count - 1, int(count * 0.99))] / 1e6, 2) if count else None,
        "hops": count,
        "errors": sum(c.errors for c in customers),
        "all_hops": sum(c.hops for c in customers),  # warm-up included, for CPU per hop
    }


def _drive_in_process(args: tuple[int, int, tuple[str, ...], float, float]) -> dict[str, Any]:
    cpu_before = time.process_time()
    result = asyncio.run(_drive(*args))
    result["client_cpu_s"] = time.process_time() - cpu_before
    return result


# --- orchestration ---------------------------------------------------------------------------


def _run_config(
    kind: str, workers: int, in_flight: int, args: argparse.Namespace, data_dir: Path
) -> dict[str, Any]:
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    servers = [
        ctx.Process(target=_serve, args=(kind, port, str(data_dir), args.uvloop))
        for _ in range(workers)
    ]
    meters: tuple[str, ...] = ()  # the trivial server: any 200 will do
    if kind.startswith("real"):
        meters = DEMO_METERS
    elif kind.startswith("fake"):
        meters = (FAKE_METER,)
    for server in servers:
        server.start()
    try:
        _wait_listening(port)
        time.sleep(0.5 + 0.7 * workers)  # every worker bound and warm
        cpu_before = sum(_cpu_seconds(server.pid) for server in servers)
        wall_before = time.perf_counter()
        with ctx.Pool(1) as pool:
            result = pool.apply(
                _drive_in_process, ((port, in_flight, meters, args.warmup, args.duration),)
            )
        wall_s = time.perf_counter() - wall_before
        cpu_used = sum(_cpu_seconds(server.pid) for server in servers) - cpu_before
        died = [server.exitcode for server in servers if not server.is_alive()]
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.join(15)
    hops = result.pop("all_hops")
    client_cpu = result.pop("client_cpu_s")
    cores = os.cpu_count() or 1
    # CPU per hop is the capacity figure that sharing the machine (the load generator, other
    # processes) distorts least; the capacity assumes every core given to the server.
    server_us = cpu_used / hops * 1e6 if hops else 0.0
    result["server_cpu_us_per_hop"] = round(server_us, 1)
    result["client_cpu_us_per_hop"] = round(client_cpu / hops * 1e6, 1) if hops else None
    result["client_share_of_cores"] = round(client_cpu / (wall_s * cores), 2)
    result["capacity_all_cores_hops_per_s"] = round(cores * 1e6 / server_us) if server_us else None
    result["workers_died"] = len(died)
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return {"kind": kind, "workers": workers, "in_flight": in_flight, **result}


def _prepare(kind: str, base: Path) -> Path:
    data_dir = base / kind
    data_dir.mkdir(parents=True, exist_ok=True)
    if kind.startswith("real"):
        asyncio.run(_prepare_real(data_dir, kind.partition("-")[2]))
    return data_dir


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['kind']:<12} {row['workers']:>2} {row['in_flight']:>4} {row['hops_per_s']:>7} "
        f"{row['p50_ms']!s:>7} {row['p99_ms']!s:>7} {row['errors']:>5} "
        f"{row['server_cpu_us_per_hop']:>8} {row['client_cpu_us_per_hop']!s:>8} "
        f"{row['client_share_of_cores']:>6} {row['capacity_all_cores_hops_per_s']!s:>8} "
        f"{row['load_avg_1m']:>5}"
        + (f"  {row['workers_died']} WORKER(S) DIED" if row["workers_died"] else ""),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the matrix and print figures; the last line is JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    parser.add_argument("--quick", action="store_true", help="64 in flight only")
    parser.add_argument(
        "--kinds", default=",".join(DEFAULT_KINDS), help=f"comma-separated, of {ALL_KINDS}"
    )
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--in-flight", default="16,64,256", help="sessions in flight")
    parser.add_argument("--uvloop", action="store_true", help="run the servers on uvloop")
    args = parser.parse_args(argv)
    kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}")
    levels = [64] if args.quick else [int(n) for n in args.in_flight.split(",")]
    worker_counts = [int(n) for n in args.workers.split(",")]
    loop_name = "uvloop" if args.uvloop else "asyncio"
    print(
        f"cpus={os.cpu_count()} python={sys.version.split()[0]} loop={loop_name} "
        f"duration={args.duration}s warmup={args.warmup}s "
        f"load_avg={' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{'server':<12} {'wk':>2} {'infl':>4} {'hops/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errs':>5} {'srv us':>8} {'cli us':>8} {'cli sh':>6} {'cap/s':>8} {'load':>5}"
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            for workers in worker_counts:
                if kind.endswith("memory") and workers > 1:
                    continue  # in-memory sessions cannot be shared between processes
                for in_flight in levels:
                    data_dir = _prepare(kind, Path(tmp) / f"{workers}-{in_flight}")
                    row = _run_config(kind, workers, in_flight, args, data_dir)
                    rows.append(row)
                    _print_row(row)
    baseline = {(r["workers"], r["in_flight"]): r for r in rows if r["kind"] == "trivial"}
    for row in rows:
        base = baseline.get((row["workers"], row["in_flight"]))
        row["vs_trivial"] = round(row["hops_per_s"] / base["hops_per_s"], 2) if base else None
    print(
        "srv us: server CPU per hop (all worker processes); cli us: load generator CPU per hop; "
        "cli sh: the load generator's share of all cores; cap/s: hops/s the server would do "
        "with every core (cores / srv us); load: the 1-minute load average after the run (the "
        "machine is shared: above ~2.5, other work competed for the cores)."
    )
    for kind in kinds:
        costs = [r["server_cpu_us_per_hop"] for r in rows if r["kind"] == kind]
        shares = [r["client_share_of_cores"] for r in rows if r["kind"] == kind]
        if costs and all(costs):
            median_us = statistics.median(costs)
            print(
                f"{kind}: median server CPU {median_us} us/hop -> about "
                f"{round((os.cpu_count() or 1) * 1e6 / median_us)} hops/s with every core for "
                f"the server; the load generator took {statistics.median(shares):.0%} of "
                "the cores"
            )
    target = next(
        (r for r in rows if (r["kind"], r["workers"], r["in_flight"]) == ("real-sqlite", 2, 64)),
        None,
    )
    met = bool(
        target
        and target["hops_per_s"] >= TARGET["hops_per_s"]
        and target["p99_ms"] is not None
        and target["p99_ms"] <= TARGET["p99_ms"]
    )
    summary = {
        "target": {**TARGET, "at": "real-sqlite, 2 workers, 64 in flight"},
        "met": met,
        "cpus": os.cpu_count(),
        "loop": loop_name,
        "workers_share": "one port, SO_REUSEPORT",
        "runs": rows,
    }
    died = sum(r["workers_died"] for r in rows)
    summary["workers_died"] = died
    print(json.dumps(summary, separators=(",", ":")))
    if died:
        print(f"FAILED: {died} worker process(es) died during the runs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
