import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp

PHONE = "+254711000222"
METER = "04000000044"  # an EA11 demo meter


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _banner(process: asyncio.subprocess.Process, deadline_s: float = 30.0) -> str:
    assert process.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(deadline_s):
        while line := (await process.stdout.readline()).decode():
            lines.append(line)
            if line.strip().startswith("routes:"):
                return "".join(lines)
    raise AssertionError("no banner from gateway serve:\n" + "".join(lines))


async def _ussd_purchase(http: aiohttp.ClientSession, base: str) -> str:
    inputs: list[str] = []
    reply = ""
    for answer in (None, "1", METER, "250", "1"):
        if answer is not None:
            inputs.append(answer)
        form = {
            "sessionId": "ATUid_serve_test",
            "serviceCode": "*384*123#",
            "phoneNumber": PHONE,
            "networkCode": "63902",
            "text": "*".join(inputs),
        }
        async with http.post(base + "/ussd/africastalking", data=form) as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            reply = await response.text()
        assert reply.startswith(("CON ", "END ")), reply
    return reply


async def _token_sms(http: aiohttp.ClientSession, at_url: str) -> list[dict[str, str]]:
    end = time.monotonic() + 20
    while time.monotonic() < end:
        async with http.get(at_url + "/sim/inbox", params={"phone": PHONE}) as response:
            inbox = [m for m in await response.json() if "token" in m["text"].lower()]
        if inbox:
            return inbox
        await asyncio.sleep(0.1)
    return []


async def test_serve_with_no_configuration_sells_a_token_over_http(tmp_path: Path) -> None:
    """``gateway serve`` with nothing configured answers USSD over HTTP and texts a paid token."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway", "serve", "--port", str(port)),
        *("--data-dir", str(tmp_path)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    try:
        banner = await _banner(process)
        assert "SIMULATORS" in banner
        at_url = re.search(r"africastalking (http://127\.0\.0\.1:\d+/sim/africastalking)", banner)
        assert at_url is not None, banner
        async with aiohttp.ClientSession() as http:
            reply = await _ussd_purchase(http, f"http://127.0.0.1:{port}")
            assert reply.startswith("END "), reply
            inbox = await _token_sms(http, at_url.group(1))
        assert inbox, "no token SMS reached the Africa's Talking simulator"
        assert re.search(r"\d{4}-\d{4}-\d{4}-\d{4}-\d{4}", inbox[0]["text"])
        assert METER in inbox[0]["text"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(15):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
    assert process.returncode == 0
