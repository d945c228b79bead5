"""One line of the ``gateway token batch`` contract (VECTORS.md), without any I/O.

Each function takes one decoded JSON object and returns the JSON object to write, or raises an
:class:`~gateway.sts.errors.StsError` whose message is the line's ``error`` sentence. The
command (``gateway/commands/token.py``) reads and writes the lines.

Input keys: ``meter`` (key-derivation inputs) or ``decoder_key`` (hex), ``ea`` (7, 11 or null
for class 1), ``sta_tables`` (``"sample"`` for the IEC example), and ``fields`` (generate) or
``token`` (decode). ``id`` is echoed; other keys are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.sts.carrier import extract_class, from_digits
from gateway.sts.cipher import BlockCipher, make_cipher
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


def _hex_bytes(name: str, raw: object) -> bytes:
    if not isinstance(raw, str):
        raise InvalidKey(name, "<redacted>", "must be a hex string")
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise InvalidKey(name, "<redacted>", "must be an even number of hex digits") from None


def _meter_int(meter: Mapping[str, object], name: str) -> int:
    value = meter.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(name, value, f"meter.{name} is missing or not an integer")
    return value


def _meter_str(meter: Mapping[str, object], name: str) -> str:
    value = meter.get(name)
    if not isinstance(value, str):
        raise InvalidField(name, value, f"meter.{name} is missing or not a string of digits")
    return value


def _ea(line: Mapping[str, object]) -> int | None:
    meter = line.get("meter")
    for source in (meter if isinstance(meter, Mapping) else {}, line):
        value = source.get("ea")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidField("ea", value, "the encryption algorithm is 7 or 11")
            return value
    return None


def _tables(line: Mapping[str, object]) -> StaTables:
    raw = line.get("sta_tables", StaTables.REAL.value)
    try:
        return StaTables(str(raw))
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
        return derive_decoder_key(
            dkga=_meter_int(meter, "dkga"),
            vending_key=_hex_bytes("vending_key", meter.get("vending_key")),
            iin=_meter_str(meter, "iin"),
            drn=_meter_str(meter, "drn"),
            key_type=_meter_int(meter, "key_type"),
            sgc=_meter_str(meter, "sgc"),
            tariff_index=_meter_str(meter, "tariff_index"),
            krn=_meter_int(meter, "krn"),
            base_date=_meter_int(meter, "base_date"),
            ea=DEFAULT_EA if ea is None else ea,
        )
    if meter is not None:
        raise InvalidField("meter", "<object>", "meter must be an object")
    if "decoder_key" in line and line["decoder_key"] is not None:
        return _hex_bytes("decoder_key", line["decoder_key"])
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

    Raises:
        TokenFormatError: the token is not 20 digits or is >= 2**66.
        CrcMismatch: the CRC does not match under the line's key.
        UnsupportedToken: a class/subclass this engine does not know.
    """
    out: dict[str, object] = {"id": line.get("id")}
    token = line.get("token")
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
