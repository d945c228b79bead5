"""Vendor keys: sealed at rest under the master key, re-sealed from schema 8, rotated, scoped."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest

from gateway.ledger import NotFound, open_sqlite_ledger
from gateway.ledger.sqlite import migration_scripts
from gateway.ledger.vendor import VendorLedger
from gateway.vendor import sealing, signing
from gateway.vendor.service import reseal_vendor_keys
from gateway.vendor_client import VendorClient
from tests.vendor.vendor_support import VendorWorld, unix


async def test_the_ledger_keeps_no_key_in_the_clear(world: VendorWorld) -> None:
    """Neither the secret nor the signing key is stored; the sealed key opens to the latter."""
    key = await world.vendors.get_vendor_key(world.key_id)
    assert key is not None
    assert key.sealed_key is not None
    assert key.legacy_signing_key is None
    derived = signing.derive_signing_key(world.secret)
    stored = repr(await world.ledger.events(kind="vendor_key_added"))
    assert world.key_id in stored
    for secret in (world.secret.encode(), derived.encode(), bytes.fromhex(derived)):
        assert secret not in key.sealed_key
        assert secret.decode(errors="ignore") not in stored
    assert key.key_hash == sealing.fingerprint(derived)
    opened = sealing.open_signing_key(
        key.sealed_key, key_id=key.key_id, vendor_id="shop", master_key=world.master_key
    )
    assert opened == derived
    with pytest.raises(sealing.VendorKeyUnreadable):
        sealing.open_signing_key(
            key.sealed_key, key_id=key.key_id, vendor_id="shop", master_key=bytes(32)
        )
    with pytest.raises(sealing.VendorKeyUnreadable):  # moved to another vendor's row
        sealing.open_signing_key(
            key.sealed_key, key_id=key.key_id, vendor_id="other", master_key=world.master_key
        )


async def test_a_wrong_master_key_refuses_the_start(world: VendorWorld) -> None:
    """The start's check opens every sealed key: another master key fails, naming the key."""
    assert await reseal_vendor_keys(world.vendors, world.master_key) == 0
    with pytest.raises(sealing.VendorKeyUnreadable, match=world.key_id):
        await reseal_vendor_keys(world.vendors, bytes(32))


async def test_schema_8_keys_are_resealed_at_start_and_keep_working(tmp_path: Path) -> None:
    """A schema-8 row (the signing key in the clear) migrates to 10, is sealed, still verifies."""
    path = tmp_path / "old.db"
    made = signing.new_key()
    with sqlite3.connect(path) as conn:  # the ledger as schema 8 left it
        conn.execute(
            "CREATE TABLE schema_migrations"
            " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        for version, name, sql in migration_scripts():
            if version > 8:
                break
            conn.executescript(sql)
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, '2026-01-01T00:00:00+00:00')",
                (version, name),
            )
        conn.execute(
            "INSERT INTO vendors (vendor_id, name, currency, created_at, updated_at)"
            " VALUES ('old', 'Old', 'KES', ?, ?)",
            ("2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"),
        )
        conn.execute(
            "INSERT INTO vendor_keys (key_id, vendor_id, signing_key, scopes, created_at)"
            " VALUES (?, 'old', ?, 'meters statement vend', '2026-01-01T00:00:00+00:00')",
            (made.key_id, made.signing_key),
        )
    master = bytes(range(1, 33))
    async with open_sqlite_ledger(path) as ledger:
        vendors = cast("VendorLedger", ledger)
        before = await vendors.get_vendor_key(made.key_id)
        assert before is not None
        assert before.legacy_signing_key == made.signing_key
        assert before.scopes == {"meters", "read", "statement", "vend"}  # 'read' added
        assert await reseal_vendor_keys(vendors, master) == 1
        assert await reseal_vendor_keys(vendors, master) == 0
        after = await vendors.get_vendor_key(made.key_id)
    assert after is not None
    assert after.legacy_signing_key is None
    assert after.sealed_key is not None
    assert after.key_hash == sealing.fingerprint(made.signing_key)
    opened = sealing.open_signing_key(
        after.sealed_key, key_id=made.key_id, vendor_id="old", master_key=master
    )
    assert opened == made.signing_key
    with sqlite3.connect(path) as conn:
        dump = "\n".join(conn.iterdump())
    assert made.signing_key not in dump
    assert made.secret not in dump


async def test_rotation_keeps_the_old_key_for_the_overlap_only(world: VendorWorld) -> None:
    """rotate: the new key has the old one's scopes and terminal; the old one ends on time."""
    old, made = await world.service.rotate_key(
        world.key_id, overlap=timedelta(hours=1), actor="ops"
    )
    with pytest.raises(ValueError, match="rotated already"):  # within the overlap: rotate the new
        await world.service.rotate_key(world.key_id, overlap=timedelta(hours=1), actor="ops")
    assert old.key_id == world.key_id
    rotated = await world.vendors.get_vendor_key(world.key_id)
    new = await world.vendors.get_vendor_key(made.key_id)
    assert rotated is not None
    assert new is not None
    assert rotated.replaced_by == made.key_id
    assert rotated.expires_at == world.clock.now + timedelta(hours=1)
    assert new.scopes == old.scopes
    assert new.terminal_id == old.terminal_id
    async with (
        world.client() as before,
        VendorClient(world.url, made.key_id, made.secret, terminal="till-1",
                     clock=unix(world.clock)) as after,
    ):  # fmt: skip
        assert (await before.confirm_meter(world.drns[0])).status == 200  # within the overlap
        assert (await after.confirm_meter(world.drns[0])).status == 200
        world.clock.advance(3601)
        assert (await before.confirm_meter(world.drns[0])).problem == "signature_invalid"
        assert (await after.confirm_meter(world.drns[0])).status == 200
    with pytest.raises(NotFound):  # an ended key rotates no more
        await world.service.rotate_key(world.key_id, overlap=timedelta(0), actor="ops")


async def test_scopes_admit_their_routes_only(world: VendorWorld) -> None:
    """A read key reads vends back but cannot sell; a vend key reads its vends; else denied."""
    read = await world.service.add_key("shop", scopes=frozenset({"read"}), actor="ops")
    statement = await world.service.add_key("shop", scopes=frozenset({"statement"}), actor="ops")
    async with (
        world.client() as full,
        VendorClient(world.url, read.key_id, read.secret, clock=unix(world.clock)) as reader,
        VendorClient(world.url, statement.key_id, statement.secret,
                     clock=unix(world.clock)) as books,
    ):  # fmt: skip
        sold = await full.vend(world.drns[0], 11_600, idempotency_key="scoped-1")
        vend_id = sold.json()["vend_id"]
        assert (await reader.last_response(idempotency_key="scoped-1")).body == sold.body
        assert (await reader.reprint(vend_id)).status == 200
        refused = [
            await reader.vend(world.drns[0], 11_600, idempotency_key="scoped-2"),
            await reader.quote(world.drns[0], 11_600),
            await reader.reversal(vend_id),
            await reader.confirm_meter(world.drns[0]),
            await reader.statement(world.clock.now.date().isoformat()),
            await books.last_response(vend_id=vend_id),
        ]
        assert (await books.statement(world.clock.now.date().isoformat())).status == 200
    assert [r.status for r in refused] == [403] * 6
    assert {r.problem for r in refused} == {"scope_denied"}
    assert await world.vendors.get_vendor_request("shop", idempotency_key="scoped-2") is None
