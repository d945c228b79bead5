"""The vendor API's sandbox (demo mode only): vendor ``demo-shop`` with known keys, and faults.

- ``demo-shop`` (terminal ``till-1``, 2 % commission) signs with ``SANDBOX_KEY_ID`` and
  ``SANDBOX_SECRET``, published here on purpose: never in production (the sandbox is seeded only
  when ``mode = "demo"``). Its float opens at KES 10,000.00 (top-up reference
  ``SANDBOX-OPENING``), so a sale above it answers ``insufficient_float``.
- Meter ``SLOW_METER``: the engine takes ``SLOW_ENGINE_S`` per credit token (a loaded HSM), so a
  terminal with a short timeout must ask for the last response.
- Meter ``BLOCKED_METER``: blocked by the utility (``meter_blocked``).
"""

from __future__ import annotations

import asyncio
from typing import Final

from gateway.ledger import DuplicateError, Ledger, MeterNumber, MeterRecord, MeterStatus
from gateway.ledger.vendor import VendorLedger
from gateway.sts import MeterProfile, Token, TokenEngine
from gateway.vendor.service import add_vendor_key, register_vendor
from gateway.vendor.signing import SCOPES, NewKey

SANDBOX_VENDOR: Final = "demo-shop"
SANDBOX_TERMINAL: Final = "till-1"
SANDBOX_KEY_ID: Final = "vk_demoshop00000001"
SANDBOX_SECRET: Final = "vsk_demo-shop-sandbox-secret-published-never-for-production"  # noqa: S105 - the sandbox's published key
SANDBOX_FLOAT_MINOR: Final = 1_000_000
SLOW_METER: Final = "04000000051"
BLOCKED_METER: Final = "04000000069"
SLOW_ENGINE_S: Final = 3.0


class SandboxEngine:
    """The real engine, slow for ``SLOW_METER``'s credit tokens."""

    def __init__(self, engine: TokenEngine, *, delay_s: float = SLOW_ENGINE_S) -> None:
        self._engine = engine
        self.delay_s = delay_s

    async def credit_token(
        self, meter: MeterProfile, units: int, tid: int, *, subclass: int = 0
    ) -> Token:
        """As the engine's; ``delay_s`` later for the slow meter."""
        if meter.drn == SLOW_METER:
            await asyncio.sleep(self.delay_s)
        return await self._engine.credit_token(meter, units, tid, subclass=subclass)

    async def key_change_tokens(self, old: MeterProfile, new: MeterProfile) -> list[Token]:
        """As the engine's."""
        return await self._engine.key_change_tokens(old, new)

    async def management_token(
        self, meter: MeterProfile, subclass: int, tid: int, value: int
    ) -> Token:
        """As the engine's."""
        return await self._engine.management_token(meter, subclass, tid, value)


async def seed_sandbox(
    ledger: Ledger, vendors: VendorLedger, *, template: str, master_key: bytes
) -> bool:
    """``demo-shop``, its key and float, and the two fault meters (keyed like ``template``).

    True if anything was added (idempotent: a second call adds nothing).
    """
    added = False
    like = await ledger.get_meter(template)
    for drn, name, status in (
        (SLOW_METER, "Slow Engine", MeterStatus.ACTIVE),
        (BLOCKED_METER, "Blocked Meter", MeterStatus.BLOCKED),
    ):
        if await ledger.lookup_meter(MeterNumber(drn)) is None:
            await ledger.put_meter(
                MeterRecord(
                    drn=MeterNumber(drn),
                    customer_name=name,
                    area="Sandbox",
                    sgc=like.sgc,
                    tariff_index=like.tariff_index,
                    krn=like.krn,
                    ea=like.ea,
                    dkga=like.dkga,
                    base_date=like.base_date,
                    tariff_id=like.tariff_id,
                    status=status,
                )
            )
            added = True
    if SANDBOX_VENDOR not in {v.vendor_id for v in await vendors.list_vendors()}:
        try:
            await register_vendor(
                vendors,
                SANDBOX_VENDOR,
                name="Demo shop (sandbox)",
                currency="KES",
                commission_bp=200,
                terminals=(SANDBOX_TERMINAL,),
                actor="sandbox",
                master_key=master_key,
            )
        except DuplicateError:  # another instance seeding the same database got there first
            return added
        await add_vendor_key(
            vendors,
            SANDBOX_VENDOR,
            scopes=SCOPES,
            actor="sandbox",
            master_key=master_key,
            new=NewKey(key_id=SANDBOX_KEY_ID, secret=SANDBOX_SECRET),
        )
        await vendors.top_up_float(
            SANDBOX_VENDOR, SANDBOX_FLOAT_MINOR, reference="SANDBOX-OPENING", actor="sandbox"
        )
        added = True
    return added
