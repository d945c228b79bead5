"""USSD throughput and latency through the real route, engine and session store.

For each server kind (a trivial handler as the baseline; the real USSD route with the SQLite
session store; with the in-memory store), each worker count (1, 2 processes sharing the port
with SO_REUSEPORT) and each number of sessions in flight (16, 64, 256), a load generator in its
own process drives Africa's Talking-shaped form POSTs over keep-alive connections: every
connection plays customers one after another (dial → 1 → meter → amount → cancel: five hops,
cumulative ``text``), one request outstanding per connection. It prints hops/s and p50/p99 hop
latency (client-side, request written → response read), then one JSON line.

The load generator is a raw asyncio protocol (no HTTP client library) so that as much CPU as
possible is left to the server; on a 2-core machine it still takes a share, which the figures
include. So each run also reports the server processes' CPU time per hop (``/proc``), a figure
that contention does not distort, and what it implies for two cores given wholly to the
server. Run: ``python bench/ussd.py [--duration 3] [--quick]``.
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
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from flows.engine import UssdEngine
from flows.journeys import build_screens
from flows.sessions import MemorySessionStore, SqliteSessionStore
from flows.testing import FakeCustomerServices, make_meter_number
from gateway.web.ussd import FollowUps, ussd_routes

METER = make_meter_number("3701234567")
JOURNEY = ["", "1", METER, "500", "2"]  # dial, Buy, meter, amount, Cancel (END)
PATH = "/ussd/africastalking"


# --- server side -----------------------------------------------------------------------------


def _build(kind: str, store_path: str) -> web.Application:
    app = web.Application()
    if kind == "trivial":

        async def trivial(request: web.Request) -> web.Response:
            await request.post()
            return web.Response(text="END ok", content_type="text/plain")

        app.router.add_post(PATH, trivial)
        return app
    services = FakeCustomerServices()
    services.add_meter(METER)
    if kind == "sqlite":
        store: Any = SqliteSessionStore.open(store_path)
    else:
        store = MemorySessionStore()
    engine = UssdEngine(services, store, build_screens())
    app.add_routes(ussd_routes(engine, FollowUps()))
    return app


def _serve(kind: str, port: int, store_path: str) -> None:
    import logging  # noqa: PLC0415 - only in the worker process

    logging.disable(logging.WARNING)
    web.run_app(
        _build(kind, store_path),
        host="127.0.0.1",
        port=port,
        reuse_port=True,
        access_log=None,
        print=None,
        handle_signals=True,
    )


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_listening(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


# --- load generator --------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end]).lower()
        start = head.find(b"content-length:")
        length = int(head[start + 15 : head.find(b"\r\n", start)].strip()) if start >= 0 else 0
        total = end + 4 + length
        if len(self.buffer) >= total:
            response = bytes(self.buffer[:total])
            del self.buffer[:total]
            waiter, self.waiter = self.waiter, None
            waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    async def request(self, raw: bytes) -> bytes:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None  # noqa: S101 - connected before use
        self.transport.write(raw)
        return await self.waiter


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


async def _customer_loop(
    port: int, index: int, stop_at: float, record_from: float, latencies: list[int]
) -> tuple[int, int, int]:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Connection, "127.0.0.1", port)
    phone = f"+2547110{index:05d}"
    sessions = errors = hops = 0
    while time.perf_counter() < stop_at:
        sessions += 1
        session_id = f"ATUid_{index:08x}{sessions:024x}"
        path: list[str] = []
        for step, answer in enumerate(JOURNEY):
            if step:
                path.append(answer)
            raw = _request(session_id, phone, "*".join(path))
            started = time.perf_counter_ns()
            response = await conn.request(raw)
            finished = time.perf_counter_ns()
            hops += 1
            if not response.startswith(b"HTTP/1.1 200"):
                errors += 1
            if started / 1e9 >= record_from and finished / 1e9 <= stop_at:
                latencies.append(finished - started)
    conn.transport.close()  # type: ignore[union-attr]
    return sessions, errors, hops


async def _drive(port: int, in_flight: int, warmup_s: float, duration_s: float) -> dict[str, Any]:
    latencies: list[int] = []
    start = time.perf_counter()
    record_from = start + warmup_s
    stop_at = record_from + duration_s
    results = await asyncio.gather(
        *(_customer_loop(port, i, stop_at, record_from, latencies) for i in range(in_flight))
    )
    errors = sum(e for _, e, _ in results)
    latencies.sort()
    count = len(latencies)
    return {
        "hops_per_s": round(count / duration_s),
        "p50_ms": round(latencies[count // 2] / 1e6, 2) if count else None,
        "p99_ms": round(latencies[min(count - 1, int(count * 0.99))] / 1e6, 2) if count else None,
        "mean_ms": round(statistics.fmean(latencies) / 1e6, 2) if count else None,
        "hops": count,
        "errors": errors,
        "all_hops": sum(h for _, _, h in results),  # warm-up included, for CPU per hop
    }


def _drive_in_process(args: tuple[int, int, float, float]) -> dict[str, Any]:
    return asyncio.run(_drive(*args))


# --- orchestration ---------------------------------------------------------------------------


def _run_config(
    kind: str, workers: int, in_flight: int, warmup_s: float, duration_s: float, store_dir: Path
) -> dict[str, Any]:
    port = _free_port()
    store_path = str(store_dir / f"sessions-{kind}-{workers}-{in_flight}.db")
    ctx = multiprocessing.get_context("spawn")
    servers = [ctx.Process(target=_serve, args=(kind, port, store_path)) for _ in range(workers)]
    for server in servers:
        server.start()
    try:
        _wait_listening(port)
        time.sleep(0.3 * workers)  # every worker bound (SO_REUSEPORT spreads connections)
        cpu_before = sum(_cpu_seconds(server.pid) for server in servers)
        with ctx.Pool(1) as pool:
            result = pool.apply(_drive_in_process, ((port, in_flight, warmup_s, duration_s),))
        cpu_used = sum(_cpu_seconds(server.pid) for server in servers) - cpu_before
        hops = result.pop("all_hops")
        # Server CPU per hop: the capacity figure that contention on a shared machine
        # (the load generator, other processes) does not distort.
        result["server_cpu_us_per_hop"] = round(cpu_used / hops * 1e6, 1) if hops else None
        result["hops_per_server_cpu_s"] = round(hops / cpu_used) if cpu_used else None
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.join(10)
    return {"kind": kind, "workers": workers, "in_flight": in_flight, **result}


def main(argv: list[str] | None = None) -> int:
    """Run the matrix and print figures; the last line is JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    parser.add_argument("--quick", action="store_true", help="64 in flight only")
    args = parser.parse_args(argv)
    levels = [64] if args.quick else [16, 64, 256]
    kinds = ["trivial", "sqlite", "memory"]
    rows: list[dict[str, Any]] = []
    print(f"cpus={os.cpu_count()} python={sys.version.split()[0]} duration={args.duration}s")
    print(
        f"{'server':<8} {'workers':>7} {'in flight':>9} {'hops/s':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'errors':>6} {'srv us/hop':>10} {'hops/cpu-s':>10}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            for workers in (1, 2):
                if kind == "memory" and workers == 2:
                    continue  # in-memory sessions cannot be shared between processes
                for in_flight in levels:
                    row = _run_config(
                        kind, workers, in_flight, args.warmup, args.duration, Path(tmp)
                    )
                    rows.append(row)
                    print(
                        f"{kind:<8} {workers:>7} {in_flight:>9} {row['hops_per_s']:>8} "
                        f"{row['p50_ms']:>7} {row['p99_ms']:>7} {row['errors']:>6} "
                        f"{row['server_cpu_us_per_hop']:>10} {row['hops_per_server_cpu_s']:>10}",
                        flush=True,
                    )
    baseline = {
        (r["workers"], r["in_flight"]): r["hops_per_s"] for r in rows if r["kind"] == "trivial"
    }
    for row in rows:
        base = baseline.get((row["workers"], row["in_flight"]))
        row["vs_trivial"] = round(row["hops_per_s"] / base, 2) if base else None
    target = next(
        (r for r in rows if (r["kind"], r["workers"], r["in_flight"]) == ("sqlite", 2, 64)), None
    )
    for kind in kinds:
        costs = [r["server_cpu_us_per_hop"] for r in rows if r["kind"] == kind]
        if all(costs):
            median_us = statistics.median(costs)
            print(
                f"{kind}: median server CPU {median_us} us/hop -> at most "
                f"{round(2e6 / median_us)} hops/s on 2 cores given wholly to the server"
            )
    summary = {
        "target": {"hops_per_s": 15000, "p99_ms": 10, "at": "sqlite, 2 workers, 64 in flight"},
        "met": bool(target and target["hops_per_s"] >= 15000 and target["p99_ms"] <= 10),
        "cpus": os.cpu_count(),
        "runs": rows,
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
