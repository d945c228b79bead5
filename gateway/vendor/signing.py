"""Vendor API request signing: HMAC-SHA256 over the request, in the spirit of RFC 9421.

Pure (no I/O): the gateway verifies with it, ``gateway.vendor_client`` signs with it.

A vendor key has a public id (``vk_…``) and a secret (``vsk_…``) shown once, at creation. Neither
side signs with the secret itself: both derive the signing key ``HMAC-SHA256(secret, LABEL)``,
and the ledger stores only that derived key, sealed under the gateway's master key
(``gateway/vendor/sealing.py``; never the secret). A request carries:

- ``X-STS-Key``: the key id; ``X-STS-Terminal``: the terminal (optional);
- ``X-STS-Timestamp``: Unix seconds (at most ``MAX_SKEW_S`` from the gateway's clock);
- ``X-STS-Nonce``: 16 to 64 characters of ``[A-Za-z0-9_-]``, never reused within the window;
- ``Content-Digest``: ``sha-256=:<base64 of the body's SHA-256>:`` (RFC 9530), also for no body;
- ``X-STS-Signature``: ``sig1=:<base64 HMAC-SHA256 of the signature base>:``.

The signature base is RFC 9421's form: one ``"name": value`` line per covered component (method,
request target with its query, timestamp, nonce, terminal, content digest) and the
``"@signature-params"`` line naming them and the key id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

#: What the signing key is derived under (changing it invalidates every key).
LABEL: Final = b"sts-gateway vendor request signing v1"
#: Largest difference between the request's timestamp and the gateway's clock.
MAX_SKEW_S: Final = 300
KEY_HEADER: Final = "X-STS-Key"
TERMINAL_HEADER: Final = "X-STS-Terminal"
TIMESTAMP_HEADER: Final = "X-STS-Timestamp"
NONCE_HEADER: Final = "X-STS-Nonce"
DIGEST_HEADER: Final = "Content-Digest"
SIGNATURE_HEADER: Final = "X-STS-Signature"
COVERED: Final = (
    "@method",
    "@request-target",
    "x-sts-timestamp",
    "x-sts-nonce",
    "x-sts-terminal",
    "content-digest",
)
NONCE_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")
KEY_ID_PATTERN: Final = re.compile(r"vk_[A-Za-z0-9]{8,40}")
#: What a key may be allowed to do: confirm meters; quote, vend and reverse; read its vends back
#: (last response, reprint); fetch statements. A route names the scopes that admit it.
SCOPES: Final = frozenset({"meters", "vend", "read", "statement"})


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just made: ``secret`` is shown once and never stored."""

    key_id: str
    secret: str = field(repr=False)

    @property
    def signing_key(self) -> str:
        """The derived key the gateway verifies with (hex; the ledger keeps it sealed)."""
        return derive_signing_key(self.secret)


def new_key() -> NewKey:
    """A fresh key id and secret (256 random bits)."""
    return NewKey(key_id="vk_" + secrets.token_hex(8), secret="vsk_" + secrets.token_urlsafe(32))


def derive_signing_key(secret: str) -> str:
    """The signing key (hex) both sides derive from the secret."""
    return hmac.new(secret.encode(), LABEL, hashlib.sha256).hexdigest()


def content_digest(body: bytes) -> str:
    """``Content-Digest`` for ``body`` (RFC 9530, SHA-256)."""
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"


def signature_base(
    *,
    method: str,
    target: str,
    timestamp: str,
    nonce: str,
    terminal: str,
    digest: str,
    key_id: str,
) -> bytes:
    """The bytes signed: RFC 9421's signature base for the covered components."""
    values = (method.upper(), target, timestamp, nonce, terminal, digest)
    lines = [f'"{name}": {value}' for name, value in zip(COVERED, values, strict=True)]
    names = " ".join(f'"{name}"' for name in COVERED)
    lines.append(f'"@signature-params": ({names});keyid="{key_id}";alg="hmac-sha256"')
    return "\n".join(lines).encode()


def sign(signing_key: str, base: bytes) -> str:
    """The ``X-STS-Signature`` value for ``base``."""
    mac = hmac.new(bytes.fromhex(signing_key), base, hashlib.sha256).digest()
    return "sig1=:" + base64.b64encode(mac).decode() + ":"


def signed_headers(
    *,
    key_id: str,
    secret: str,
    method: str,
    target: str,
    body: bytes,
    timestamp: int,
    nonce: str | None = None,
    terminal: str = "",
) -> dict[str, str]:
    """The headers that sign a request (the client's side)."""
    nonce = nonce or secrets.token_urlsafe(18)
    digest = content_digest(body)
    base = signature_base(
        method=method,
        target=target,
        timestamp=str(timestamp),
        nonce=nonce,
        terminal=terminal,
        digest=digest,
        key_id=key_id,
    )
    headers = {
        KEY_HEADER: key_id,
        TIMESTAMP_HEADER: str(timestamp),
        NONCE_HEADER: nonce,
        DIGEST_HEADER: digest,
        SIGNATURE_HEADER: sign(derive_signing_key(secret), base),
    }
    if terminal:
        headers[TERMINAL_HEADER] = terminal
    return headers


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedRequest:
    """What the signature headers claim, parsed (not yet verified)."""

    key_id: str
    terminal: str
    timestamp: int
    nonce: str
    digest: str
    signature: str


class SignatureError(Exception):
    """The request's signature headers are missing, malformed or wrong."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def parse_headers(headers: Mapping[str, str]) -> SignedRequest:
    """The signature headers, checked for form. Raises ``SignatureError`` (signature_invalid)."""
    missing = [
        name
        for name in (KEY_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, DIGEST_HEADER, SIGNATURE_HEADER)
        if not headers.get(name)
    ]
    if missing:
        raise SignatureError("signature_invalid", "missing header(s): " + ", ".join(missing))
    key_id, stamp, nonce = headers[KEY_HEADER], headers[TIMESTAMP_HEADER], headers[NONCE_HEADER]
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise SignatureError("signature_invalid", f"{KEY_HEADER} is not a key id")
    if not stamp.isdigit() or len(stamp) > 12:
        raise SignatureError("signature_invalid", f"{TIMESTAMP_HEADER} is not Unix seconds")
    if not NONCE_PATTERN.fullmatch(nonce):
        raise SignatureError("signature_invalid", f"{NONCE_HEADER}: 16-64 of [A-Za-z0-9_-]")
    return SignedRequest(
        key_id=key_id,
        terminal=headers.get(TERMINAL_HEADER, ""),
        timestamp=int(stamp),
        nonce=nonce,
        digest=headers[DIGEST_HEADER],
        signature=headers[SIGNATURE_HEADER],
    )


def verify(
    signed: SignedRequest, *, signing_key: str, method: str, target: str, body: bytes, now: float
) -> None:
    """Check the digest, the clock skew and the signature (constant-time).

    Raises:
        SignatureError: ``signature_invalid`` (digest or signature wrong) or
            ``timestamp_skew`` (more than ``MAX_SKEW_S`` from ``now``).
    """
    if not hmac.compare_digest(signed.digest, content_digest(body)):
        raise SignatureError("signature_invalid", "Content-Digest does not match the body")
    if abs(now - signed.timestamp) > MAX_SKEW_S:
        raise SignatureError(
            "timestamp_skew", f"{TIMESTAMP_HEADER} is more than {MAX_SKEW_S} s from our clock"
        )
    base = signature_base(
        method=method,
        target=target,
        timestamp=str(signed.timestamp),
        nonce=signed.nonce,
        terminal=signed.terminal,
        digest=signed.digest,
        key_id=signed.key_id,
    )
    if not hmac.compare_digest(signed.signature, sign(signing_key, base)):
        raise SignatureError("signature_invalid", "the signature does not match the request")
