"""One line of the ``gateway token batch`` contract (docs/sts-vectors.md), without any I/O.

Each function takes one decoded JSON object and returns the JSON object to write, or raises an
:class:`~gateway.sts.errors.StsError` whose message is the line's ``error`` sentence. The
command (``gateway/commands/token.py``) reads and writes the lines.

Input keys: ``meter`` (key-derivation inputs) or ``decoder_key`` (hex), ``ea`` (7, 11 or null
for class 1), ``sta_tables`` (``"sample"`` for the IEC example), and ``fields`` (generate) or
``token`` (decode). ``id`` is echoed; other keys are ignored.

What a line may look like, beyond the published vectors (a vendor's file is not ours):

* keys are hex: any case, an optional ``0x``; a ``decoder_key`` by value, its leading zeros
  optional (padded to the algorithm's length); a ``vending_key`` must have every digit of its
  8 (DKGA02) or 20 (DKGA04) bytes: a shorter one is refused, never zero-padded, since a key
  with a digit lost would derive another meter's key without any error;
* ``sgc``, ``tariff_index``, ``iin`` and ``drn`` may be JSON numbers (zero-padded to 6, 2,
  6 or 4, and 11 or 13 digits); ``dkga``, ``ea``, ``key_type``, ``krn``, ``base_date`` may be
  digit strings (``"04"``, ``"EA07"``), a base date also its two digits (``14``); integer
  ``fields`` may be decimal strings;
* ``sta_tables`` null means the real tables, and the name's case does not matter;
* ``meter.base_date`` may be left out for DKGA02, which does not use it;
* a line with ``meter`` uses it and ignores ``decoder_key`` (that is the expected output);
* ``ea`` and ``meter.ea`` must agree when both are given; without either, an 8-byte key is
  EA07 and a 16-byte key EA11;
* a line with neither ``fields`` nor ``token`` (``kind: "decoder-key-only"``) is answered
  with its decoder key in both directions;
* a token may be a JSON number (zero-padded to 20 digits) or grouped with spaces/dashes.

``fields`` are used exactly as given: no flag (RO, 3KCT, KEN nibbles) is ever recomputed.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.sts.carrier import extract_class, from_digits
from gateway.sts.cipher import BlockCipher, encryption_algorithm, make_cipher
from gateway.sts.dkga import derive_decoder_key
from gateway.sts.ea07 import StaTables
from gateway.sts.errors import InvalidField, InvalidKey
from gateway.sts.tokens import (
    TokenClass,
    build_token,
    decode_token,
    fields_from_json,
    needs_key,
)

DEFAULT_EA = 7
#: DKGA02 does not hash the base date in; a meter object may leave it out.
DKGA02_DEFAULT_BASE_DATE = 2014
_KEY_BYTES = {7: 8, 11: 16}
_VENDING_KEY_BYTES = {2: 8, 4: 20}
_SHORT_BASE_DATES = {93: 1993, 14: 2014, 35: 2035}


def _hex_text(name: str, raw: object) -> str:
    """Hex digits of a key given as a string: any case, optional ``0x``, spaces ignored."""
    if not isinstance(raw, str):
        raise InvalidKey(name, "<redacted>", "must be a hex string")
    text = "".join(raw.split())
    if text[:2].lower() == "0x":
        text = text[2:]
    if not text or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise InvalidKey(name, "<redacted>", "must be hexadecimal digits")
    return text


def _hex_bytes(name: str, raw: object, length: int | None = None) -> bytes:
    """A hex key as bytes; one given without its leading zeros is padded to ``length`` bytes.

    Hex values compare by value (docs/sts-vectors.md), so ``abc12def3456789`` is the 8-byte key
    ``0abc12def3456789``. Without a known ``length`` an odd number of digits gets one zero.
    """
    text = _hex_text(name, raw)
    if length is not None and len(text) < 2 * length:
        text = text.zfill(2 * length)
    elif len(text) % 2:
        text = "0" + text
    return bytes.fromhex(text)


def _vending_key(raw: object, dkga: int) -> bytes:
    """A vending key as bytes, with exactly the algorithm's length: never padded.

    Raises:
        InvalidKey: not hexadecimal, or shorter than the algorithm's key (a lost digit).
    """
    text = _hex_text("vending_key", raw)
    length = _VENDING_KEY_BYTES.get(dkga)
    if length is not None and len(text) < 2 * length:
        raise InvalidKey(
            "vending_key",
            "<redacted>",
            f"a DKGA{dkga:02d} vending key is {length} bytes ({2 * length} hex digits),"
            f" got {len(text)} hex digits; a short key is not padded",
        )
    return _hex_bytes("vending_key", text)


def _as_int(name: str, value: object, problem: str) -> int:
    """An integer given as a JSON number or as a string of decimal digits (``"04"``, ``"EA07"``)."""
    if isinstance(value, str):
        text = value.strip()
        if text[:2].lower() in ("ea", "bd"):
            text = text[2:]
        if text.isascii() and text.isdigit():
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise InvalidField(name, value, problem)


def _meter_int(meter: Mapping[str, object], name: str) -> int:
    return _as_int(name, meter.get(name), f"meter.{name} is missing or not an integer")


def _meter_str(meter: Mapping[str, object], name: str, width: int) -> str:
    """A digit string; a JSON number is accepted and zero-padded to ``width`` digits."""
    value = meter.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**width:
        return f"{value:0{width}d}"
    if not isinstance(value, str):
        raise InvalidField(name, value, f"meter.{name} is missing or not a string of digits")
    return value.strip()


def _identity(meter: Mapping[str, object]) -> tuple[str, str]:
    """(IIN, DRN); numbers are padded: a 13-digit DRN or an IIN below 10000 means IIN ``0000``."""
    iin_raw, drn_raw = meter.get("iin"), meter.get("drn")
    legacy = (isinstance(drn_raw, str) and len(drn_raw.strip()) == 13) or (
        isinstance(iin_raw, str) and len(iin_raw.strip()) == 4
    )
    if isinstance(iin_raw, int) and not isinstance(iin_raw, bool) and iin_raw < 10_000:
        legacy = True
    iin = _meter_str(meter, "iin", 4 if legacy else 6)
    drn = _meter_str(meter, "drn", 13 if len(iin) == 4 else 11)
    return iin, drn


def _ea(line: Mapping[str, object]) -> int | None:
    """The line's encryption algorithm: ``ea``, or ``meter.ea``; None if neither is given.

    Both are checked (EA09 or an unknown code in either is refused), and when both are given
    they must agree: a key derived for one algorithm cannot encrypt for the other.

    Raises:
        UnsupportedAlgorithm: EA09 or an unknown code.
        InvalidField: ``ea`` and ``meter.ea`` differ, or one is not a number.
    """
    meter = line.get("meter")
    found: list[int] = []
    for source in (meter if isinstance(meter, Mapping) else {}, line):
        value = source.get("ea")
        if value is not None:
            code = _as_int("ea", value, "the encryption algorithm is 7 or 11")
            found.append(int(encryption_algorithm(code)))
    if len(found) == 2 and found[0] != found[1]:
        raise InvalidField(
            "ea", found[1], f"the line's ea does not match meter.ea (EA{found[0]:02d})"
        )
    return found[-1] if found else None


def _tables(line: Mapping[str, object]) -> StaTables:
    raw = line.get("sta_tables")
    if raw is None:
        return StaTables.REAL
    try:
        return StaTables(str(raw).strip().lower())
    except ValueError:
        raise InvalidField("sta_tables", raw, 'STA tables are "real" or "sample"') from None


def decoder_key_of(line: Mapping[str, object]) -> bytes:
    """The decoder key a line names: derived from ``meter``, else given as ``decoder_key``.

    Raises:
        UnsupportedAlgorithm: DKGA01/03, EA09 or an unknown code.
        InvalidKey: a malformed key, or a DKGA02 vending key without odd DES parity.
        InvalidField: a malformed identifier, or neither ``meter`` nor ``decoder_key``.
    """
    meter = line.get("meter")
    if isinstance(meter, Mapping):
        ea = _ea(line)
        dkga = _meter_int(meter, "dkga")
        iin, drn = _identity(meter)
        base_date = (
            DKGA02_DEFAULT_BASE_DATE
            if dkga == 2 and meter.get("base_date") is None
            else _meter_int(meter, "base_date")
        )
        base_date = _SHORT_BASE_DATES.get(base_date, base_date)  # "14" as DKGA04 hashes it
        return derive_decoder_key(
            dkga=dkga,
            vending_key=_vending_key(meter.get("vending_key"), dkga),
            iin=iin,
            drn=drn,
            key_type=_meter_int(meter, "key_type"),
            sgc=_meter_str(meter, "sgc", 6),
            tariff_index=_meter_str(meter, "tariff_index", 2),
            krn=_meter_int(meter, "krn"),
            base_date=base_date,
            ea=DEFAULT_EA if ea is None else ea,
        )
    if meter is not None:
        raise InvalidField("meter", "<object>", "meter must be an object")
    if line.get("decoder_key") is not None:
        ea = _ea(line)
        raw = line["decoder_key"]
        length = _KEY_BYTES.get(ea) if ea is not None else None
        if length is None and isinstance(raw, str):  # no EA: 8 bytes unless longer
            length = 8 if len(_hex_text("decoder_key", raw)) <= 16 else 16
        return _hex_bytes("decoder_key", raw, length)
    raise InvalidField("decoder_key", None, "the line has neither meter nor decoder_key")


def _cipher(line: Mapping[str, object], decoder_key: bytes) -> BlockCipher:
    ea = _ea(line)
    if ea is None:
        ea = 11 if len(decoder_key) == 16 else DEFAULT_EA
    return make_cipher(ea, decoder_key, sta_tables=_tables(line))


def generate(line: Mapping[str, object]) -> dict[str, object]:
    """Generate: ``fields`` → ``{"id", "decoder_key", "data_block", "token"}``.

    A line without ``fields`` (a ``decoder-key-only`` vector) gets its decoder key and null
    ``data_block``/``token``. ``decoder_key`` is null for class 1 (not encrypted).
    """
    out: dict[str, object] = {"id": line.get("id")}
    raw_fields = line.get("fields")
    if raw_fields is None:
        out["decoder_key"] = decoder_key_of(line).hex()
        out["data_block"] = None
        out["token"] = None
        return out
    if not isinstance(raw_fields, Mapping):
        raise InvalidField("fields", "<value>", "fields must be an object")
    fields = fields_from_json(raw_fields)
    if needs_key(fields.TOKEN_CLASS):
        decoder_key = decoder_key_of(line)
        image = build_token(fields, _cipher(line, decoder_key))
        out["decoder_key"] = decoder_key.hex()
    else:
        image = build_token(fields, None)
        out["decoder_key"] = None
    out["data_block"] = f"{image.data_block:016x}"
    out["token"] = image.digits
    return out


def decode(line: Mapping[str, object]) -> dict[str, object]:
    """Decode: ``token`` → ``{"id", "data_block", "fields"}``.

    ``token`` is 20 digits (spaces or dashes between groups allowed); a JSON number is taken
    as the token's value and zero-padded. A line with neither ``token`` nor ``fields`` (a
    ``decoder-key-only`` vector) is answered as in :func:`generate`: ``{"id", "decoder_key",
    "data_block": null, "fields": null}``, so a whole vector file decodes without failures.

    Raises:
        TokenFormatError: the token is not 20 digits or is >= 2**66.
        CrcMismatch: the CRC does not match under the line's key.
        UnsupportedToken: a class/subclass this engine does not know.
    """
    out: dict[str, object] = {"id": line.get("id")}
    token = line.get("token")
    if token is None and line.get("fields") is None:
        out["decoder_key"] = decoder_key_of(line).hex()
        out["data_block"] = None
        out["fields"] = None
        return out
    if isinstance(token, int) and not isinstance(token, bool) and token >= 0:
        token = f"{token:020d}"
    if not isinstance(token, str):
        raise InvalidField("token", token, "token must be a string of 20 digits")
    token_class, _ = extract_class(from_digits(token))
    cipher = None
    if token_class != TokenClass.METER_TEST:
        cipher = _cipher(line, decoder_key_of(line))
    image = decode_token(token, cipher)
    out["data_block"] = f"{image.data_block:016x}"
    out["fields"] = image.fields.to_json()
    return out
