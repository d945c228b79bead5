"""Embedded defaults for ``gateway serve`` with no configuration: a test key, demo meters, a tariff.

Everything here is for trying the gateway on simulators. The vending key is generated on first
start (random, DKGA04, so it is nobody's production key) and sealed like any other; production
mode never calls this module. Seeding is idempotent: a restart keeps the key, the meters' TIDs
and every purchase.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway.ledger import Ledger, MeterNumber, MeterRecord
from gateway.ledger.keys import VendingKeyMaterial, seal_vending_key
from gateway.tariff import Tariff

DEMO_SGC: Final = "123457"
DEMO_KRN: Final = 1

DEMO_TARIFF: Final = Tariff(
    tariff_id="domestic",
    name="Domestic (demo)",
    currency="KES",
    price_per_kwh_minor=2500,  # KES 25.00 per kWh before VAT
    vat_basis_points=1600,  # 16 % VAT, included in what the customer pays
    fixed_charge_minor=0,
    min_purchase_minor=5000,  # KES 50
    max_purchase_minor=3_500_000,  # KES 35,000
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoMeter:
    """A demo meter: an 11-digit DRN with its Luhn check digit, a customer and an algorithm."""

    drn: str
    customer_name: str
    area: str
    ea: int = 7


DEMO_METERS: Final = (
    DemoMeter(drn="04000000010", customer_name="Wanjiru Kamau", area="Kibera"),
    DemoMeter(drn="04000000028", customer_name="Otieno Ochieng", area="Kisumu"),
    DemoMeter(drn="04000000036", customer_name="Amina Hassan", area="Mombasa"),
    DemoMeter(drn="04000000044", customer_name="Kiprono Cheruiyot", area="Eldoret", ea=11),
    DemoMeter(drn="47000123456", customer_name="Grace Njeri", area="Nakuru"),
)


def demo_master_key(data_dir: Path) -> bytes:
    """The demo's master key: read from ``data_dir/master.key``, created (mode 0600) if absent.

    Only for the embedded defaults; production mode requires ``GATEWAY_MASTER_KEY``.
    """
    path = data_dir / "master.key"
    if path.exists():
        return base64.b64decode(path.read_text(encoding="ascii").strip(), validate=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(base64.b64encode(key).decode() + "\n")
    return key


async def seed_demo(ledger: Ledger, master_key: bytes) -> bool:
    """Make sure the demo tariff, meters and a test vending key exist; True if any was added.

    Safe when several instances (or workers) start on one empty database at once: the key is
    added only where none exists (``add_vending_key``), so one random key wins and every
    instance loads that one afterwards; meters and the tariff are the same data whoever
    writes them.
    """
    added = False
    have_key = any(
        key.sgc == DEMO_SGC and key.krn == DEMO_KRN for key in await ledger.vending_keys()
    )
    if not have_key:
        material = VendingKeyMaterial(
            sgc=DEMO_SGC, krn=DEMO_KRN, key_type=2, ea=7, dkga=4, base_date=2014,
            key=secrets.token_bytes(20),
        )  # fmt: skip
        added = await ledger.add_vending_key(seal_vending_key(material, master_key))
    await ledger.put_tariff(DEMO_TARIFF)
    for meter in DEMO_METERS:
        if await ledger.lookup_meter(MeterNumber(meter.drn)) is not None:
            continue
        await ledger.put_meter(
            MeterRecord(
                drn=MeterNumber(meter.drn),
                customer_name=meter.customer_name,
                area=meter.area,
                sgc=DEMO_SGC,
                tariff_index="01",
                krn=DEMO_KRN,
                ea=meter.ea,
                dkga=4,
                base_date=2014,
                tariff_id=DEMO_TARIFF.tariff_id,
            )
        )
        added = True
    return added
