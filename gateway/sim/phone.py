"""A phone in the terminal: dial the USSD code, answer screens, read SMS, text the shortcode.

It plays the handset and Africa's Talking at once against a running gateway: USSD hops go
straight to the gateway's AT route through :class:`gateway.sim.africastalking.AtSimulator`
(cumulative ``text``, AT session ids, AT's timeouts, the end-of-session event); the SMS inbox
is read from the AT simulator the gateway sends through (``GET …/sim/inbox``), and texts to the
shortcode go through that simulator (``POST …/sim/sms``), which forwards them as AT would.

```
gateway phone --gateway http://127.0.0.1:8080 --number +254711000001
phone> dial                  # *384*123# by default; "dial *384*123*1#" pre-fills answers
phone> 1                     # while a session is open, anything typed is an answer
phone> inbox                 # SMS received (token messages)
phone> sms BUY 37012345676 500
phone> hangup | quit
```
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from gateway.sim.africastalking import AtSimulator, UssdSessionClosedError, UssdSimSession

ReadLine = Callable[[str], Awaitable[str | None]]
"""Prompt → the typed line, or None at end of input."""
Write = Callable[[str], None]

HELP = """\
dial [CODE]     dial the USSD code (default {code}); extra *segments pre-fill answers
<answer>        while a USSD session is open: what you type on the keypad
hangup          cancel the USSD session
inbox           SMS this phone received
sms TEXT        text the shortcode (e.g. sms BUY 37012345676 500)
help, quit"""


@dataclass(frozen=True, slots=True, kw_only=True)
class PhoneSettings:
    """Where the phone talks to, and who it is.

    The gateway, the AT simulator the gateway sends SMS through, the phone's number.
    """

    gateway_url: str = "http://127.0.0.1:8080"
    sim_url: str | None = None  # default: <gateway_url>/sim/africastalking
    number: str = "+254711000001"
    service_code: str = "*384*123#"
    network_code: str = "63902"
    app_timeout_s: float = 10.0
    user_timeout_s: float = 600.0  # people at a terminal read slower than AT allows
    admin_token: str | None = None  # for a gateway on another host: its simulator asks for it

    @property
    def at_sim_url(self) -> str:
        """Base URL of the AT simulator (inbox and SMS to the shortcode)."""
        return (self.sim_url or self.gateway_url.rstrip("/") + "/sim/africastalking").rstrip("/")


class TerminalPhone:
    """The interactive phone; :meth:`run` reads commands until ``quit`` or end of input."""

    def __init__(self, settings: PhoneSettings, read_line: ReadLine, write: Write) -> None:
        base = settings.gateway_url.rstrip("/")
        self._settings = settings
        self._read = read_line
        self._write = write
        self._driver = AtSimulator(
            ussd_url=f"{base}/ussd/africastalking",
            ussd_events_url=f"{base}/ussd/africastalking/events",
            network_code=settings.network_code,
            app_timeout_s=settings.app_timeout_s,
            user_timeout_s=settings.user_timeout_s,
        )
        self._session: UssdSimSession | None = None
        self._http: aiohttp.ClientSession | None = None

    async def run(self) -> int:
        """The read-eval loop; returns an exit status (0, or 1 if the gateway was unreachable)."""
        self._write(HELP.format(code=self._settings.service_code))
        status = 0
        try:
            while True:
                open_session = self._session is not None and self._session.is_open
                line = await self._read("answer> " if open_session else "phone> ")
                if line is None:
                    break
                if not await self._command(line.strip()):
                    break
        except aiohttp.ClientError as exc:
            self._write(f"cannot reach the gateway or simulator: {exc}")
            status = 1
        finally:
            await self._close()
        return status

    async def _command(self, line: str) -> bool:  # noqa: PLR0911 - one branch per command
        word, _, rest = line.partition(" ")
        session = self._session
        if word in {"quit", "exit"}:
            return False
        if word == "help":
            self._write(HELP.format(code=self._settings.service_code))
            return True
        if word == "dial":
            await self._dial(rest.strip() or self._settings.service_code)
            return True
        if word == "hangup" and session is not None and session.is_open:
            await session.hang_up()
            self._write("(session cancelled)")
            return True
        if word == "inbox":
            await self._inbox()
            return True
        if word == "sms" and rest.strip():
            await self._sms(rest.strip())
            return True
        if session is not None and session.is_open:
            await self._answer(session, line)
            return True
        self._write("no USSD session: type 'dial' (or 'help')")
        return True

    async def _dial(self, code: str) -> None:
        session, screen = await self._driver.dial(self._settings.number, code)
        self._session = session
        self._show(screen.text, ended=screen.ended)

    async def _answer(self, session: UssdSimSession, answer: str) -> None:
        try:
            screen = await session.answer(answer)
        except UssdSessionClosedError as exc:
            self._write(f"(session over: {exc})")
            return
        self._show(screen.text, ended=screen.ended)

    def _show(self, text: str, *, ended: bool) -> None:
        width = max((len(line) for line in text.splitlines()), default=0)
        rule = "-" * max(20, width)
        self._write(f"{rule}\n{text}\n{rule}" + ("\n(session ended)" if ended else ""))

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            token = self._settings.admin_token
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=10),
                headers={"Authorization": f"Bearer {token}"} if token else None,
            )
        return self._http

    async def _inbox(self) -> None:
        url = f"{self._settings.at_sim_url}/sim/inbox"
        async with self._client().get(url, params={"phone": self._settings.number}) as response:
            response.raise_for_status()
            messages = await response.json()
        if not messages:
            self._write("(no messages)")
        for index, message in enumerate(messages, 1):
            self._write(
                f"[{index}] from {message['from']} at {message['sentAt']}:\n{message['text']}"
            )

    async def _sms(self, text: str) -> None:
        url = f"{self._settings.at_sim_url}/sim/sms"
        form = {"from": self._settings.number, "text": text}
        async with self._client().post(url, data=form) as response:
            response.raise_for_status()
            answer = await response.json()
        self._write(f"(sent; gateway answered HTTP {answer.get('callbackStatus')})")

    async def _close(self) -> None:
        if self._session is not None and self._session.is_open:
            await self._session.hang_up()
        await self._driver.close()
        if self._http is not None:
            await self._http.close()


async def stdin_line(prompt: str) -> str | None:
    """Read one line from the terminal without blocking the event loop; None at EOF."""
    try:
        return await asyncio.to_thread(input, prompt)
    except EOFError:
        return None
