"""The adversarial scenario set of ``bench/load.py --attacks``: forged callbacks against a gateway.

The attacker knows the callback secret (it leaked) and sees every reference the gateway hands a
provider (it reads the gateway's database, the worst case of watching the traffic); it has a
phone of its own for each attack (``+25479…``, never a load customer's). Each round tries, while
the load and its kills go on:

- ``receipt_replay``: an M-Pesa receipt already vended (an STK one, or a C2B ``TransID``) posted
  again as a C2B confirmation for another meter, paid "by" the attacker;
- ``forged_c2b_status_race``: a C2B confirmation with a made-up ``TransID``, and forged
  Transaction Status ``Result`` posts for it sent at the same moment, racing the real result;
- ``forged_failure``: the attacker buys and pays for real, and forged "cancelled" STK callbacks
  for that purchase race the real success;
- ``forged_success``: the attacker buys, never pays (its prompt is ignored), and posts an STK
  success with a made-up receipt;
- ``contradicting``: the attacker buys and pays; successes with made-up receipts and other
  amounts and failures are posted for that one reference, with unknown references in big bodies.

Whether an attack worked is read, after the drain, from what the outside world saw (the Daraja
simulator's money, the AT simulator's SMS): a token the attacker should not have, or a paid
purchase without its one token. MoMo and Airtel are not attacked: the load runs ``payments =
daraja`` only, so their callback routes are not mounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

CASES: Final = (
    "receipt_replay",
    "forged_c2b_status_race",
    "forged_failure",
    "forged_success",
    "contradicting",
)
SERVICE_CODE: Final = "*384*123#"
_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
BIG_BODY_BYTES: Final = 256 * 1024
_TOKEN: Final = re.compile(r"(?<!\d)\d{4}-\d{4}-\d{4}-\d{4}-\d{4}(?!\d)")


@dataclass(slots=True, kw_only=True)
class Tried:
    """One attack that was carried out, and what would show that it worked."""

    case: str
    phone: str  # the attacker's phone, digits without "+"
    meter: str = ""
    amount: int = 0  # KES
    receipt: str = ""  # a receipt the attack names (replayed or made up)
    reference: str = ""  # the purchase's provider reference (STK CheckoutRequestID)
    victim: str = ""  # whose payment a replayed receipt is (digits): they must keep their token


@dataclass(slots=True)
class AttackLog:
    """The attacks carried out, and the forged posts and their HTTP answers."""

    tried: list[Tried] = field(default_factory=list)
    posts: Counter[str] = field(default_factory=Counter)


def _now_stamp() -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() + 3 * 3600))


def stk_callback(
    checkout: str, code: int, *, amount: int = 0, receipt: str = "", phone: str = "", pad: int = 0
) -> bytes:
    """An STK callback as Daraja posts it (``CallbackMetadata`` for a success)."""
    stk: dict[str, Any] = {
        "MerchantRequestID": f"{random.randint(10**4, 10**5)}-{random.randint(10**6, 10**7)}-1",
        "CheckoutRequestID": checkout,
        "ResultCode": code,
        "ResultDesc": ("Request cancelled by user" if code else "Processed") + " " * pad,
    }
    if code == 0:
        stk["CallbackMetadata"] = {
            "Item": [
                {"Name": "Amount", "Value": float(amount)},
                {"Name": "MpesaReceiptNumber", "Value": receipt},
                {"Name": "TransactionDate", "Value": int(_now_stamp())},
                {"Name": "PhoneNumber", "Value": int(phone)},
            ]
        }
    return json.dumps({"Body": {"stkCallback": stk}}).encode()


def c2b_confirmation(
    trans_id: str, *, amount: int, meter: str, phone: str, shortcode: str, pad: int = 0
) -> bytes:
    """A C2B confirmation as Daraja posts it."""
    return json.dumps(
        {
            "TransactionType": "Pay Bill",
            "TransID": trans_id,
            "TransTime": _now_stamp(),
            "TransAmount": str(amount),
            "BusinessShortCode": shortcode,
            "BillRefNumber": meter + " " * pad,
            "InvoiceNumber": "",
            "OrgAccountBalance": "",
            "ThirdPartyTransID": "",
            "MSISDN": phone,
            "FirstName": "Mallory",
            "MiddleName": "",
            "LastName": "",
        }
    ).encode()


def status_result(trans_id: str, *, amount: int, phone: str, shortcode: str) -> bytes:
    """A Transaction Status ``Result`` saying ``trans_id`` completed (forged: made up)."""
    conversation = f"AG_{_now_stamp()[:8]}_{uuid.uuid4().hex[:16]}"
    originator = f"{random.randint(10**4, 10**5)}-{random.randint(10**6, 10**7)}-1"
    stamp = int(_now_stamp())
    parameters = [
        {"Key": "DebitPartyName", "Value": f"{phone} - Mallory"},
        {"Key": "CreditPartyName", "Value": f"{shortcode} - Sim Utility"},
        {"Key": "OriginatorConversationID", "Value": originator},
        {"Key": "InitiatedTime", "Value": stamp},
        {"Key": "ReasonType", "Value": "Pay Bill Online"},
        {"Key": "TransactionStatus", "Value": "Completed"},
        {"Key": "FinalisedTime", "Value": stamp},
        {"Key": "Amount", "Value": float(amount)},
        {"Key": "ConversationID", "Value": conversation},
        {"Key": "ReceiptNo", "Value": trans_id},
    ]
    result = {
        "ConversationID": conversation,
        "OriginatorConversationID": originator,
        "ResultType": 0,
        "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "TransactionID": trans_id,
        "ResultParameters": {"ResultParameter": parameters},
    }
    return json.dumps({"Result": result}).encode()


class Attacker:
    """Carries out ``rounds`` rounds of every case against a running gateway.

    Args:
        session: the harness's HTTP session.
        gateway_url: where ``gateway serve`` listens (it is killed and restarted meanwhile).
        sims: ``gateway sim``'s JSON line (URLs and credentials).
        secret: the callback secret the attacker knows.
        reader: reads the gateway's database (``bench/load.py``'s ``LedgerReader``): the
            references it handed the provider.
        drns: the meters (an attack buys for, or redirects to, one of them).
        seed: the attacker's randomness.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        gateway_url: str,
        sims: Mapping[str, Any],
        secret: str,
        reader: Any,  # noqa: ANN401 - bench/load.py's LedgerReader (bench is no package)
        drns: Sequence[str],
        seed: int,
    ) -> None:
        self.session = session
        self.gateway_url = gateway_url
        self.sims = sims
        self.secret = secret
        self.reader = reader
        self.drns = drns
        self.rng = random.Random(seed)
        self.log = AttackLog()
        self._phones = iter(range(1, 10**7))
        self.shortcode = str(sims["credentials"]["daraja"]["shortcode"])

    def _phone(self) -> str:
        return f"25479{next(self._phones):07d}"

    def _made_up(self) -> str:
        return "".join(self.rng.choices(_ALPHABET, k=10))

    async def _post(self, tail: str, body: bytes, *, persist: bool = True) -> None:
        """POST a forged callback; ``persist``: again until answered (a restart may be on)."""
        url = f"{self.gateway_url}/payments/daraja/{self.secret}/{tail}"
        for _ in range(40 if persist else 1):
            try:
                async with self.session.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    await response.read()
                    self.log.posts[f"{tail} {response.status}"] += 1
                    return
            except (aiohttp.ClientError, TimeoutError):
                self.log.posts[f"{tail} unanswered"] += 1
            await asyncio.sleep(0.25)

    async def _ussd_buy(self, phone: str, meter: str, amount: int) -> bool:
        """Dial and buy by USSD (a few tries: the gateway may be being restarted)."""
        for _ in range(5):
            session_id = "ATUid_" + uuid.uuid4().hex
            answers = ["", "1", f"1*{meter}", f"1*{meter}*{amount}", f"1*{meter}*{amount}*1"]
            body = ""
            try:
                for text in answers:
                    form = {
                        "sessionId": session_id,
                        "serviceCode": SERVICE_CODE,
                        "phoneNumber": "+" + phone,
                        "networkCode": "63902",
                        "text": text,
                    }
                    async with self.session.post(
                        self.gateway_url + "/ussd/africastalking", data=form
                    ) as response:
                        body = await response.text()
            except (aiohttp.ClientError, TimeoutError):
                body = ""
            if body.startswith("END You will get a payment prompt"):
                return True
            amount += 1  # a retry is a new purchase: its own amount (see the auditor)
            await asyncio.sleep(1.0)
        return False

    async def _reference(self, phone: str, timeout_s: float = 15.0) -> tuple[str, int] | None:
        """The STK CheckoutRequestID the gateway got for the phone's purchase, and its amount."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the database may be busy: ask again
                rows = await self.reader.rows(
                    "SELECT provider_reference, amount_minor FROM purchases"
                    " WHERE phone = ? AND provider_reference IS NOT NULL",
                    "+" + phone,
                )
                if rows:
                    return str(rows[0][0]), int(rows[0][1]) // 100
            await asyncio.sleep(0.02)
        return None

    async def _set_customer(self, phone: str, action: str) -> None:
        async with self.session.post(
            self.sims["daraja"] + "/_sim/customers", json={"msisdn": phone, "action": action}
        ) as response:
            response.raise_for_status()

    # -- the cases ---------------------------------------------------------------------------

    async def receipt_replay(self) -> None:
        """A receipt already vended, posted as a C2B confirmation for another meter."""
        vended: list[dict[str, Any]] = []
        for _ in range(30):  # the first round may come before any token: wait for one
            async with self.session.get(self.sims["daraja"] + "/_sim/ledger") as response:
                charges = [c for c in await response.json() if c.get("receipt")]
            async with self.session.get(self.sims["africastalking"] + "/_sim/sms") as response:
                served = {
                    str(m.get("to") or "").removeprefix("+")
                    for m in await response.json()
                    if _TOKEN.search(str(m.get("text") or ""))  # a token, not a reply about one
                }
            # Already vended (the case): the payer's token SMS went out. Each load
            # purchase has its own phone, so the payer's phone names the purchase.
            vended = [c for c in charges if str(c.get("msisdn")).removeprefix("+") in served]
            if vended:
                break
            await asyncio.sleep(0.5)
        else:
            return
        charge = self.rng.choice(vended)
        meter = self.rng.choice([d for d in self.drns if d != charge.get("account")])
        phone = self._phone()
        amount = int(charge["amount_minor"]) // 100
        receipt = str(charge["receipt"])
        self.log.tried.append(
            Tried(
                case="receipt_replay",
                phone=phone,
                meter=meter,
                amount=amount,
                receipt=receipt,
                victim=str(charge.get("msisdn") or "").removeprefix("+"),
            )
        )
        body = c2b_confirmation(
            receipt, amount=amount, meter=meter, phone=phone, shortcode=self.shortcode
        )
        await asyncio.gather(*(self._post("c2b/confirmation", body) for _ in range(3)))

    async def forged_c2b_status_race(self) -> None:
        """A made-up C2B TransID, and forged status results for it racing the real one."""
        phone, trans_id = self._phone(), self._made_up()
        meter, amount = self.rng.choice(self.drns), self.rng.randint(50, 500)
        self.log.tried.append(
            Tried(
                case="forged_c2b_status_race",
                phone=phone,
                meter=meter,
                amount=amount,
                receipt=trans_id,
            )
        )
        confirmation = c2b_confirmation(
            trans_id, amount=amount, meter=meter, phone=phone, shortcode=self.shortcode
        )
        result = status_result(trans_id, amount=amount, phone=phone, shortcode=self.shortcode)

        async def race() -> None:
            for _ in range(150):  # ~3 s of results, one every 20 ms
                await self._post("status/result", result, persist=False)
                await asyncio.sleep(0.02)

        await asyncio.gather(self._post("c2b/confirmation", confirmation), race())

    async def forged_failure(self) -> None:
        """A real paid purchase, and forged "cancelled" callbacks racing the real success."""
        phone, meter = self._phone(), self.rng.choice(self.drns)
        buying = asyncio.create_task(self._ussd_buy(phone, meter, self.rng.randint(50, 500)))
        found = await self._reference(phone)
        if found is None:
            await buying
            return
        reference = found[0]
        self.log.tried.append(
            Tried(case="forged_failure", phone=phone, meter=meter, reference=reference)
        )
        cancelled = stk_callback(reference, 1032)
        await self._post("stk", cancelled)
        for _ in range(60):  # ~3 s more
            await self._post("stk", cancelled, persist=False)
            await asyncio.sleep(0.05)
        await buying

    async def forged_success(self) -> None:
        """A purchase never paid (the prompt is ignored), and a forged STK success for it."""
        phone, meter = self._phone(), self.rng.choice(self.drns)
        await self._set_customer(phone, "ignore")
        if not await self._ussd_buy(phone, meter, self.rng.randint(50, 500)):
            return
        found = await self._reference(phone)
        if found is None:
            return
        reference, amount = found
        self.log.tried.append(
            Tried(case="forged_success", phone=phone, meter=meter, reference=reference)
        )
        forged = stk_callback(reference, 0, amount=amount, receipt=self._made_up(), phone=phone)
        await asyncio.gather(*(self._post("stk", forged) for _ in range(3)))

    async def contradicting(self) -> None:
        """A real paid purchase; contradicting callbacks for it; unknown ones, big bodies."""
        phone, meter = self._phone(), self.rng.choice(self.drns)
        buying = asyncio.create_task(self._ussd_buy(phone, meter, self.rng.randint(50, 500)))
        found = await self._reference(phone)
        if found is None:
            await buying
            return
        reference, amount = found
        self.log.tried.append(
            Tried(case="contradicting", phone=phone, meter=meter, reference=reference)
        )
        posts = [
            stk_callback(reference, 0, amount=amount, receipt=self._made_up(), phone=phone),
            stk_callback(reference, 1032),
            stk_callback(reference, 0, amount=amount * 10, receipt=self._made_up(), phone=phone),
            stk_callback(reference, 1, pad=BIG_BODY_BYTES),
            stk_callback("ws_CO_" + uuid.uuid4().hex, 0, amount=amount, receipt="X", phone=phone),
            stk_callback("ws_CO_" + uuid.uuid4().hex, 1032, pad=BIG_BODY_BYTES),
        ]
        await asyncio.gather(*(self._post("stk", body) for body in posts))
        big = c2b_confirmation(
            self._made_up(),
            amount=amount,
            meter=meter,
            phone=phone,
            shortcode=self.shortcode,
            pad=BIG_BODY_BYTES,
        )
        await self._post("c2b/confirmation", big)
        await buying

    async def run(self, rounds: int, done: asyncio.Event) -> None:
        """``rounds`` rounds of every case, a round every few seconds while the load goes on."""
        for _ in range(rounds):
            await asyncio.gather(*(getattr(self, case)() for case in CASES))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.rng.uniform(0.5, 2.0)):
                    await done.wait()


def outcomes(
    tried: Sequence[Tried], charges: Sequence[Mapping[str, Any]], sms: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, int]]:
    """Per case: attacks tried, and those that worked, by the simulators' records alone.

    Worked: a token SMS to the attacker's phone that no money of the attacker's accounts for
    (``receipt_replay``, ``forged_c2b_status_race``, ``forged_success``), a token carrying a
    replayed or made-up receipt, or, for a purchase the attacker really paid
    (``forged_failure``, ``contradicting``), anything but exactly one token for it.
    """
    paid_by = Counter(str(c.get("msisdn") or "").removeprefix("+") for c in charges)
    tokens_to: dict[str, set[str]] = {}
    token_texts: list[str] = []
    for message in sms:
        text = str(message.get("text") or "")
        digits = "".join(ch for ch in text.split(".", maxsplit=1)[0] if ch.isdigit())
        if "token" not in text.lower() or len(digits) != 20:
            continue
        to = str(message.get("to") or "").removeprefix("+")
        tokens_to.setdefault(to, set()).add(digits)
        token_texts.append(text)

    def carried(receipt: str, meter: str = "") -> bool:
        return any(
            f"Receipt {receipt}." in text and f"Meter {meter}" in text for text in token_texts
        )

    table = {case: {"tried": 0, "succeeded": 0} for case in CASES}
    for attack in tried:
        row = table[attack.case]
        row["tried"] += 1
        got = len(tokens_to.get(attack.phone, set()))
        if attack.case in {"forged_failure", "contradicting"}:
            worked = paid_by[attack.phone] > 0 and got != paid_by[attack.phone]
        elif attack.case == "receipt_replay":  # the attacker vended, or the payer lost out
            worked = (
                got > 0 or carried(attack.receipt, attack.meter) or not tokens_to.get(attack.victim)
            )
        else:
            worked = got > paid_by[attack.phone] or (
                bool(attack.receipt) and carried(attack.receipt)
            )
        row["succeeded"] += int(worked)
    return table
