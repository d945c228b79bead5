"""Issue 17 at the level the attacks come in: real ``gateway serve`` processes over real HTTP.

Secrets never reach any output of a full run; every log line is JSON through a PostgreSQL outage;
files at rest are private; a data directory that lost its ledger refuses to start; readiness
proves a write; the demo's SMS simulator is not open to the network.
"""

import asyncio
import base64
import contextlib
import getpass
import json
import os
import re
import secrets
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp
import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import pytest

from gateway.ledger.postgres import create_schema, drop_schema
from gateway.sim.phone import PhoneSettings, TerminalPhone

PG = "postgresql://127.0.0.1:5432/test"
PHONE = "+254711000333"
METER = "04000000044"  # an EA11 demo meter
BANNER_END = "-- end of banner: JSON log lines follow on stderr --"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(settings)
    return env


@dataclass
class Served:
    """A running ``gateway serve``: its base URL, banner, and everything it wrote so far."""

    process: asyncio.subprocess.Process
    base: str
    banner: list[str] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self) -> int:
        """SIGINT, then every line both streams had to give; the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(20):
                status = await self.process.wait()
        except TimeoutError:
            self.process.kill()
            status = await self.process.wait()
        await asyncio.gather(*self.readers)
        return status


async def _pump(stream: asyncio.StreamReader | None, into: list[str]) -> None:
    assert stream is not None
    while line := await stream.readline():
        into.append(line.decode("utf-8", "replace"))


@contextlib.asynccontextmanager
async def serve(
    data_dir: Path, env: Mapping[str, str], *, host: str = "127.0.0.1"
) -> AsyncIterator[Served]:
    """``gateway serve`` on a free port until the banner ends (or the process exits)."""
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway", "serve", "--host", host, "--port", str(port)),
        *("--data-dir", str(data_dir)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
    )
    served = Served(process=process, base=f"http://127.0.0.1:{port}")
    served.readers.append(asyncio.create_task(_pump(process.stderr, served.stderr)))
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            while line := (await process.stdout.readline()).decode():
                served.banner.append(line)
                if line.strip() == BANNER_END:
                    break
        served.readers.append(asyncio.create_task(_pump(process.stdout, served.stdout)))
        yield served
    finally:
        await served.stop()


async def _ussd_purchase(http: aiohttp.ClientSession, base: str, session_id: str) -> None:
    inputs: list[str] = []
    for answer in (None, "1", METER, "250", "1"):
        if answer is not None:
            inputs.append(answer)
        form = {
            "sessionId": session_id,
            "serviceCode": "*384*123#",
            "phoneNumber": PHONE,
            "networkCode": "63902",
            "text": "*".join(inputs),
        }
        async with http.post(base + "/ussd/africastalking", data=form) as response:
            assert response.status == 200


async def _token_sms(http: aiohttp.ClientSession, at_url: str) -> list[dict[str, str]]:
    end = time.monotonic() + 20
    while time.monotonic() < end:
        async with http.get(at_url + "/sim/inbox", params={"phone": PHONE}) as response:
            inbox = [m for m in await response.json() if "token" in m["text"].lower()]
        if inbox:
            return inbox
        await asyncio.sleep(0.1)
    return []


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema, dropped afterwards."""
    name = f"harden_{secrets.token_hex(4)}"
    try:
        await create_schema(PG, name)
    except Exception as exc:  # noqa: BLE001 - no server here: nothing to test against
        pytest.skip(f"no PostgreSQL at {PG}: {exc}")
    yield name
    await drop_schema(PG, name)


# ------------------------------------------------------------------------------ 4. secrets


@pytest.mark.slow
async def test_no_configured_secret_appears_in_any_output_of_a_full_run(
    tmp_path: Path, schema: str
) -> None:
    """Banner, logs (debug level), error answers: no configured secret value anywhere."""
    password = "pw-" + secrets.token_hex(8)  # PostgreSQL trusts loopback: any password works
    admin_token = "admin-" + secrets.token_hex(12)
    configured = {
        "GATEWAY_DATABASE_URL": (
            f"postgresql://{getpass.getuser()}:{quote(password)}@127.0.0.1:5432/test"
            f"?search_path={schema}"
        ),
        "GATEWAY_ADMIN_TOKEN": admin_token,
        "GATEWAY_CALLBACK_SECRET": "cb-" + secrets.token_hex(12),
        "GATEWAY_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "GATEWAY_AFRICASTALKING_KEY": "atkey-" + secrets.token_hex(10),
        "GATEWAY_DARAJA_SECRET": "darajasecret-" + secrets.token_hex(6),
        "GATEWAY_DARAJA_PASSKEY": "passkey-" + secrets.token_hex(6),
        "GATEWAY_REDIS_URL": f"redis://:redispw{secrets.token_hex(4)}@127.0.0.1:6379/0",
    }
    env = _clean_env(GATEWAY_LOG_JSON="true", GATEWAY_LOG_LEVEL="debug", **configured)
    async with serve(tmp_path / "data", env) as served, aiohttp.ClientSession() as http:
        at_url = re.search(
            r"africastalking (http://\S+/sim/africastalking)", "".join(served.banner)
        )
        assert at_url is not None
        await _ussd_purchase(http, served.base, "ATUid_secrets")
        assert await _token_sms(http, at_url.group(1))
        for path in ("/readyz", "/metrics", "/admin", "/payments/daraja/wrong/stk"):
            async with http.get(served.base + path) as response:
                await response.read()
        async with http.post(
            served.base + "/admin/login", data={"token": "wrong", "next": "/admin"}
        ) as response:
            await response.read()
        async with http.get(
            served.base + "/admin", headers={"Authorization": f"Bearer {admin_token}x"}
        ) as response:
            await response.read()
    output = "".join(served.banner + served.stdout + served.stderr)
    assert "sts-gateway" in output
    assert ":********@127.0.0.1" in output  # the URL is shown, its password is not
    redis_password = configured["GATEWAY_REDIS_URL"].split(":")[2].split("@")[0]
    for name, value in [*configured.items(), ("redis password", redis_password)]:
        if name in {"GATEWAY_DATABASE_URL", "GATEWAY_REDIS_URL"}:
            continue  # their passwords are checked alone: the rest of a URL is not secret
        assert value not in output, f"{name} leaked"
    assert password not in output, "the database password leaked"
    assert quote(password) not in output


@pytest.mark.slow
async def test_the_demo_banner_shows_a_generated_admin_token_only(tmp_path: Path) -> None:
    """Demo without ``GATEWAY_ADMIN_TOKEN`` prints the one it made: the operator needs it."""
    async with serve(tmp_path / "data", _clean_env()) as served:
        banner = "".join(served.banner)
    token = re.search(r"/admin  token (\S+)", banner)
    assert token is not None
    assert len(token.group(1)) >= 16


# ----------------------------------------------------------------------- 11. JSON everywhere


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


class PgProxy:
    """A TCP relay to PostgreSQL that can be cut: an outage the gateway cannot tell from one."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)
        self.writers += [writer, up_writer]
        for task in (_forward(reader, up_writer), _forward(up_reader, writer)):
            running = asyncio.create_task(task)
            self.tasks.add(running)
            running.add_done_callback(self.tasks.discard)

    async def cut(self) -> None:
        """Stop listening and drop every relayed connection."""
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.slow
async def test_every_log_line_is_json_through_a_postgresql_outage(
    tmp_path: Path, schema: str
) -> None:
    """The database goes away under a running gateway: every stderr line still parses as JSON.

    The human banner stays plain text on stdout and ends with its marker line; nothing else is
    written to stdout.
    """
    proxy = PgProxy()
    await proxy.start()
    url = f"postgresql://127.0.0.1:{proxy.port}/test?search_path={schema}"
    env = _clean_env(GATEWAY_DATABASE_URL=url, GATEWAY_LOG_JSON="true")
    async with serve(tmp_path / "data", env) as served, aiohttp.ClientSession() as http:
        async with http.get(served.base + "/readyz") as response:
            assert response.status == 200
        await proxy.cut()
        end = time.monotonic() + 6
        hop = 0
        while time.monotonic() < end:
            hop += 1
            with contextlib.suppress(aiohttp.ClientError):
                await _ussd_purchase(http, served.base, f"ATUid_outage{hop}")
            async with http.get(served.base + "/readyz") as response:
                assert response.status == 503
            await asyncio.sleep(0.2)
    assert served.banner[-1].strip() == BANNER_END
    assert served.stdout == []
    assert served.stderr, "nothing logged through an outage"
    levels = set()
    for line in served.stderr:
        parsed = json.loads(line)  # raises on any plain-text line
        levels.add(parsed.get("level"))
    assert levels & {"error", "warning", "critical"}, levels


# ------------------------------------------------------------------- 12. files at rest private


@pytest.mark.slow
async def test_data_files_are_private(tmp_path: Path) -> None:
    """The data directory is 0700; the ledger, its WAL, sessions and the master key 0600."""
    data = tmp_path / "data"
    async with serve(data, _clean_env()) as served, aiohttp.ClientSession() as http:
        await _ussd_purchase(http, served.base, "ATUid_modes")
        files = sorted(p for p in data.rglob("*") if p.is_file())
        assert {p.name for p in files} >= {"gateway.db", "gateway.db-wal", "master.key"}
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert all(mode == 0o600 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}

    # Files an earlier version left readable are tightened at the next start; others left alone.
    data.chmod(0o755)
    for name in ("gateway.db", "master.key", "sessions.db"):
        (data / name).chmod(0o644)
    (data / "notes.txt").write_text("the operator's own file\n")
    (data / "notes.txt").chmod(0o644)
    async with serve(data, _clean_env()):
        pass
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("gateway.db", "master.key", "sessions.db"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((data / "notes.txt").stat().st_mode) == 0o644


# ------------------------------------------------------------- 5. readiness proves a write


async def _ready(http: aiohttp.ClientSession, base: str) -> int:
    async with http.get(base + "/readyz") as response:
        return response.status


async def _becomes(http: aiohttp.ClientSession, base: str, status: int) -> bool:
    end = time.monotonic() + 5  # the ledger's answer is cached about a second
    while time.monotonic() < end:
        if await _ready(http, base) == status:
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.mark.slow
async def test_a_deleted_ledger_is_not_ready_and_refuses_the_next_start(tmp_path: Path) -> None:
    """Delete the ledger under a running demo gateway: /readyz says 503; a restart refuses.

    Before the fix /readyz stayed 200 and the restart silently began an empty ledger with a
    new demo key.
    """
    data = tmp_path / "brand" / "new" / "data"  # a --data-dir that does not exist yet
    async with serve(data, _clean_env()) as served, aiohttp.ClientSession() as http:
        assert await _ready(http, served.base) == 200
        (data / "gateway.db").unlink()
        assert await _becomes(http, served.base, 503)
        async with http.get(served.base + "/readyz") as response:
            assert (await response.json())["checks"]["ledger"] is False
    assert any("readiness_changed" in line for line in served.stderr)
    key_before = (data / "master.key").read_bytes()

    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway", "serve", "--port", str(_free_port())),
        *("--data-dir", str(data)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_clean_env(GATEWAY_LOG_JSON="true"),
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 1
    assert out == b""
    (line,) = err.decode().splitlines()
    failure = json.loads(line)
    assert failure["event"] == "serve_failed"
    assert "gateway.db is missing" in failure["error"]
    assert "Restore the ledger from a backup" in failure["error"]
    assert not (data / "gateway.db").exists()
    assert (data / "master.key").read_bytes() == key_before


@pytest.mark.slow
async def test_a_database_that_takes_no_writes_is_not_ready(tmp_path: Path, schema: str) -> None:
    """PostgreSQL answers reads but no write gets through (every table locked against writes).

    Before the fix /readyz read a meter and said 200.
    """
    url = f"{PG}?search_path={schema}"
    env = _clean_env(GATEWAY_DATABASE_URL=url)
    async with serve(tmp_path / "data", env) as served, aiohttp.ClientSession() as http:
        assert await _ready(http, served.base) == 200
        blocker = await asyncpg.connect(PG, server_settings={"search_path": schema})
        try:
            tables = [
                row["tablename"]
                for row in await blocker.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema
                )
            ]
            async with blocker.transaction():
                await blocker.execute(f"LOCK TABLE {', '.join(tables)} IN EXCLUSIVE MODE")
                assert await _becomes(http, served.base, 503)
                async with http.get(served.base + "/readyz") as response:
                    assert (await response.json())["checks"]["ledger"] is False
        finally:
            await blocker.close()
        assert await _becomes(http, served.base, 200)


# ------------------------------------------------------- 13. the demo's SMS simulator is local


def _lan_address() -> str | None:
    """An address of this host other than loopback (None when there is none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # no packet is sent: only picks the route
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


@pytest.mark.slow
async def test_the_demo_sms_inbox_is_not_open_to_the_network(tmp_path: Path) -> None:
    """From another host the simulator's inbox (tokens in clear) needs the admin token.

    Without it: 403; with it, or from loopback, it answers; ``gateway phone --admin-token``
    still reads it. Before the fix anyone on the network read every SMS.
    """
    lan = _lan_address()
    if lan is None:
        pytest.skip("this host has no address besides loopback")
    token = "demo-admin-" + secrets.token_hex(8)
    env = _clean_env(GATEWAY_ADMIN_TOKEN=token)
    async with (
        serve(tmp_path / "data", env, host="0.0.0.0") as served,
        aiohttp.ClientSession() as http,
    ):
        port = served.base.rsplit(":", 1)[1]
        local_sim = f"{served.base}/sim/africastalking"
        remote_sim = f"http://{lan}:{port}/sim/africastalking"
        await _ussd_purchase(http, served.base, "ATUid_sim")
        assert await _token_sms(http, local_sim)  # loopback: the demo works as before
        for path in ("/sim/inbox", "/sim/sent"):
            async with http.get(remote_sim + path, params={"phone": PHONE}) as response:
                assert response.status == 403, path
                assert "admin token" in (await response.json())["error"]
        async with http.post(remote_sim + "/sim/sms", data={"from": PHONE, "text": "TOKEN"}) as r:
            assert r.status == 403
        bearer = {"Authorization": f"Bearer {token}"}
        async with http.get(
            remote_sim + "/sim/inbox", params={"phone": PHONE}, headers=bearer
        ) as response:
            assert response.status == 200
            assert any("token" in m["text"].lower() for m in await response.json())

        lines: list[str] = []
        answers = iter(["inbox", "quit"])

        async def read_line(_prompt: str) -> str | None:
            return next(answers, None)

        phone = TerminalPhone(
            PhoneSettings(gateway_url=f"http://{lan}:{port}", number=PHONE, admin_token=token),
            read_line,
            lines.append,
        )
        assert await phone.run() == 0
        assert any("token" in line.lower() for line in lines), lines
    assert any("sim_access_refused" in line for line in served.stderr)


# ----------------------------------------------------------- 9. negative amounts, every channel


@pytest.mark.slow
async def test_negative_amounts_are_refused_in_every_channel(tmp_path: Path) -> None:
    """SMS ``BUY <meter> -100``, USSD ``-100`` and a C2B validation for -100 buy nothing."""
    secret = "cb-" + secrets.token_hex(12)
    token = "admin-" + secrets.token_hex(12)
    env = _clean_env(GATEWAY_CALLBACK_SECRET=secret, GATEWAY_ADMIN_TOKEN=token)
    async with serve(tmp_path / "data", env) as served, aiohttp.ClientSession() as http:
        sim = f"{served.base}/sim/africastalking"
        async with http.post(
            sim + "/sim/sms", data={"from": PHONE, "text": f"BUY {METER} -100"}
        ) as response:
            assert response.status == 200
        replies: list[str] = []
        end = time.monotonic() + 10
        while not replies and time.monotonic() < end:
            async with http.get(sim + "/sim/inbox", params={"phone": PHONE}) as response:
                replies = [m["text"] for m in await response.json()]
            await asyncio.sleep(0.1)
        assert replies == [
            "The amount must be more than zero. Send BUY meter amount, e.g. BUY 37012345676 500."
        ]

        form = {
            "sessionId": "ATUid_negative",
            "serviceCode": "*384*123#",
            "phoneNumber": PHONE,
            "networkCode": "63902",
            "text": f"1*{METER}*-100",
        }
        async with http.post(served.base + "/ussd/africastalking", data=form) as response:
            ussd = await response.text()
        assert "100" not in ussd.replace(METER, ""), ussd

        c2b = {
            "TransactionType": "Pay Bill",
            "TransID": "NEG0000001",
            "TransTime": "20261204150000",
            "TransAmount": "-100.00",
            "BusinessShortCode": "174379",
            "BillRefNumber": METER,
            "MSISDN": "254711000333",
            "FirstName": "A",
        }
        async with http.post(
            f"{served.base}/payments/daraja/{secret}/c2b/validation", json=c2b
        ) as response:
            answer = await response.json()
        assert answer["ResultCode"] != "0", answer
        bearer = {"Authorization": f"Bearer {token}"}
        async with http.get(
            served.base + "/admin", headers=bearer, params={"q": PHONE}
        ) as response:
            page = await response.text()
        assert "No purchase matches" in page, page
