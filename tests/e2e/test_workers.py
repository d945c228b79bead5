"""``gateway serve --workers 2`` on PostgreSQL and Redis: one port, two workers, one killed.

Production configuration (PostgreSQL, Redis sessions, MTN MoMo and Africa's Talking simulated on
loopback, out of the gateway). Both workers answer on the one port (``X-Gateway-Worker`` tells
which); a worker killed with SIGKILL while purchases are under way is replaced by the parent,
the other goes on serving, and every purchase whose money was taken is vended exactly once with
exactly one token SMS.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import signal
import socket
import sys
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest

from gateway.sim.africastalking import AtSimulator
from gateway.sim.momo import MomoSimulator
from tests.e2e.test_multi_instance import (
    TOKEN_TEXT,
    URL,
    load_harness,
    production_env,
    require_redis,
    seed_production_ledger,
    serve_on_loopback,
)

pytestmark = pytest.mark.postgres

WORKERS_LINE = re.compile(r"workers:\s+(\d+) processes .* pids ([\d ]+)")


def free_port() -> int:
    """A loopback port nobody listens on (yet)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def serve_workers(
    stack: contextlib.AsyncExitStack, env: dict[str, str], data_dir: Path, port: int, workers: int
) -> tuple[asyncio.subprocess.Process, list[int]]:
    """``gateway serve --workers N``; the parent process and the pids its banner names."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway", "serve", "--port", str(port)),
        *("--data-dir", str(data_dir), "--workers", str(workers)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )

    async def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(40):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    stack.push_async_callback(stop)
    assert process.stdout is not None
    seen: list[str] = []
    pids: list[int] = []
    async with asyncio.timeout(60):
        while line := (await process.stdout.readline()).decode():
            seen.append(line)
            if found := WORKERS_LINE.search(line):
                pids = [int(pid) for pid in found.group(2).split()]
                assert int(found.group(1)) == len(pids) == workers
            if line.strip().startswith("routes:"):
                assert pids, "".join(seen)
                return process, pids
    raise AssertionError("gateway serve --workers did not start:\n" + "".join(seen))


async def answering_workers(base: str, tries: int = 60) -> Counter[int]:
    """Which worker answered each of ``tries`` fresh connections to ``/healthz``."""
    seen: Counter[int] = Counter()
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection (source port) each
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(tries):
            async with http.get(base + "/healthz") as response:
                assert response.status == 200
                body = await response.json()
                assert response.headers["X-Gateway-Worker"] == str(body["worker"])
                seen[body["worker"]] += 1
    return seen


async def buy(http: aiohttp.ClientSession, base: str, phone: str, meter: str) -> str:
    """One USSD purchase; a hop refused by a dying worker is sent again (the network would)."""
    session_id = f"ATUid_{uuid.uuid4().hex}"
    inputs: list[str] = []
    reply = ""
    for answer in (None, "1", meter, "250", "1"):
        if answer is not None:
            inputs.append(answer)
        form = {
            "sessionId": session_id,
            "serviceCode": "*384*123#",
            "phoneNumber": phone,
            "networkCode": "63902",
            "text": "*".join(inputs),
        }
        for attempt in range(5):
            try:
                async with http.post(base + "/ussd/africastalking", data=form) as response:
                    if response.status >= 500:
                        raise aiohttp.ClientResponseError(
                            response.request_info, (), status=response.status
                        )
                    reply = await response.text()
                    break
            except aiohttp.ClientError:
                if attempt == 4:
                    return "FAILED"
                await asyncio.sleep(0.2)
    return reply


async def ledger_view(schema: str) -> tuple[Counter[str], dict[str, str], Counter[str]]:
    """Vends per purchase, each purchase's provider reference, token SMS rows per purchase."""
    conn = await asyncpg.connect(URL, server_settings={"search_path": schema})
    try:
        vends = Counter(r["purchase_id"] for r in await conn.fetch("SELECT purchase_id FROM vends"))
        references = {
            r["provider_reference"]: r["purchase_id"]
            for r in await conn.fetch(
                "SELECT purchase_id, provider_reference FROM purchases"
                " WHERE provider_reference IS NOT NULL"
            )
        }
        texts = Counter(
            r["purchase_id"]
            for r in await conn.fetch("SELECT purchase_id FROM outbox WHERE kind = 'token'")
        )
    finally:
        await conn.close()
    return vends, references, texts


async def replaced(base: str, victim: int) -> set[int]:
    """The workers answering once the parent replaced ``victim``: two again, without it."""
    async with asyncio.timeout(60):
        while True:
            now = set(await answering_workers(base, tries=30))
            if victim not in now and len(now) == 2:
                return now
            await asyncio.sleep(0.5)


async def settled(
    schema: str, momo: MomoSimulator, at: AtSimulator
) -> tuple[set[str | None], Counter[str], Counter[str], Counter[str]]:
    """Once every charged purchase is vended and texted: charged purchases, vends, SMS rows, SMS.

    Charged: the purchases whose money MoMo took; vends and SMS rows per purchase; token SMS
    per phone as Africa's Talking accepted them.
    """
    async with asyncio.timeout(90):
        while True:
            # Every request MoMo took is answered first: a purchase whose hop was retried after
            # the kill may still be charged (0.2 s after its request) after the others settled.
            if any(r.status == "PENDING" for r in momo.requests.values()):
                await asyncio.sleep(0.5)
                continue
            vends, references, texts = await ledger_view(schema)
            charged = {references.get(c.reference) for c in momo.money.charges}
            texted = Counter(sms.to for sms in at.sent if TOKEN_TEXT.search(sms.text))
            if charged and charged <= set(vends) and len(texted) >= len(charged):
                return charged, vends, texts, texted
            await asyncio.sleep(0.5)


@pytest.mark.slow
@pytest.mark.redis
async def test_two_workers_share_one_port_and_survive_a_kill(schema: str, tmp_path: Path) -> None:
    """Both workers answer on one port; SIGKILL one mid-purchases: restarted, exactly once holds."""
    await require_redis()
    harness = load_harness()
    master_key = os.urandom(32)
    meters = [harness.make_drn(8200 + i) for i in range(3)]
    await seed_production_ledger(schema, harness, meters, master_key)
    momo = MomoSimulator(currency="KES", answer_delay_s=0.2)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    purchases = 40
    phones = [f"+2547{23000000 + i:08d}" for i in range(purchases)]
    async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
        at = AtSimulator(delivery_url=base + "/sms/africastalking/delivery")
        stack.push_async_callback(at.close)
        momo_url = await serve_on_loopback(stack, momo.app)
        at_url = await serve_on_loopback(stack, at.app)
        env = production_env(schema, master_key, base, momo, momo_url, at, at_url)
        parent, pids = await serve_workers(stack, env, tmp_path / "data", port, workers=2)

        seen = await answering_workers(base)
        assert set(seen) == set(pids)  # the kernel spread the connections over both workers

        victim = random.Random(3).choice(pids)
        gate = asyncio.Semaphore(8)
        started = 0

        async def one(index: int) -> str:
            nonlocal started
            async with gate:
                started += 1
                if started == purchases // 2:
                    os.kill(victim, signal.SIGKILL)  # mid-stream: hops in flight on it fail
                return await buy(http, base, phones[index], meters[index % len(meters)])

        replies = await asyncio.gather(*(one(i) for i in range(purchases)))
        assert replies.count("FAILED") <= purchases // 4, replies

        now = await replaced(base, victim)
        assert parent.returncode is None
        assert now & set(pids)  # the survivor kept serving
        charged, vends, texts, texted = await settled(schema, momo, at)

        parent.send_signal(signal.SIGTERM)  # the parent stops its workers and exits cleanly
        async with asyncio.timeout(40):
            assert await parent.wait() == 0
    assert None not in charged  # every charge belongs to a purchase
    assert len(momo.money.charges) == len(charged)  # one charge per purchase
    assert set(vends) == charged  # nothing vended without its money, nothing paid left unvended
    assert set(vends.values()) == {1}
    assert set(texts.values()) == {1}
    assert set(texts) == charged
    assert set(texted.values()) == {1}  # one token SMS per phone reached the provider
    assert len(charged) >= purchases // 2


async def test_a_worker_that_cannot_listen_fails_the_start_clearly(
    schema: str, tmp_path: Path
) -> None:
    """The port is taken (without SO_REUSEPORT): the parent stops the others and exits 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {
        "GATEWAY_MODE": "production",
        "GATEWAY_DATABASE_URL": f"{URL}?search_path={schema}",
        "GATEWAY_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        "GATEWAY_ADMIN_TOKEN": "admin-" + uuid.uuid4().hex,
        "GATEWAY_CALLBACK_SECRET": "cb-" + uuid.uuid4().hex,
        "GATEWAY_PAYMENTS": "momo",
        "GATEWAY_MOMO_BASE_URL": "http://127.0.0.1:9",
        "GATEWAY_MOMO_USERNAME": "user",
        "GATEWAY_MOMO_KEY": "key",
        "GATEWAY_MOMO_SUBSCRIPTION_KEY": "sub",
        "GATEWAY_SMS": "africastalking",
        "GATEWAY_AFRICASTALKING_BASE_URL": "http://127.0.0.1:9/version1",
        "GATEWAY_AFRICASTALKING_USERNAME": "sandbox",
        "GATEWAY_AFRICASTALKING_KEY": "at-key",
        "GATEWAY_LOG_JSON": "false",
    }
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "serve", "--port", str(port), "--workers", "2"),
            *("--data-dir", str(tmp_path / "data")),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        async with asyncio.timeout(90):
            out, err = await process.communicate()
    assert process.returncode == 1
    assert "routes:" not in out.decode()  # no banner: it never listened
    assert f"cannot listen on 127.0.0.1:{port}" in err.decode()
