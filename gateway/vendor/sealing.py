"""Vendor signing keys sealed at rest: AES-256-GCM under the gateway's master key.

Verifying a request's HMAC needs the signing key itself, so it cannot be stored as a one-way
hash. The ledger keeps it sealed (as vending keys are, ``gateway/ledger/keys.py``), under the
master key (``GATEWAY_MASTER_KEY``) that never enters the database, with a hash beside it for
display and lookup (``fingerprint``). The associated data binds the key id and the vendor, so a
sealed key copied to another row does not open. Neither the secret (``vsk_…``, shown once) nor
the signing key derived from it is ever stored in the clear.

Sealed form: 12-byte nonce, ciphertext, 16-byte tag, concatenated.
"""

from __future__ import annotations

import hashlib
from typing import Final

from Crypto.Cipher import AES
from Crypto.Random import get_random_bytes

from gateway.errors import GatewayError

MASTER_KEY_BYTES: Final = 32
_NONCE: Final = 12
_TAG: Final = 16
_FINGERPRINT_LABEL: Final = b"sts-gateway vendor key fingerprint v1:"


class VendorKeyUnreadable(GatewayError):
    """A sealed vendor key does not open: the master key is wrong, or the row was altered."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"vendor key {key_id} does not open with this master key (wrong GATEWAY_MASTER_KEY,"
            " or the row was altered)"
        )
        self.key_id = key_id


def _aad(key_id: str, vendor_id: str) -> bytes:
    return f"sts-gateway vendor signing key v1;key_id={key_id};vendor_id={vendor_id}".encode()


def _check(master_key: bytes) -> None:
    if len(master_key) != MASTER_KEY_BYTES:
        raise ValueError(f"master key must be {MASTER_KEY_BYTES} bytes, got {len(master_key)}")


def fingerprint(signing_key: str) -> str:
    """The signing key's SHA-256 (hex): stored beside it, shown (first 16) to operators."""
    return hashlib.sha256(_FINGERPRINT_LABEL + bytes.fromhex(signing_key)).hexdigest()


def seal_signing_key(signing_key: str, *, key_id: str, vendor_id: str, master_key: bytes) -> bytes:
    """Encrypt the (hex) signing key under ``master_key`` with a fresh nonce."""
    _check(master_key)
    nonce = get_random_bytes(_NONCE)
    cipher = AES.new(master_key, AES.MODE_GCM, nonce=nonce)
    cipher.update(_aad(key_id, vendor_id))
    ciphertext, tag = cipher.encrypt_and_digest(bytes.fromhex(signing_key))
    return nonce + ciphertext + tag


def open_signing_key(sealed: bytes, *, key_id: str, vendor_id: str, master_key: bytes) -> str:
    """The (hex) signing key. Raises ``VendorKeyUnreadable`` (wrong master key, altered row)."""
    _check(master_key)
    if len(sealed) <= _NONCE + _TAG:
        raise VendorKeyUnreadable(key_id)
    nonce, body, tag = sealed[:_NONCE], sealed[_NONCE:-_TAG], sealed[-_TAG:]
    cipher = AES.new(master_key, AES.MODE_GCM, nonce=nonce)
    cipher.update(_aad(key_id, vendor_id))
    try:
        return cipher.decrypt_and_verify(body, tag).hex()
    except ValueError as exc:  # pycryptodome: "MAC check failed"
        raise VendorKeyUnreadable(key_id) from exc
