"""Helpers for the saga tests: the fake provider, meters with valid DRNs, the world."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.ledger import Ledger, MeterNumber, MeterRecord
from gateway.money import Money
from gateway.payments import (
    CallbackAck,
    CollectionRequest,
    CollectionStarted,
    ForgedCallback,
    PaymentDeclined,
    PaymentNotice,
    PaymentState,
    PaymentStatus,
    ProviderReference,
    ProviderUnavailable,
)
from gateway.phone import Msisdn
from gateway.sms import SentMessage
from gateway.sts import LocalTokenEngine, MeterProfile, VendingKey
from gateway.sts.pan import luhn_check_digit
from gateway.tariff import Tariff
from gateway.vending import SagaPolicy, Vending
from tests.support.clock import UtcClock

FakeClock = UtcClock  # the suite's one fake clock (tests/support/clock.py)

PHONE = Msisdn("+254712345678")
AMOUNT_FOR_TESTS = Money(11600, "KES")  # KES 116 at KES 25/kWh + 16 % VAT: 40 units
VENDING_KEY = VendingKey(
    sgc="123457", krn=1, dkga=4, base_date=2014, key=bytes.fromhex("0abc" * 10)
)
TARIFF = Tariff(
    tariff_id="domestic",
    name="Domestic",
    currency="KES",
    price_per_kwh_minor=2500,
    vat_basis_points=1600,
    min_purchase_minor=1000,
    max_purchase_minor=3_500_000,
)


def make_drn(number: int) -> str:
    """A valid 11-digit DRN (Luhn check digit) from a serial number."""
    body = f"{number:010d}"
    return body + luhn_check_digit(body)


def meter_record(drn: str, **changes: object) -> MeterRecord:
    """A meter on the domestic tariff keyed by ``VENDING_KEY``."""
    fields: dict[str, object] = {
        "drn": MeterNumber(drn),
        "customer_name": "Wanjiru Kamau",
        "area": "Kibera",
        "sgc": VENDING_KEY.sgc,
        "tariff_index": "01",
        "krn": VENDING_KEY.krn,
        "dkga": VENDING_KEY.dkga,
        "base_date": VENDING_KEY.base_date,
        "tariff_id": TARIFF.tariff_id,
    }
    fields.update(changes)
    return MeterRecord(**fields)  # type: ignore[arg-type]


def profile_of(meter: MeterRecord) -> MeterProfile:
    """The token engine's view of a registered meter."""
    return MeterProfile(
        drn=meter.drn,
        sgc=meter.sgc,
        tariff_index=meter.tariff_index,
        krn=meter.krn,
        dkga=meter.dkga,
        base_date=meter.base_date,
    )


@dataclass
class Settlement:
    """What the fake provider says about one reference."""

    state: PaymentState
    amount: Money | None
    payer: Msisdn | None
    receipt: str | None


class FakeProvider:
    """An in-memory payment provider: the test decides what each reference's status is."""

    idempotent_requests = False  # the saga guards unknown outcomes (as for STK)

    def __init__(self, name: str = "fakepay") -> None:
        self.name = name
        self.requests: list[CollectionRequest] = []
        self.settlements: dict[str, Settlement] = {}
        self.unavailable_requests = 0
        self.unavailable_queries = 0
        self.decline_requests = False
        self.queries = 0

    @staticmethod
    def reference_for(purchase_id: str) -> ProviderReference:
        """The reference this provider gives a purchase's collection."""
        return ProviderReference(f"REF-{purchase_id}")

    async def request_collection(self, request: CollectionRequest) -> CollectionStarted:
        """Accept the request (or fail as configured); the reference derives from the id."""
        if self.unavailable_requests:
            self.unavailable_requests -= 1
            raise ProviderUnavailable("fake outage", provider=self.name)
        if self.decline_requests:
            raise PaymentDeclined("fake decline", provider=self.name)
        self.requests.append(request)
        return CollectionStarted(
            provider=self.name, reference=self.reference_for(request.purchase_id)
        )

    def settle(
        self,
        reference: str,
        state: PaymentState = PaymentState.SUCCEEDED,
        *,
        amount: Money | None = None,
        payer: Msisdn | None = PHONE,
        receipt: str | None = None,
    ) -> None:
        """Decide what the provider answers for ``reference`` from now on."""
        self.settlements[reference] = Settlement(
            state, amount, payer, receipt or f"RCPT{secrets.token_hex(3).upper()}"
        )

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> PaymentNotice:  # noqa: ARG002
        """A customer's payment claim in this fake's own JSON (``customer_claim``'s body).

        Raises:
            ForgedCallback: anything else.
        """
        try:
            claim = json.loads(body)
            return PaymentNotice(
                provider=self.name,
                reference=ProviderReference(str(claim["TransID"])),
                claimed_state=PaymentState.SUCCEEDED,
                amount=Money(int(claim["amount_minor"]), str(claim["currency"])),
                payer=Msisdn(str(claim["payer"])),
                receipt=str(claim["TransID"]),
                account_reference=str(claim["account"]),
                is_customer_initiated=True,
                raw=body,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ForgedCallback(f"not a fake claim: {exc!r}", provider=self.name) from exc

    def customer_claim(self, trans_id: str, *, amount: Money, account: str) -> PaymentNotice:
        """A C2B confirmation claim for ``trans_id``, its body readable by ``parse_callback``."""
        body = {
            "TransID": trans_id,
            "amount_minor": amount.amount_minor,
            "currency": amount.currency,
            "payer": PHONE,
            "account": account,
        }
        return self.parse_callback(json.dumps(body).encode(), {})

    async def query_status(self, reference: ProviderReference) -> PaymentStatus:
        """The settlement decided by the test, PENDING when none."""
        self.queries += 1
        if self.unavailable_queries:
            self.unavailable_queries -= 1
            raise ProviderUnavailable("fake outage", provider=self.name, reference=reference)
        found = self.settlements.get(reference)
        if found is None:
            return PaymentStatus(
                provider=self.name, reference=reference, state=PaymentState.PENDING
            )
        return PaymentStatus(
            provider=self.name,
            reference=reference,
            state=found.state,
            amount=found.amount,
            payer=found.payer,
            receipt=found.receipt,
        )

    async def verify_receipt(self, receipt: str) -> PaymentStatus:
        """The provider's record of a receipt: the settlement naming it, else FAILED."""
        for reference, found in self.settlements.items():
            if receipt in {found.receipt, reference} and found.state is PaymentState.SUCCEEDED:
                return await self.query_status(ProviderReference(reference))
        return PaymentStatus(
            provider=self.name,
            reference=ProviderReference(receipt),
            state=PaymentState.FAILED,
            reason="no such receipt",
        )

    def acknowledgement(self) -> CallbackAck:
        """An empty 200."""
        return CallbackAck()

    def notice(
        self, reference: str, state: PaymentState = PaymentState.SUCCEEDED, raw: bytes = b"{}"
    ) -> PaymentNotice:
        """A callback claim about ``reference``."""
        return PaymentNotice(
            provider=self.name, reference=ProviderReference(reference), claimed_state=state, raw=raw
        )


@dataclass
class World:
    """Everything a saga test touches."""

    ledger: Ledger
    vending: Vending
    provider: FakeProvider
    clock: FakeClock
    engine: LocalTokenEngine
    drns: list[str]


async def seed(ledger: Ledger, drns: list[str]) -> None:
    """Register the tariff and the meters."""
    await ledger.put_tariff(TARIFF)
    for drn in drns:
        await ledger.put_meter(meter_record(drn))


def build_vending(ledger: Ledger, provider: FakeProvider, clock: FakeClock) -> Vending:
    """The saga over ``ledger`` with the real local engine."""
    return Vending(
        ledger=ledger,
        engine=LocalTokenEngine([VENDING_KEY]),
        providers={provider.name: provider},
        default_provider=provider.name,
        clock=clock,
        policy=SagaPolicy(payment_expiry_s=600),
    )


class FakeSender:
    """An in-memory SMS sender: the test queues the outcome of each next send."""

    def __init__(self) -> None:
        self.sent: list[tuple[Msisdn, str]] = []
        self.failures: list[Exception] = []
        self._counter = 0

    async def send(self, to: Msisdn, text: str) -> SentMessage:
        """Raise the next queued failure, else accept the message."""
        if self.failures:
            raise self.failures.pop(0)
        self._counter += 1
        self.sent.append((to, text))
        return SentMessage(provider_message_id=f"ATXid_{self._counter}", cost="KES 0.8000")
