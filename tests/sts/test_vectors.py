"""The public vectors (tests/sts/vectors/public.jsonl) through the library, both directions."""

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.sts.cipher import BlockCipher, make_cipher
from gateway.sts.dkga import derive_decoder_key
from gateway.sts.ea07 import StaTables
from gateway.sts.tokens import build_token, decode_token, fields_from_json

VECTORS = [
    json.loads(line)
    for line in (Path(__file__).parent / "vectors" / "public.jsonl").read_text().splitlines()
    if line.strip()
]
WITH_KEY = [v for v in VECTORS if v.get("meter") is not None]
WITH_TOKEN = [v for v in VECTORS if "token" in v]


def _derive(vector: dict[str, Any]) -> bytes:
    meter = vector["meter"]
    return derive_decoder_key(
        dkga=meter["dkga"],
        vending_key=bytes.fromhex(meter["vending_key"]),
        iin=meter["iin"],
        drn=meter["drn"],
        key_type=meter["key_type"],
        sgc=meter["sgc"],
        tariff_index=meter["tariff_index"],
        krn=meter["krn"],
        base_date=meter["base_date"],
        ea=meter.get("ea") or vector.get("ea") or 7,
    )


def _cipher(vector: dict[str, Any]) -> BlockCipher | None:
    if vector["ea"] is None:
        return None
    key = _derive(vector) if "meter" in vector else bytes.fromhex(vector["decoder_key"])
    return make_cipher(vector["ea"], key, sta_tables=StaTables(vector.get("sta_tables", "real")))


def _same_fields(actual: dict[str, Any], expected: dict[str, Any]) -> bool:
    """docs/sts-vectors.md: hex fields compare by value (any padding or case), the rest exactly."""
    if actual.keys() != expected.keys():
        return False
    return all(
        int(actual[k], 16) == int(want, 16) if isinstance(want, str) else actual[k] == want
        for k, want in expected.items()
    )


@pytest.mark.parametrize("vector", WITH_KEY, ids=[v["id"] for v in WITH_KEY])
def test_vector_decoder_key(vector: dict[str, Any]) -> None:
    """The meter's key attributes derive the vector's decoder key."""
    assert _derive(vector).hex() == vector["decoder_key"].lower()


@pytest.mark.parametrize("vector", WITH_TOKEN, ids=[v["id"] for v in WITH_TOKEN])
def test_vector_generates_its_token(vector: dict[str, Any]) -> None:
    """The vector's fields encode to its data block and encrypt to its 20 digits."""
    image = build_token(fields_from_json(vector["fields"]), _cipher(vector))
    assert image.data_block == int(vector["data_block"], 16)
    assert image.digits == vector["token"]


@pytest.mark.parametrize("vector", WITH_TOKEN, ids=[v["id"] for v in WITH_TOKEN])
def test_vector_token_decodes_to_its_fields(vector: dict[str, Any]) -> None:
    """The vector's 20 digits decrypt to its data block and decode to its fields."""
    image = decode_token(vector["token"], _cipher(vector))
    assert image.data_block == int(vector["data_block"], 16)
    assert _same_fields(image.fields.to_json(), vector["fields"])
