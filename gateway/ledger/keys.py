"""Vending keys sealed at rest: AES-256-GCM under the master key (``GATEWAY_MASTER_KEY``).

The associated data binds the key's attributes (supply group, key revision, key type, algorithms,
base date), so a sealed key moved to another row, or a row whose attributes were edited, fails to
open instead of producing a key for the wrong meters. A wrong master key fails with
``VendingKeyUnreadable``, never with a garbled key. The master key is passed in explicitly; this
module never reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from Crypto.Cipher import AES
from Crypto.Random import get_random_bytes

from gateway.ledger.base import SealedVendingKey, VendingKeyUnreadable

MASTER_KEY_BYTES: Final = 32
_NONCE_BYTES: Final = 12


@dataclass(frozen=True, slots=True, kw_only=True)
class VendingKeyMaterial:
    """A vending key in the clear, with its attributes. ``key`` never appears in ``repr``.

    Attributes:
        sgc: supply group code (6 digits).
        krn: key revision number.
        key_type: STS key type (2 = unique domestic key).
        ea: encryption algorithm (7, 11).
        dkga: decoder key generation algorithm.
        base_date: the TID base date year (1993, 2014, 2035).
    """

    sgc: str
    krn: int
    key_type: int = 2
    ea: int = 7
    dkga: int = 4
    base_date: int = 2014
    key: bytes = field(repr=False)


def _aad(sgc: str, krn: int, key_type: int, ea: int, dkga: int, base_date: int) -> bytes:
    return (
        f"sts-gateway vending key v1;sgc={sgc};krn={krn};key_type={key_type};ea={ea};"
        f"dkga={dkga};base_date={base_date}"
    ).encode()


def _check_master(master_key: bytes) -> None:
    if len(master_key) != MASTER_KEY_BYTES:
        raise ValueError(f"master key must be {MASTER_KEY_BYTES} bytes, got {len(master_key)}")


def seal_vending_key(material: VendingKeyMaterial, master_key: bytes) -> SealedVendingKey:
    """Encrypt ``material.key`` under ``master_key`` (32 bytes) with a fresh random nonce.

    Raises:
        ValueError: the master key is not 32 bytes, or the vending key is empty.
    """
    _check_master(master_key)
    if not material.key:
        raise ValueError("vending key is empty")
    nonce = get_random_bytes(_NONCE_BYTES)
    cipher = AES.new(master_key, AES.MODE_GCM, nonce=nonce)
    cipher.update(
        _aad(
            material.sgc,
            material.krn,
            material.key_type,
            material.ea,
            material.dkga,
            material.base_date,
        )
    )
    ciphertext, tag = cipher.encrypt_and_digest(material.key)
    return SealedVendingKey(
        sgc=material.sgc,
        krn=material.krn,
        key_type=material.key_type,
        ea=material.ea,
        dkga=material.dkga,
        base_date=material.base_date,
        nonce=nonce,
        ciphertext=ciphertext,
        tag=tag,
    )


def open_vending_key(sealed: SealedVendingKey, master_key: bytes) -> VendingKeyMaterial:
    """Decrypt a sealed vending key and check it was sealed with these attributes.

    Raises:
        VendingKeyUnreadable: the master key is wrong or the row was altered.
        ValueError: the master key is not 32 bytes.
    """
    _check_master(master_key)
    cipher = AES.new(master_key, AES.MODE_GCM, nonce=sealed.nonce)
    cipher.update(
        _aad(sealed.sgc, sealed.krn, sealed.key_type, sealed.ea, sealed.dkga, sealed.base_date)
    )
    try:
        key = cipher.decrypt_and_verify(sealed.ciphertext, sealed.tag)
    except ValueError as exc:  # pycryptodome: "MAC check failed"
        raise VendingKeyUnreadable(sealed.sgc, sealed.krn) from exc
    return VendingKeyMaterial(
        sgc=sealed.sgc,
        krn=sealed.krn,
        key_type=sealed.key_type,
        ea=sealed.ea,
        dkga=sealed.dkga,
        base_date=sealed.base_date,
        key=key,
    )
