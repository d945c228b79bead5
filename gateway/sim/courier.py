"""What the mobile-money simulators share: callback delivery with faults, owned tasks, money taken.

A simulator never calls our app inline: like the real providers it answers its own API first and
sends callbacks afterwards, from tasks a ``TaskKeeper`` owns. ``CallbackFaults`` are the knobs for
tests and the demo: hold callbacks until released (delay), release them in reverse (reorder), lose
the next ones, send several copies. Nothing here sleeps: time-based behaviour is driven by the
test (``release``, ``settle``) or, in the demo, by each simulator's own optional real-time delays.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Protocol

import aiohttp
import structlog
from aiohttp import web

log = structlog.get_logger()


@dataclass(slots=True, kw_only=True)
class CallbackFaults:
    """Knobs for outbound callbacks; mutate them between steps of a test or the demo."""

    hold: bool = False  # queue callbacks until ``Courier.release()``
    drop_next: int = 0  # lose the next N callbacks (never sent)
    copies: int = 1  # send each callback this many times (duplicates)


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One callback the simulator tried to deliver, and what our side answered."""

    method: str
    url: str
    body: bytes
    status: int | None  # None: no HTTP answer (connection refused, timeout)
    answer: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Charge:
    """Money the simulated provider actually took from a customer: what an auditor compares."""

    reference: str  # the provider's handle (CheckoutRequestID, TransID, X-Reference-Id, id)
    receipt: str  # the provider's transaction id shown to the customer
    msisdn: str  # the payer as the provider knows it (digits, no "+")
    amount_minor: int
    currency: str
    account: str = ""  # account reference / bill reference / external id

    def to_json(self) -> dict[str, Any]:
        """The charge as a JSON object (``GET /_sim/ledger``)."""
        return asdict(self)


class TaskKeeper:
    """Owns a simulator's background tasks: ``settle`` waits for them, ``close`` cancels them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background; its exceptions are logged, never lost silently."""
        task = asyncio.get_running_loop().create_task(self._guard(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guard(coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sim_task_failed")

    async def settle(self) -> None:
        """Wait until no background task is running (tasks may start others while we wait)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel every background task and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Courier:
    """Delivers a simulator's callbacks over HTTP, through ``faults``, recording every attempt.

    ``open()`` creates the HTTP session (call it on app startup), ``close()`` ends it.
    """

    def __init__(
        self, faults: CallbackFaults, tasks: TaskKeeper, *, provider: str, timeout_s: float = 10.0
    ) -> None:
        self.faults = faults
        self.deliveries: list[Delivery] = []
        self._tasks = tasks
        self._provider = provider
        self._timeout_s = timeout_s
        self._held: list[tuple[str, str, bytes, int]] = []
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Create the HTTP session callbacks go out on."""
        if self._session is None:
            self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def held(self) -> int:
        """How many callbacks are waiting for ``release``."""
        return len(self._held)

    def send(self, method: str, url: str, body: bytes, *, retries: int = 0) -> None:
        """Queue one callback: held, dropped, or sent ``faults.copies`` times in the background.

        ``retries``: how many more attempts a delivery gets when our side does not answer 200
        (Daraja retries C2B confirmations), one after the other.
        """
        if self.faults.drop_next > 0:
            self.faults.drop_next -= 1
            log.info("sim_callback_dropped", provider=self._provider, url=url)
            return
        for _ in range(max(1, self.faults.copies)):
            if self.faults.hold:
                self._held.append((method, url, body, retries))
            else:
                self._tasks.spawn(self._deliver(method, url, body, retries))

    async def release(self, *, reverse: bool = False) -> None:
        """Send every held callback, oldest first (or newest first: ``reverse``), and wait."""
        held, self._held = self._held, []
        for method, url, body, retries in reversed(held) if reverse else held:
            await self._deliver(method, url, body, retries)

    async def post_now(self, url: str, body: bytes, *, timeout_s: float) -> Delivery:
        """POST ``body`` and wait for the answer (Daraja C2B validation needs it synchronously)."""
        return await self._attempt("POST", url, body, timeout_s)

    async def _deliver(self, method: str, url: str, body: bytes, retries: int) -> None:
        for _ in range(1 + max(0, retries)):
            delivery = await self._attempt(method, url, body, self._timeout_s)
            if delivery.status == 200:
                return

    async def _attempt(self, method: str, url: str, body: bytes, timeout_s: float) -> Delivery:
        if self._session is None:
            await self.open()
        assert self._session is not None  # noqa: S101 - open() just created it
        status: int | None = None
        answer = b""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.request(
                    method, url, data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    status = response.status
                    answer = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.info("sim_callback_failed", provider=self._provider, url=url, error=repr(exc))
        delivery = Delivery(method=method, url=url, body=body, status=status, answer=answer)
        self.deliveries.append(delivery)
        return delivery


@dataclass(slots=True)
class MoneyRecord:
    """The simulated provider's record of money taken, in the order it was taken."""

    charges: list[Charge] = field(default_factory=list)

    def take(self, charge: Charge) -> None:
        """Record that ``charge`` left a customer's wallet."""
        self.charges.append(charge)
        log.info(
            "sim_money_taken",
            reference=charge.reference,
            amount_minor=charge.amount_minor,
            currency=charge.currency,
        )

    def to_json(self) -> list[dict[str, Any]]:
        """Every charge as JSON objects."""
        return [charge.to_json() for charge in self.charges]


def faults_to_json(faults: object) -> dict[str, Any]:
    """A faults dataclass (nested ``CallbackFaults`` included) as a JSON object."""
    value: dict[str, Any] = asdict(faults)  # type: ignore[call-overload]
    return value


def update_faults(faults: object, changes: Mapping[str, object]) -> None:
    """Set fault knobs from JSON (``POST /_sim/faults``): known names, values of their type.

    Nested objects (``{"callbacks": {"hold": true}}``) update the nested knobs; ``null`` is
    allowed for knobs that may be ``None`` (``tamper_amount_kes``).

    Raises:
        ValueError: an unknown knob, or a value of the wrong type; nothing is changed then.
    """
    pending: list[tuple[object, str, object]] = []
    _plan(faults, changes, pending)
    for target, name, value in pending:
        setattr(target, name, value)


_TYPES: dict[str, type] = {"int": int, "str": str, "bool": bool, "float": float}


def _accepts(annotation: str, value: object) -> bool:
    names = [part.strip() for part in annotation.split("|")]
    if value is None:
        return "None" in names
    kinds = [_TYPES[name] for name in names if name in _TYPES]
    return type(value) in kinds or (float in kinds and type(value) is int)


def _plan(
    target: object, changes: Mapping[str, object], pending: list[tuple[object, str, object]]
) -> None:
    known = {f.name: f for f in fields(target)}  # type: ignore[arg-type]
    for name, value in changes.items():
        if name not in known:
            raise ValueError(f"unknown fault knob {name!r}; known: {sorted(known)}")
        current = getattr(target, name)
        if is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"{name} takes an object")
            _plan(current, value, pending)
        elif _accepts(str(known[name].type), value):
            pending.append((target, name, value))
        else:
            raise ValueError(f"{name} takes {known[name].type}, got {value!r}")


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (an empty body is ``{}``).

    Raises:
        web.HTTPBadRequest: the body is not a JSON object.
    """
    raw = await request.read()
    try:
        value = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"not JSON: {exc}\n") from exc
    if not isinstance(value, dict):
        raise web.HTTPBadRequest(text="expected a JSON object\n")
    return value


class ProviderSimulator:
    """What every payment-provider simulator shares: money taken, background work, callbacks.

    Subclasses set ``money``, ``_tasks`` and ``courier`` in their constructor.
    """

    money: MoneyRecord
    courier: Courier
    _tasks: TaskKeeper

    @property
    def tasks(self) -> TaskKeeper:
        """The keeper of this simulator's background work (a replacement courier shares it)."""
        return self._tasks

    def ledger(self) -> list[Charge]:
        """Money actually taken, in order."""
        return list(self.money.charges)

    async def settle(self) -> None:
        """Wait until every customer answer and callback in flight has been delivered."""
        await self._tasks.settle()

    async def release_callbacks(self, *, reverse: bool = False) -> None:
        """Deliver held callbacks (``faults.callbacks.hold``), oldest first unless ``reverse``."""
        await self.courier.release(reverse=reverse)


class Controllable(Protocol):
    """A simulator with fault knobs and a courier (looked up per request: it may be swapped)."""

    @property
    def faults(self) -> object:
        """The simulator's faults dataclass."""
        ...

    @property
    def courier(self) -> Courier:
        """The courier delivering the simulator's callbacks."""
        ...


def add_control_routes(app: web.Application, sim: Controllable) -> None:
    """The knobs every simulator shares, for the demo and manual testing.

    ``GET /_sim/faults`` shows the knobs; ``POST /_sim/faults`` changes some (``update_faults``);
    ``POST /_sim/callbacks/release`` delivers held callbacks (``{"reverse": true}`` reorders);
    ``GET /_sim/callbacks`` lists every delivery and our answer.
    """

    async def show(_request: web.Request) -> web.Response:
        return web.json_response(faults_to_json(sim.faults))

    async def change(request: web.Request) -> web.Response:
        try:
            update_faults(sim.faults, await read_json_object(request))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from exc
        return web.json_response(faults_to_json(sim.faults))

    async def release(request: web.Request) -> web.Response:
        body = await read_json_object(request)
        held = sim.courier.held
        await sim.courier.release(reverse=body.get("reverse") is True)
        return web.json_response({"released": held})

    async def deliveries(_request: web.Request) -> web.Response:
        return web.json_response(
            [
                {"method": d.method, "url": d.url, "status": d.status, "body": d.body.decode()}
                for d in sim.courier.deliveries
            ]
        )

    app.router.add_get("/_sim/faults", show)
    app.router.add_post("/_sim/faults", change)
    app.router.add_post("/_sim/callbacks/release", release)
    app.router.add_get("/_sim/callbacks", deliveries)
