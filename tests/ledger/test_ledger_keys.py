"""Vending keys sealed at rest with AES-GCM under the master key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.ledger import (
    VendingKeyMaterial,
    VendingKeyUnreadable,
    open_sqlite_ledger,
    open_vending_key,
    seal_vending_key,
)

MASTER = bytes(range(32))
KEY = bytes.fromhex("abababababababab")


def material() -> VendingKeyMaterial:
    """A DKGA02 test key."""
    return VendingKeyMaterial(
        sgc="123457", krn=1, key_type=2, ea=7, dkga=2, base_date=1993, key=KEY
    )


def test_sealed_key_opens_with_the_master_key() -> None:
    """Sealing then opening with the same master key gives the key and its attributes back."""
    sealed = seal_vending_key(material(), MASTER)
    assert KEY not in sealed.ciphertext
    assert open_vending_key(sealed, MASTER) == material()


def test_wrong_master_key_fails_clearly() -> None:
    """Another master key raises VendingKeyUnreadable naming the key, never a garbled key."""
    sealed = seal_vending_key(material(), MASTER)
    with pytest.raises(VendingKeyUnreadable, match=r"sgc=123457 krn=1: wrong GATEWAY_MASTER_KEY"):
        open_vending_key(sealed, bytes(32))


def test_edited_attributes_do_not_open() -> None:
    """A sealed key whose attributes were changed (another key revision) does not open."""
    sealed = seal_vending_key(material(), MASTER)
    with pytest.raises(VendingKeyUnreadable):
        open_vending_key(dataclasses.replace(sealed, krn=2), MASTER)


def test_master_key_must_be_32_bytes() -> None:
    """A master key of another length is refused before any cryptography."""
    with pytest.raises(ValueError, match="32 bytes"):
        seal_vending_key(material(), b"short")


def test_key_material_repr_hides_the_key() -> None:
    """The clear key never shows in a repr."""
    assert KEY.hex() not in repr(material())
    assert repr(KEY) not in repr(material())


async def test_sealed_keys_round_trip_through_the_ledger(tmp_path: Path) -> None:
    """A sealed key stored in the ledger opens after reading it back; re-adding replaces it."""
    async with open_sqlite_ledger(tmp_path / "l.db") as ledger:
        await ledger.put_vending_key(seal_vending_key(material(), MASTER))
        await ledger.put_vending_key(seal_vending_key(material(), MASTER))
        (stored,) = await ledger.vending_keys()
    assert open_vending_key(stored, MASTER).key == KEY


async def test_adding_a_key_never_replaces_one(tmp_path: Path) -> None:
    """``add_vending_key`` stores a key only where none has its (sgc, krn): the first one stays."""
    other = dataclasses.replace(material(), key=bytes.fromhex("cdcdcdcdcdcdcdcd"))
    async with open_sqlite_ledger(tmp_path / "l.db") as ledger:
        assert await ledger.add_vending_key(seal_vending_key(material(), MASTER))
        assert not await ledger.add_vending_key(seal_vending_key(other, MASTER))
        (stored,) = await ledger.vending_keys()
        events = await ledger.events(kind="vending_key_stored")
    assert open_vending_key(stored, MASTER).key == KEY
    assert len(events) == 1
