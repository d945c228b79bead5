"""An auditor that trusts nothing of the gateway: money taken vs tokens delivered vs the meters.

It reads only what the outside world saw:

- the payment simulators' records of money actually taken (``GET /_sim/ledger`` on Daraja, MoMo
  and Airtel: reference, receipt, payer, amount, account);
- the Africa's Talking simulator's record of every SMS it accepted (``GET /_sim/sms`` from
  ``gateway sim``: recipient, text, the delivery reports posted);
- the meters' keys (the harness generated the vending key and the meter list and imported them
  into the gateway; the auditor gets the same files), so that every delivered token is keyed
  into a meter emulator (``gateway.sts.MeterEmulator``, the STS engine's own oracle).

It never imports ``gateway.ledger``, ``gateway.vending`` or ``gateway.app``, and never reads the
gateway's database: a token counts only if an SMS carried it.

How a token is tied to money: by the receipt printed in the SMS when it is the provider's receipt
(C2B: the M-Pesa transaction id); otherwise by who paid, for which meter and how much (an STK
prompt's SMS prints our purchase id, which the provider never saw). The harness gives every
purchase its own phone, so that the second rule is exact.

The counts (any non-zero one fails the run):

- ``double_vends``: tokens beyond the first for one payment;
- ``paid_without_token``: money taken and no SMS ever carried a token for it. Those of them that
  are a payer charged again for the same meter and amount whose other charge did get its token
  are also counted as ``charged_twice`` (the harness gives every purchase attempt its own amount,
  so a repeat there means one purchase was charged twice, not a lost purchase);
- ``token_without_payment``: a token no payment accounts for (or for another meter or amount);
- ``undelivered_tokens``: a token for a payment that never reached the payer's phone with a
  final ``Success`` delivery report;
- ``meter_rejected``: tokens the meter emulator refuses (wrong key, CRC, TID used or old, unknown
  meter), and ``wrong_credit``: accepted tokens whose credit is not the kWh the SMS promised.

Also reported, not failing: ``duplicate_token_sms``, the SMS beyond the first that carried a token
already carried (a send repeated after a crash: harmless to the meter, which refuses a used TID,
but the customer sees the token twice), and ``duplicate_gap_max_s``, the longest time between a
token's first and last SMS (AT simulator clock).

Usage: ``python bench/audit.py --sims SIMS.json --meters METERS.csv --key KEY.json [--json]``
(``SIMS.json``: the JSON line ``gateway sim`` printed; ``KEY.json``: ``{"sgc", "krn", "dkga",
"base_date", "key_hex"}``). Exit status 1 when any count is non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

from gateway.sts import MeterEmulator, MeterProfile, VendingKey

PAYMENT_SIMULATORS: Final = ("daraja", "momo", "airtel")
_TOKEN: Final = re.compile(r"(?<!\d)(\d{4})-(\d{4})-(\d{4})-(\d{4})-(\d{4})(?!\d)")
_METER: Final = re.compile(r"(?:Meter|Mtr|Mita|Compteur|Cpt)\s+(\d{11,13})")
_RECEIPT: Final = re.compile(r"(?:Receipt|Rcpt|Risiti|Recu)\s+([A-Za-z0-9]+)")
_AMOUNT: Final = re.compile(r"\b([A-Z]{3})\s?([\d,]+)\.(\d{2})\b")
_KWH: Final = re.compile(r"(\d+)\.(\d)\s?kWh|kWh\s(\d+)\.(\d)")
FAILING_COUNTS: Final = (
    "double_vends",
    "paid_without_token",
    "token_without_payment",
    "undelivered_tokens",
    "meter_rejected",
    "wrong_credit",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Charge:
    """Money a provider took: what the payment simulators recorded."""

    provider: str
    reference: str
    receipt: str
    msisdn: str  # digits, no "+"
    amount_minor: int
    currency: str
    account: str


@dataclass(slots=True, kw_only=True)
class TokenSeen:
    """One distinct token and every SMS that carried it."""

    digits: str
    meter: str
    amount_minor: int | None
    currency: str | None
    tenths_kwh: int | None
    receipt: str | None
    recipients: set[str] = field(default_factory=set)
    delivered_to: set[str] = field(default_factory=set)  # phones with a final Success report
    first_seen: float = float("inf")
    last_seen: float = 0.0
    sms_count: int = 0


@dataclass(slots=True)
class AuditReport:
    """What the auditor found. ``ok`` only when every failing count is zero."""

    charges: int = 0
    money_taken_minor: int = 0
    token_sms: int = 0
    distinct_tokens: int = 0
    meters_keyed: int = 0
    double_vends: int = 0
    paid_without_token: int = 0
    charged_twice: int = 0  # of paid_without_token: a second charge for one purchase
    token_without_payment: int = 0
    undelivered_tokens: int = 0
    meter_rejected: int = 0
    wrong_credit: int = 0
    duplicate_token_sms: int = 0  # SMS beyond the first carrying one token (not failing)
    duplicate_gap_max_s: float = 0.0
    paid_without_token_refs: list[str] = field(default_factory=list)  # their references
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every failing count is zero."""
        return all(getattr(self, name) == 0 for name in FAILING_COUNTS)

    def note(self, count: str, example: str) -> None:
        """Add one to ``count`` and keep up to ten examples of it."""
        setattr(self, count, getattr(self, count) + 1)
        examples = self.examples.setdefault(count, [])
        if len(examples) < 10:
            examples.append(example)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON object (``ok`` included)."""
        return {**asdict(self), "ok": self.ok}

    def lines(self) -> list[str]:
        """Readable lines, one per count, failing ones marked."""
        out = [
            f"charges (money taken)   {self.charges}  ({self.money_taken_minor / 100:.2f})",
            f"token SMS accepted      {self.token_sms}  ({self.distinct_tokens} distinct tokens)",
            f"meters keyed            {self.meters_keyed}",
        ]
        for name in FAILING_COUNTS:
            value = getattr(self, name)
            mark = "" if value == 0 else "   <-- FAIL"
            out.append(f"{name:<23} {value}{mark}")
            out.extend(f"    e.g. {example}" for example in self.examples.get(name, [])[:3])
            if name == "paid_without_token" and self.charged_twice:
                out.append(f"    of which charged twice for one purchase: {self.charged_twice}")
        out.append(
            f"duplicate token SMS     {self.duplicate_token_sms}"
            f"  (longest gap {self.duplicate_gap_max_s} s; not failing)"
        )
        out.extend(
            f"    e.g. {example}" for example in self.examples.get("duplicate_token_sms", [])[:3]
        )
        out.append("AUDIT OK" if self.ok else "AUDIT FAILED")
        return out


# --- reading the outside world's records -------------------------------------------------------


def parse_charges(provider: str, rows: Iterable[Mapping[str, Any]]) -> list[Charge]:
    """A payment simulator's ``/_sim/ledger`` rows as ``Charge`` values."""
    return [
        Charge(
            provider=provider,
            reference=str(row["reference"]),
            receipt=str(row.get("receipt") or ""),
            msisdn=str(row.get("msisdn") or "").removeprefix("+"),
            amount_minor=int(row["amount_minor"]),
            currency=str(row.get("currency") or ""),
            account=str(row.get("account") or ""),
        )
        for row in rows
    ]


def parse_tokens(messages: Iterable[Mapping[str, Any]]) -> dict[str, TokenSeen]:
    """Every distinct token the AT simulator carried, from its ``/_sim/sms`` record."""
    tokens: dict[str, TokenSeen] = {}
    for message in messages:
        text = str(message.get("text") or "")
        found = _TOKEN.search(text)
        if found is None:
            continue
        digits = "".join(found.groups())
        meter = _METER.search(text)
        receipt = _RECEIPT.search(text)
        amount = _AMOUNT.search(text)
        kwh = _KWH.search(text)
        seen = tokens.get(digits)
        if seen is None:
            tenths = None
            if kwh is not None:
                whole, tenth = (kwh.group(1), kwh.group(2)) if kwh.group(1) else kwh.group(3, 4)
                tenths = int(whole) * 10 + int(tenth)
            seen = TokenSeen(
                digits=digits,
                meter=meter.group(1) if meter else "",
                amount_minor=(
                    int(amount.group(2).replace(",", "")) * 100 + int(amount.group(3))
                    if amount
                    else None
                ),
                currency=amount.group(1) if amount else None,
                tenths_kwh=tenths,
                receipt=receipt.group(1) if receipt else None,
            )
            tokens[digits] = seen
        to = str(message.get("to") or "").removeprefix("+")
        seen.recipients.add(to)
        seen.sms_count += 1
        if "Success" in (message.get("reports") or []):
            seen.delivered_to.add(to)
        accepted = message.get("accepted_at")
        if isinstance(accepted, int | float):
            seen.first_seen = min(seen.first_seen, float(accepted))
            seen.last_seen = max(seen.last_seen, float(accepted))
    return tokens


def read_meters(path: Path) -> dict[str, MeterProfile]:
    """The meters the harness registered (the same CSV it imported), by DRN."""
    profiles: dict[str, MeterProfile] = {}
    with path.open(newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            profiles[row["drn"]] = MeterProfile(
                drn=row["drn"],
                iin=row.get("iin") or "600727",
                sgc=row["sgc"],
                tariff_index=row["tariff_index"],
                krn=int(row["krn"]),
                key_type=int(row.get("key_type") or 2),
                base_date=int(row.get("base_date") or 2014),
                ea=int(row.get("ea") or 7),
                dkga=int(row.get("dkga") or 4),
                ken=int(row.get("ken") or 255),
            )
    return profiles


def read_key(path: Path) -> VendingKey:
    """The vending key the harness generated: ``{"sgc", "krn", "dkga", "base_date", "key_hex"}``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return VendingKey(
        sgc=str(data["sgc"]),
        krn=int(data["krn"]),
        dkga=int(data["dkga"]),
        base_date=int(data["base_date"]),
        key=bytes.fromhex(str(data["key_hex"])),
    )


# --- the audit -----------------------------------------------------------------------------------


def _link(
    charges: Sequence[Charge], tokens: Mapping[str, TokenSeen], report: AuditReport
) -> dict[str, Charge]:
    """Tie tokens to charges; count double vends, unpaid tokens, payments with no token."""
    by_receipt: dict[str, Charge] = {}
    for charge in charges:
        for handle in {charge.receipt, charge.reference} - {""}:
            by_receipt[handle] = charge
    linked: dict[str, Charge] = {}  # token digits → the charge it is for
    per_charge: dict[int, list[TokenSeen]] = defaultdict(list)
    loose: list[TokenSeen] = []
    for token in sorted(tokens.values(), key=lambda t: t.first_seen):
        found = by_receipt.get(token.receipt or "")
        if found is None:
            loose.append(token)
        else:
            linked[token.digits] = found
            per_charge[id(found)].append(token)
    _link_by_payer(charges, loose, linked, per_charge, report)
    served = {(c.msisdn, c.account, c.amount_minor) for c in charges if per_charge[id(c)]}
    for charge in charges:
        got = per_charge[id(charge)]
        if not got:
            report.paid_without_token_refs.append(charge.reference)
            report.note(
                "paid_without_token",
                f"{charge.provider} {charge.reference} {charge.amount_minor / 100:.2f}"
                f" {charge.currency} from {charge.msisdn} for {charge.account}",
            )
            if (charge.msisdn, charge.account, charge.amount_minor) in served:
                report.note(
                    "charged_twice",
                    f"{charge.provider} {charge.reference}: {charge.msisdn} already got a token"
                    f" for {charge.account} {charge.amount_minor / 100:.2f}",
                )
        for extra in got[1:]:
            report.note(
                "double_vends",
                f"{charge.provider} {charge.reference}: another token …{extra.digits[-4:]}",
            )
    _check_terms(tokens, linked, report)
    return linked


def _link_by_payer(
    charges: Sequence[Charge],
    loose: Sequence[TokenSeen],
    linked: dict[str, Charge],
    per_charge: dict[int, list[TokenSeen]],
    report: AuditReport,
) -> None:
    """Tokens without a provider receipt: tie them by payer, meter and amount."""
    groups: dict[tuple[str, str, int], list[Charge]] = defaultdict(list)
    for charge in charges:
        if not per_charge[id(charge)]:
            groups[(charge.msisdn, charge.account, charge.amount_minor)].append(charge)
    for token in loose:
        candidates = [
            groups.get((phone, token.meter, token.amount_minor or -1), [])
            for phone in sorted(token.recipients)
        ]
        group = next((g for g in candidates if g), None)
        if group is None:
            report.note(
                "token_without_payment",
                f"token …{token.digits[-4:]} meter {token.meter} to {sorted(token.recipients)}"
                f" receipt {token.receipt}: no payment matches",
            )
            continue
        # Prefer a charge that has no token yet; a surplus token is a second vend.
        free = next((c for c in group if not per_charge[id(c)]), group[0])
        linked[token.digits] = free
        per_charge[id(free)].append(token)


def _check_terms(
    tokens: Mapping[str, TokenSeen], linked: Mapping[str, Charge], report: AuditReport
) -> None:
    """A token tied to a payment must be for the meter and the amount that was paid."""
    for digits, charge in linked.items():
        token = tokens[digits]
        # An account that is a meter number (C2B bill reference, STK account) must match.
        if charge.account.isdigit() and token.meter != charge.account:
            report.note(
                "token_without_payment",
                f"token …{digits[-4:]} for meter {token.meter} but {charge.reference} paid"
                f" for {charge.account}",
            )
        elif token.amount_minor is not None and token.amount_minor != charge.amount_minor:
            report.note(
                "token_without_payment",
                f"token …{digits[-4:]} says {token.amount_minor} but {charge.reference} took"
                f" {charge.amount_minor}",
            )


def _count_duplicates(tokens: Mapping[str, TokenSeen], report: AuditReport) -> None:
    """SMS that carried a token a previous SMS carried already (not a failing count)."""
    for token in tokens.values():
        if token.sms_count < 2:
            continue
        report.duplicate_token_sms += token.sms_count - 1
        gap = max(0.0, token.last_seen - token.first_seen) if token.last_seen else 0.0
        report.duplicate_gap_max_s = max(report.duplicate_gap_max_s, round(gap, 1))
        examples = report.examples.setdefault("duplicate_token_sms", [])
        if len(examples) < 10:
            examples.append(
                f"token …{token.digits[-4:]} in {token.sms_count} SMS to"
                f" {sorted(token.recipients)}, {gap:.1f} s apart"
            )


def _check_delivery(
    tokens: Mapping[str, TokenSeen], linked: Mapping[str, Charge], report: AuditReport
) -> None:
    for digits, charge in linked.items():
        token = tokens[digits]
        if charge.msisdn not in token.delivered_to:
            report.note(
                "undelivered_tokens",
                f"token …{digits[-4:]} for {charge.reference}: payer {charge.msisdn}, sent to"
                f" {sorted(token.recipients)}, delivered to {sorted(token.delivered_to)}",
            )


def _key_into_meters(
    tokens: Mapping[str, TokenSeen],
    meters: Mapping[str, MeterProfile],
    vending_key: VendingKey,
    report: AuditReport,
) -> None:
    by_meter: dict[str, list[TokenSeen]] = defaultdict(list)
    for token in tokens.values():
        by_meter[token.meter].append(token)
    for drn, seen in sorted(by_meter.items()):
        profile = meters.get(drn)
        if profile is None:
            for token in seen:
                report.note("meter_rejected", f"token …{token.digits[-4:]}: unknown meter {drn}")
            continue
        report.meters_keyed += 1
        meter = MeterEmulator.for_profile(profile, vending_key)
        for token in sorted(seen, key=lambda t: t.first_seen):
            before = sum(meter.credit.values())
            response = meter.enter(token.digits)
            if not response.accepted:
                report.note(
                    "meter_rejected",
                    f"meter {drn} refused token …{token.digits[-4:]}: {response.verdict}",
                )
                continue
            added = sum(meter.credit.values()) - before
            if token.tenths_kwh is not None and added != token.tenths_kwh:
                report.note(
                    "wrong_credit",
                    f"meter {drn} token …{token.digits[-4:]}: credit {added} tenths of kWh,"
                    f" SMS said {token.tenths_kwh}",
                )


def audit(
    charges: Sequence[Charge],
    messages: Iterable[Mapping[str, Any]],
    meters: Mapping[str, MeterProfile],
    vending_key: VendingKey,
    *,
    key_tokens: bool = True,
) -> AuditReport:
    """Compare money taken, tokens carried by SMS, and what the meters make of the tokens.

    ``key_tokens=False`` skips the meter emulators (a cheap check while waiting for a drain).
    """
    report = AuditReport()
    messages = list(messages)
    tokens = parse_tokens(messages)
    report.charges = len(charges)
    report.money_taken_minor = sum(c.amount_minor for c in charges)
    report.token_sms = sum(t.sms_count for t in tokens.values())
    report.distinct_tokens = len(tokens)
    linked = _link(charges, tokens, report)
    _count_duplicates(tokens, report)
    _check_delivery(tokens, linked, report)
    if key_tokens:
        _key_into_meters(tokens, meters, vending_key, report)
    return report


async def fetch_records(
    urls: Mapping[str, str], session: aiohttp.ClientSession
) -> tuple[list[Charge], list[dict[str, Any]]]:
    """Money taken by every payment simulator and every SMS the AT simulator accepted."""
    charges: list[Charge] = []
    for provider in PAYMENT_SIMULATORS:
        if provider not in urls:
            continue
        async with session.get(urls[provider] + "/_sim/ledger") as response:
            response.raise_for_status()
            charges += parse_charges(provider, await response.json())
    async with session.get(urls["africastalking"] + "/_sim/sms") as response:
        response.raise_for_status()
        messages: list[dict[str, Any]] = await response.json()
    return charges, messages


async def audit_running(
    urls: Mapping[str, str],
    meters: Mapping[str, MeterProfile],
    vending_key: VendingKey,
    *,
    key_tokens: bool = True,
) -> AuditReport:
    """Fetch the simulators' records over HTTP and audit them (see ``audit``)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        charges, messages = await fetch_records(urls, session)
    return audit(charges, messages, meters, vending_key, key_tokens=key_tokens)


def main(argv: Sequence[str] | None = None) -> int:
    """``python bench/audit.py``: audit a running ``gateway sim``; 1 if any count is non-zero."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sims", type=Path, required=True, help="gateway sim's JSON line")
    parser.add_argument("--meters", type=Path, required=True, help="the meters CSV imported")
    parser.add_argument("--key", type=Path, required=True, help="the vending key JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    urls = json.loads(args.sims.read_text(encoding="utf-8").strip().splitlines()[-1])
    report = asyncio.run(audit_running(urls, read_meters(args.meters), read_key(args.key)))
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
