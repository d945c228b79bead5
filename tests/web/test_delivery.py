from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.phone import Msisdn
from gateway.sim.africastalking import AtSimulator, DeliveryPlan
from gateway.sms.africastalking import AfricasTalkingHttpSender, parse_delivery_report
from gateway.sms.base import DeliveryReport, DeliveryState
from gateway.web.delivery import delivery_routes

PHONE = Msisdn("+254711000001")
AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


class Recorder:
    """Stands in for the ledger's apply_delivery_report."""

    def __init__(self) -> None:
        self.reports: list[DeliveryReport] = []
        self.fail_with: GatewayError | None = None

    async def __call__(self, report: DeliveryReport) -> None:
        """Record, or fail as configured."""
        if self.fail_with is not None:
            raise self.fail_with
        self.reports.append(report)


@pytest.fixture
async def setup(
    aiohttp_client: AiohttpClient,
) -> AsyncIterator[tuple[Recorder, TestClient[web.Request, web.Application], AtSimulator, str]]:
    """The delivery route, and the AT simulator reporting to it."""
    recorder = Recorder()
    app = web.Application()
    app.add_routes(delivery_routes(recorder, parse=parse_delivery_report))
    client = await aiohttp_client(app)

    async def instant(_: float) -> None:
        return None

    sim = AtSimulator(
        api_key="k",
        delivery_url=str(client.make_url("/sms/africastalking/delivery")),
        sleep=instant,
    )
    async with sim.running() as base:
        yield recorder, client, sim, base + "/version1"


async def test_a_delivery_report_marks_the_message_delivered(
    setup: tuple[Recorder, TestClient[web.Request, web.Application], AtSimulator, str],
) -> None:
    """A sent SMS is followed by Sent then Success, which reach the ledger in order."""
    recorder, _, sim, url = setup
    sender = AfricasTalkingHttpSender.create("sandbox", "k", base_url=url)
    sent = await sender.send(PHONE, "Token 1111 2222 3333 4444 5555")
    await sender.close()
    await sim.drain()
    assert [(r.provider_message_id, r.state) for r in recorder.reports] == [
        (sent.provider_message_id, DeliveryState.SENT),
        (sent.provider_message_id, DeliveryState.DELIVERED),
    ]


async def test_duplicated_and_reordered_reports_all_reach_the_ledger(
    setup: tuple[Recorder, TestClient[web.Request, web.Application], AtSimulator, str],
) -> None:
    """Duplicates and out-of-order reports are passed on; the ledger decides (idempotently)."""
    recorder, _, sim, url = setup
    sim.delivery_plan = DeliveryPlan(
        statuses=("Sent", "Failed"),
        duplicate=True,
        out_of_order=True,
        failure_reason="AbsentSubscriber",
    )
    sender = AfricasTalkingHttpSender.create("sandbox", "k", base_url=url)
    await sender.send(PHONE, "x")
    await sender.close()
    await sim.drain()
    assert [r.state for r in recorder.reports] == [
        DeliveryState.FAILED,
        DeliveryState.FAILED,
        DeliveryState.SENT,
        DeliveryState.SENT,
    ]
    assert recorder.reports[0].failure_reason == "AbsentSubscriber"


async def test_a_malformed_report_is_a_400(
    setup: tuple[Recorder, TestClient[web.Request, web.Application], AtSimulator, str],
) -> None:
    """A report without an id or with an unknown status is refused and not applied."""
    recorder, client, _, _ = setup
    response = await client.post("/sms/africastalking/delivery", data={"status": "Success"})
    assert response.status == 400
    response = await client.post("/sms/africastalking/delivery", data={"id": "x", "status": "Meh"})
    assert response.status == 400
    assert recorder.reports == []


async def test_a_retryable_ledger_error_asks_at_to_retry(
    setup: tuple[Recorder, TestClient[web.Request, web.Application], AtSimulator, str],
) -> None:
    """When the ledger is unavailable the route answers 503 so the report comes again."""
    recorder, client, _, _ = setup
    recorder.fail_with = GatewayError("locked", retryable=True)
    form = {"id": "ATXid_1", "status": "Success"}
    response = await client.post("/sms/africastalking/delivery", data=form)
    assert response.status == 503
    recorder.fail_with = GatewayError("unknown message")
    response = await client.post("/sms/africastalking/delivery", data=form)
    assert response.status == 200


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(["id", "status", "phoneNumber", "networkCode", "failureReason"]),
        st.text(max_size=100) | st.sampled_from(["Success", "Failed", "Sent"]),
    )
)
async def test_any_report_form_gets_no_5xx(
    setup: tuple[Recorder, TestClient[web.Request, web.Application], AtSimulator, str],
    fields: dict[str, str],
) -> None:
    """Whatever is posted, the route answers 200 or 400, never a 5xx."""
    _, client, _, _ = setup
    response = await client.post("/sms/africastalking/delivery", data=fields)
    assert response.status in {200, 400}
