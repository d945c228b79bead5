import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.phone import Msisdn
from gateway.sim.africastalking import AtSimulator, DeliveryPlan
from gateway.sms.africastalking import (
    AfricasTalkingHttpSender,
    AfricasTalkingSdkSender,
    MalformedDeliveryReport,
    interpret_send_response,
    parse_delivery_report,
)
from gateway.sms.base import DeliveryState, SmsRejected, SmsSender, SmsUnavailable

TO = Msisdn("+254711000001")
KEY = "test-key"


async def _instant(_: float) -> None:
    return None


@pytest.fixture
async def sim() -> AsyncIterator[tuple[AtSimulator, str]]:
    """The AT simulator on loopback and its SMS API base URL."""
    simulator = AtSimulator(api_key=KEY, sleep=_instant)
    simulator.delivery_plan = DeliveryPlan(never=True)
    async with simulator.running() as base_url:
        yield simulator, base_url + "/version1"


@pytest.fixture(params=["sdk", "http"])
async def sender(
    request: pytest.FixtureRequest, sim: tuple[AtSimulator, str]
) -> AsyncIterator[SmsSender]:
    """Each adapter, pointed at the simulator."""
    _, url = sim
    if request.param == "sdk":
        yield AfricasTalkingSdkSender("sandbox", KEY, base_url=url, timeout_s=5)
    else:
        http = AfricasTalkingHttpSender.create("sandbox", KEY, base_url=url, timeout_s=5)
        yield http
        await http.close()


async def test_the_real_sdk_sends_to_the_simulator(sim: tuple[AtSimulator, str]) -> None:
    """The official SDK, pointed at the simulator, delivers one SMS and gets its message id."""
    simulator, url = sim
    sender = AfricasTalkingSdkSender("sandbox", KEY, base_url=url, sender_id="POWER")
    sent = await sender.send(TO, "Token 1234 5678 9012 3456 7890")
    (sms,) = simulator.inbox(TO)
    assert sent.provider_message_id == sms.message_id
    assert sent.provider_message_id.startswith("ATXid_")
    assert sent.state is DeliveryState.SENT
    assert sent.cost == "KES 0.8000"
    assert sms.sender == "POWER"
    assert simulator.send_requests[0]["bulkSMSMode"] == "1"


async def test_both_adapters_send_the_same_form(
    sender: SmsSender, sim: tuple[AtSimulator, str]
) -> None:
    """Each adapter posts username, to and message as AT documents them."""
    simulator, _ = sim
    await sender.send(TO, "hello")
    form = simulator.send_requests[-1]
    assert (form["username"], form["to"], form["message"]) == ("sandbox", TO, "hello")


@pytest.mark.parametrize("code", [500, 501, 405])
async def test_provider_trouble_is_retryable(
    sender: SmsSender, sim: tuple[AtSimulator, str], code: int
) -> None:
    """AT's 500/501 and 405 InsufficientBalance become a retryable SmsUnavailable."""
    simulator, _ = sim
    simulator.recipient_status[TO] = code
    with pytest.raises(SmsUnavailable) as caught:
        await sender.send(TO, "x")
    assert caught.value.retryable
    assert simulator.inbox(TO) == []


@pytest.mark.parametrize("code", [403, 406, 409, 502])
async def test_a_refused_message_is_final(
    sender: SmsSender, sim: tuple[AtSimulator, str], code: int
) -> None:
    """Invalid number, blacklist, DND and gateway rejection are not retryable."""
    simulator, _ = sim
    simulator.recipient_status[TO] = code
    with pytest.raises(SmsRejected) as caught:
        await sender.send(TO, "x")
    assert not caught.value.retryable


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_http_failures_are_retryable(
    sender: SmsSender, sim: tuple[AtSimulator, str], status: int
) -> None:
    """A non-2xx answer (AT down, throttling) is retryable, whichever adapter."""
    simulator, _ = sim
    simulator.http_failures.append(status)
    with pytest.raises(SmsUnavailable) as caught:
        await sender.send(TO, "x")
    assert caught.value.retryable


async def test_a_wrong_api_key_is_retryable_not_lost(sim: tuple[AtSimulator, str]) -> None:
    """Credentials refused (401) is an operator's fix away: the token SMS must wait, not drop."""
    _, url = sim
    sender = AfricasTalkingHttpSender.create("sandbox", "wrong", base_url=url)
    with pytest.raises(SmsUnavailable) as caught:
        await sender.send(TO, "x")
    await sender.close()
    assert caught.value.retryable


async def test_an_unreachable_provider_is_retryable() -> None:
    """Connection refused becomes SmsUnavailable for both adapters."""
    url = "http://127.0.0.1:9/version1"
    http = AfricasTalkingHttpSender.create("sandbox", KEY, base_url=url, timeout_s=2)
    for sender in (AfricasTalkingSdkSender("sandbox", KEY, base_url=url, timeout_s=2), http):
        with pytest.raises(SmsUnavailable):
            await sender.send(TO, "x")
    await http.close()


async def test_a_slow_provider_times_out_as_retryable(sim: tuple[AtSimulator, str]) -> None:
    """A send that outlives the adapter's timeout is abandoned as SmsUnavailable."""
    simulator, url = sim
    never = asyncio.Event()

    async def stall(_: float) -> None:
        await never.wait()

    simulator.sleep = stall
    simulator.send_delay_s = 1.0
    sender = AfricasTalkingHttpSender.create("sandbox", KEY, base_url=url, timeout_s=0.2)
    with pytest.raises(SmsUnavailable):
        await sender.send(TO, "x")
    await sender.close()
    never.set()


def test_an_empty_recipient_list_is_a_rejection() -> None:
    """AT's answer with no recipients (e.g. InvalidSenderId) is final."""
    body = {"SMSMessageData": {"Message": "InvalidSenderId", "Recipients": []}}
    with pytest.raises(SmsRejected):
        interpret_send_response(body, TO)


@given(
    st.recursive(
        st.none() | st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)
    )
)
def test_any_send_response_gives_a_result_or_our_error(body: Any) -> None:
    """Whatever AT answers, interpretation yields SentMessage or an SmsError, nothing else."""
    with contextlib.suppress(SmsRejected, SmsUnavailable):
        interpret_send_response(body, TO)


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("Sent", DeliveryState.SENT),
        ("Submitted", DeliveryState.SENT),
        ("Buffered", DeliveryState.SENT),
        ("Success", DeliveryState.DELIVERED),
        ("Failed", DeliveryState.FAILED),
        ("AbsentSubscriber", DeliveryState.FAILED),
        ("Expired", DeliveryState.FAILED),
        ("Rejected", DeliveryState.REJECTED),
    ],
)
def test_delivery_report_statuses_map_to_our_states(status: str, state: DeliveryState) -> None:
    """Each AT delivery status maps to the DeliveryState the ledger understands."""
    report = parse_delivery_report(
        {"id": "ATXid_1", "status": status, "phoneNumber": TO, "failureReason": ""}, raw=b"r"
    )
    assert report.provider_message_id == "ATXid_1"
    assert report.state is state
    assert report.failure_reason is None
    assert report.raw == b"r"


def test_a_failed_report_keeps_its_reason() -> None:
    """``failureReason`` travels with a failed delivery."""
    report = parse_delivery_report(
        {"id": "ATXid_2", "status": "Failed", "failureReason": "UserInBlackList"}
    )
    assert report.failure_reason == "UserInBlackList"


@given(st.dictionaries(st.sampled_from(["id", "status", "failureReason", "x"]), st.text()))
def test_any_delivery_form_parses_or_is_malformed(form: dict[str, str]) -> None:
    """Any form gives a DeliveryReport or MalformedDeliveryReport, never another error."""
    try:
        report = parse_delivery_report(form)
    except MalformedDeliveryReport as exc:
        field = exc.field
        assert field in {"id", "status"}
    else:
        assert report.provider_message_id == form["id"]
