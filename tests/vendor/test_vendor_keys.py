"""Vendor keys: sealed at rest under the master key, re-sealed from schema 8, rotated, scoped."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg  # type: ignore[import-untyped]
import pytest

from gateway.ledger import (
    LedgerUnavailable,
    NotFound,
    open_postgres_ledger,
    open_sqlite_ledger,
)
from gateway.ledger import postgres as postgres_backend
from gateway.ledger import sqlite as sqlite_backend
from gateway.ledger.postgres import create_schema, drop_schema
from gateway.ledger.vendor import VendorDraft, VendorLedger
from gateway.vendor import sealing, signing
from gateway.vendor.service import reseal_vendor_keys
from gateway.vendor_client import VendorClient
from tests.ledger.ledger_support import POSTGRES_URL
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


@contextlib.asynccontextmanager
async def _schema_or_skip() -> AsyncIterator[str]:
    schema = f"t_{uuid.uuid4().hex}"
    try:
        await create_schema(POSTGRES_URL, schema)
    except LedgerUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} does not answer ({exc})")
    try:
        yield schema
    finally:
        await drop_schema(POSTGRES_URL, schema)


@contextlib.asynccontextmanager
async def _ledger(
    backend: str, where: str, *, upto: int | None = None
) -> AsyncIterator[VendorLedger]:
    """The ledger at ``where``, migrated only up to ``upto`` when given (as an old release)."""
    module: Any = postgres_backend if backend == "postgres" else sqlite_backend
    scripts = module.migration_scripts
    with pytest.MonkeyPatch.context() as patch:
        if upto is not None:
            patch.setattr(
                module, "migration_scripts", lambda: [s for s in scripts() if s[0] <= upto]
            )
        opening = (
            open_postgres_ledger(POSTGRES_URL, schema=where, max_size=2)
            if backend == "postgres"
            else open_sqlite_ledger(Path(where))
        )
        async with opening as ledger:
            yield cast("VendorLedger", ledger)


async def _sql(backend: str, where: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
    if backend == "sqlite":
        with contextlib.closing(sqlite3.connect(where)) as conn, conn:
            return [tuple(r) for r in conn.execute(sql.replace("$1", "?").replace("$2", "?"), args)]
    conn = await asyncpg.connect(POSTGRES_URL, server_settings={"search_path": where})
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_schema_8_keys_are_resealed_at_start_and_keep_working(
    backend: str, tmp_path: Path
) -> None:
    """A schema-8 row (the signing key in the clear) migrates to 10, is sealed, still verifies."""
    made = signing.new_key()
    master = bytes(range(1, 33))
    async with contextlib.AsyncExitStack() as stack:
        where = (
            await stack.enter_async_context(_schema_or_skip())
            if backend == "postgres"
            else str(tmp_path / "old.db")
        )
        async with _ledger(backend, where, upto=8) as old:  # the ledger as schema 8 left it
            await old.add_vendor(
                VendorDraft(vendor_id="old", name="Old", currency="KES"), actor="t"
            )
        await _sql(
            backend, where,
            "INSERT INTO vendor_keys (key_id, vendor_id, signing_key, scopes, created_at)"
            " VALUES ($1, 'old', $2, 'meters statement vend', CURRENT_TIMESTAMP)",
            made.key_id, made.signing_key,
        )  # fmt: skip
        async with _ledger(backend, where) as vendors:  # migration 0010 on open
            before = await vendors.get_vendor_key(made.key_id)
            assert before is not None
            assert before.legacy_signing_key == made.signing_key
            assert before.sealed_key is None
            assert before.scopes == {"meters", "read", "statement", "vend"}  # 'read' added
            assert await reseal_vendor_keys(vendors, master) == 1
            assert await reseal_vendor_keys(vendors, master) == 0
            after = await vendors.get_vendor_key(made.key_id)
        rows = await _sql(backend, where, "SELECT * FROM vendor_keys")
    assert after is not None
    assert after.legacy_signing_key is None
    assert after.sealed_key is not None
    assert after.key_hash == sealing.fingerprint(made.signing_key)
    opened = sealing.open_signing_key(
        after.sealed_key, key_id=made.key_id, vendor_id="old", master_key=master
    )
    assert opened == made.signing_key
    stored = repr(rows)
    assert made.signing_key not in stored
    assert made.secret not in stored
    assert bytes.fromhex(made.signing_key) not in after.sealed_key


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
