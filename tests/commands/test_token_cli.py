"""``gateway token …``: the batch contract of docs/sts-vectors.md and the engineer commands."""

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cli import main
from gateway.commands.token import run_batch

VECTOR_FILE = Path(__file__).parents[1] / "sts" / "vectors" / "public.jsonl"
VECTORS = [json.loads(line) for line in VECTOR_FILE.read_text().splitlines() if line.strip()]
VK = "abababababababab949494949494949401234567"
METER = ["--vending-key", VK, "--drn", "00000000000", "--sgc", "201457", "--ti", "01", "--krn", "1"]


def _batch(lines: list[str], *options: str, tmp_path: Path) -> tuple[int, list[dict[str, Any]]]:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "batch", str(source), *options],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


def _same_fields(actual: dict[str, Any], expected: dict[str, Any]) -> bool:
    if actual.keys() != expected.keys():
        return False
    return all(
        int(actual[k], 16) == int(want, 16) if isinstance(want, str) else actual[k] == want
        for k, want in expected.items()
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every public vector through ``gateway token batch`` once (one process)."""
    code, out = _batch(
        [json.dumps(v) for v in VECTORS], tmp_path=tmp_path_factory.mktemp("generate")
    )
    assert code == 0
    return {line["id"]: line for line in out}


@pytest.fixture(scope="module")
def decoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every public vector with a token through ``gateway token batch --decode`` once."""
    lines = [json.dumps(v) for v in VECTORS if "token" in v]
    code, out = _batch(lines, "--decode", tmp_path=tmp_path_factory.mktemp("decode"))
    assert code == 0
    return {line["id"]: line for line in out}


@pytest.mark.parametrize("vector", VECTORS, ids=[v["id"] for v in VECTORS])
def test_batch_generates_each_vector(
    vector: dict[str, Any], generated: dict[str, dict[str, Any]]
) -> None:
    """Generating gives the vector's decoder key, data block and token, echoing its id."""
    out = generated[vector["id"]]
    if vector.get("fields", {}).get("class") == 1:
        assert out["decoder_key"] is None
    else:
        assert out["decoder_key"] == vector["decoder_key"].lower()
    assert out.get("token") == vector.get("token")
    assert out.get("data_block") == vector.get("data_block")


TOKENS = [v for v in VECTORS if "token" in v]


@pytest.mark.parametrize("vector", TOKENS, ids=[v["id"] for v in TOKENS])
def test_batch_decodes_each_vector(
    vector: dict[str, Any], decoded: dict[str, dict[str, Any]]
) -> None:
    """Decoding gives the vector's data block and fields."""
    out = decoded[vector["id"]]
    assert out["data_block"] == vector["data_block"]
    assert _same_fields(out["fields"], vector["fields"])


def _one(line: str, *, decode: bool = False) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    failures = run_batch([line], out, decode=decode)
    return failures, json.loads(out.getvalue())


V006 = next(v for v in VECTORS if v["id"] == "v006")
V464 = next(v for v in VECTORS if v["id"] == "v464")


def _variant(base: dict[str, Any], **changes: Any) -> str:
    line = json.loads(json.dumps(base))
    for path, value in changes.items():
        target = line
        *parents, leaf = path.split("__")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return json.dumps(line)


@pytest.mark.parametrize(
    ("line", "decode", "message"),
    [
        ('{"id": "x", "fields": ', False, "not valid JSON"),
        (_variant(V006, meter__ea=9, ea=9), False, "EA09"),
        (_variant(V006, ea=9), False, "EA09"),
        (_variant(V006, ea=9), True, "EA09"),
        (_variant(V006, ea=11), False, "does not match meter.ea"),
        (_variant(V006, meter__dkga=1), False, "DKGA01"),
        (_variant(V006, meter__dkga=3), False, "DKGA03"),
        (_variant(V464, meter__vending_key="abababababababaa"), False, "parity"),
        (_variant(V006, meter__vending_key=VK[2:]), False, "20 bytes (40 hex digits), got 38"),
        (_variant(V006, meter__vending_key=VK[:-1]), True, "20 bytes (40 hex digits), got 39"),
        (_variant(V464, meter__vending_key="0" + VK[:14]), False, "8 bytes (16 hex digits)"),
        (_variant(V006, fields__amount=18201625), False, "largest encodable"),
        (_variant(V006, fields__tid=2**24), False, "24 bits"),
        (_variant(V006, token="7063050347002872611"), True, "20 digits"),
        (_variant(V006, token="73786976294838206464"), True, "2**66"),
        (_variant(V006, token="70630503470028726115"), True, "CRC"),
    ],
    ids=[
        "invalid-json",
        "ea09",
        "ea09-line-only",
        "ea09-line-only-decode",
        "ea-mismatch",
        "dkga01",
        "dkga03",
        "dkga02-parity",
        "dkga04-short-vending-key",
        "dkga04-vending-key-digit-lost-decode",
        "dkga02-short-vending-key",
        "amount",
        "tid",
        "short-token",
        "token-too-large",
        "crc",
    ],
)
def test_batch_line_errors_are_named(line: str, decode: bool, message: str) -> None:
    """Each kind of bad line gets its own error sentence and counts as a failure."""
    failures, out = _one(line, decode=decode)
    assert failures == 1
    assert message.lower() in out["error"].lower()
    assert out["error"].endswith(".")


def test_batch_goes_on_after_a_bad_line_and_fails_overall(tmp_path: Path) -> None:
    """A bad line gives an error object, later lines are still processed, exit status is 1."""
    code, out = _batch(["not json", json.dumps(V006)], tmp_path=tmp_path)
    assert code == 1
    assert "error" in out[0]
    assert out[1]["token"] == V006["token"]


def test_batch_reads_standard_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a file, batch reads JSON lines from stdin."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(V006) + "\n"))
    assert main(["token", "batch"]) == 0
    assert json.loads(capsys.readouterr().out)["token"] == V006["token"]


# --- engineer commands ------------------------------------------------------------------------


def test_credit_command_issues_the_worked_example_token_content(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`credit --kwh 0.1` at 2014-03-01 13:00 gives a token that decodes to TID 85740, 1 unit."""
    assert (
        main(["token", "credit", *METER, "--kwh", "0.1", "--at", "2014-03-01T13:00", "--json"]) == 0
    )
    issued = json.loads(capsys.readouterr().out)
    assert (issued["tid"], issued["units"]) == (85740, 1)
    assert main(["token", "decode", issued["token"], *METER, "--json"]) == 0
    fields = json.loads(capsys.readouterr().out)["fields"]
    assert (fields["tid"], fields["amount"]) == (85740, 1)


def test_credit_rounds_kwh_up(capsys: pytest.CaptureFixture[str]) -> None:
    """2000.01 kWh is 20000.1 base units: 20001 asked, 20004 carried (rounded up)."""
    assert main(["token", "credit", *METER, "--kwh", "2000.01", "--tid", "100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["units"] == 20004


def test_decoder_key_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`decoder-key` prints the DKGA04 key of docs/sts.md §6.3."""
    assert main(["token", "decoder-key", *METER]) == 0
    assert capsys.readouterr().out.strip() == "87f3ecbb2e46b48f"


def test_key_change_command_reproduces_ctsa05(capsys: pytest.CaptureFixture[str]) -> None:
    """TI 01 -> 02 gives the two CTSA05 step 1 tokens of docs/sts.md §9."""
    assert main(["token", "key-change", *METER, "--new-ti", "02", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == ["06510894141453018386", "22979178279997208272"]


def test_key_change_rollover_sets_ro(capsys: pytest.CaptureFixture[str]) -> None:
    """Moving to base date 2035, KRN 6, SGC 203557 (two tokens) gives docs/sts.md §9's RO=1 pair."""
    argv = ["token", "key-change", *METER, "--new-ti", "02", "--new-krn", "6"]
    argv += ["--new-sgc", "203557", "--new-base-date", "2035", "--no-three-kct", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == ["65413070543688156280", "27469374567476953413"]


def test_test_command_builds_the_published_test_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    """Test 1 and 'all tests' (subclass 0) are the published class 1 tokens."""
    assert main(["token", "test", "--test", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token"] == "00000000000150997584"
    assert main(["token", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token"] == "56493153725450313471"


def test_decode_class_1_needs_no_key(capsys: pytest.CaptureFixture[str]) -> None:
    """A test token decodes without any key option, as readable text."""
    assert main(["token", "decode", "5649 3153 7254 5031 3471"]) == 0
    assert "control: fffffffff" in capsys.readouterr().out


def test_exhausted_base_date_fails_with_the_rollover_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A credit on a 1993 key in 2025 exits 1 and says a rollover key change is needed."""
    argv = [
        "token",
        "credit",
        *METER,
        "--kwh",
        "1",
        "--base-date",
        "1993",
        "--at",
        "2025-01-01T00:00",
    ]
    assert main(argv) == 1
    assert "rollover" in capsys.readouterr().err


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
KEYS = st.sampled_from(["id", "meter", "decoder_key", "ea", "sta_tables", "fields", "token"])
FIELD_KEYS = st.sampled_from(
    ["class", "subclass", "rnd", "tid", "amount", "register", "value", "control", "nkho", "payload"]
)


def _mutated_vector(vector: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    line: dict[str, Any] = json.loads(json.dumps(vector))
    key = data.draw(KEYS)
    if key == "fields" and isinstance(line.get("fields"), dict) and data.draw(st.booleans()):
        line["fields"][data.draw(FIELD_KEYS)] = data.draw(JSON_VALUES)
    elif key == "meter" and isinstance(line.get("meter"), dict):
        line["meter"][data.draw(st.sampled_from(sorted(line["meter"])))] = data.draw(JSON_VALUES)
    else:
        line[key] = data.draw(JSON_VALUES)
    return line


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(vector=st.sampled_from(VECTORS), data=st.data(), decode=st.booleans())
def test_batch_never_crashes_on_a_malformed_line(
    vector: dict[str, Any], data: st.DataObject, decode: bool
) -> None:
    """Whatever a line holds, batch answers it with a result or an error object, never a crash."""
    line = json.dumps(_mutated_vector(vector, data))
    out = io.StringIO()
    run_batch([line], out, decode=decode)
    answer = json.loads(out.getvalue())
    assert "error" in answer or ("token" in answer or "fields" in answer)


def test_vending_key_can_come_from_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--vending-key-file reads the hex key from a file instead of the command line."""
    key_file = tmp_path / "vk.hex"
    key_file.write_text(VK + "\n")
    argv = ["token", "decoder-key", "--vending-key-file", str(key_file), *METER[2:]]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == "87f3ecbb2e46b48f"


# --- input tolerance (conformance review): hex by value, numbers for digit strings ----------

V002 = next(v for v in VECTORS if v["id"] == "v002")  # sample tables, DK 0abc12def3456789
V191 = next(v for v in VECTORS if v["id"] == "v191")  # class 1, token 00000000000150997584
EA11 = next(v for v in VECTORS if v["ea"] == 11 and "token" in v)
V012 = next(v for v in VECTORS if v["id"] == "v012")  # IIN 0000, 13-digit DRN


def _without_meter(vector: dict[str, Any], **changes: Any) -> str:
    line = {k: v for k, v in vector.items() if k != "meter"}
    line.update(changes)
    return json.dumps(line)


@pytest.mark.parametrize(
    ("line", "vector"),
    [
        (_without_meter(V002, decoder_key="abc12def3456789"), V002),
        (_without_meter(V002, decoder_key="0xABC12DEF3456789"), V002),
        (_without_meter(EA11, decoder_key=EA11["decoder_key"].lstrip("0").upper()), EA11),
        (_without_meter(V006, sta_tables=None), V006),
        (_without_meter(V002, sta_tables="SAMPLE"), V002),
        (_variant(V006, meter__sgc=201457, meter__tariff_index=1), V006),
        (_variant(V006, meter__drn=0, meter__iin=600727), V006),
        (_variant(V012, meter__drn=int(V012["meter"]["drn"]), meter__iin=0), V012),
        (_variant(V006, meter__vending_key="0x" + VK.upper()), V006),
        (_variant(V006, ea="07", meter__ea="EA07", meter__dkga="04", meter__krn="1"), V006),
        (_variant(V006, fields__tid="85740", fields__amount="1", fields__rnd="5"), V006),
        (_variant(V006, meter__base_date="14"), V006),
    ],
    ids=[
        "dk-unpadded",
        "dk-0x-upper",
        "ea11-dk-unpadded-upper",
        "sta-tables-null",
        "sta-tables-upper",
        "sgc-ti-numbers",
        "drn-iin-numbers",
        "legacy-iin-numbers",
        "vk-0x-upper",
        "codes-as-strings",
        "fields-decimal-strings",
        "base-date-two-digits",
    ],
)
def test_batch_generate_takes_values_in_any_reasonable_spelling(
    line: str, vector: dict[str, Any]
) -> None:
    """Hex by value (any case, padding, 0x) and numbers for digit strings give the vector."""
    failures, out = _one(line)
    assert failures == 0, out
    assert out["token"] == vector["token"]
    assert out["decoder_key"] == vector["decoder_key"].lower()


def test_batch_dkga02_meter_needs_no_base_date() -> None:
    """DKGA02 does not hash the base date, so a meter object without one still derives the key."""
    meter = {k: v for k, v in V464["meter"].items() if k != "base_date"}
    failures, out = _one(json.dumps({**V464, "meter": meter}))
    assert failures == 0, out
    assert out["decoder_key"] == V464["decoder_key"]


def test_batch_decode_takes_a_token_given_as_a_number() -> None:
    """A token written as a JSON number is the 20 digits zero-padded (class 1 starts 000…)."""
    failures, out = _one(_without_meter(V191, token=int(V191["token"])), decode=True)
    assert failures == 0, out
    assert out["data_block"] == V191["data_block"]
    assert _same_fields(out["fields"], V191["fields"])


KEY_ONLY = [v for v in VECTORS if v.get("kind") == "decoder-key-only"]


@pytest.mark.parametrize("vector", KEY_ONLY, ids=[v["id"] for v in KEY_ONLY])
def test_batch_decode_answers_a_decoder_key_only_line_with_its_key(
    vector: dict[str, Any],
) -> None:
    """A decoder-key-only vector fed to --decode gives its key, null block and fields, no error."""
    failures, out = _one(json.dumps(vector), decode=True)
    assert failures == 0, out
    assert out == {
        "id": vector["id"],
        "decoder_key": vector["decoder_key"],
        "data_block": None,
        "fields": None,
    }


def test_batch_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark before the first line is not part of its JSON."""
    source = tmp_path / "bom.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + json.dumps(V006).encode() + b"\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "batch", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["token"] == V006["token"]


def test_batch_line_with_an_unexpected_failure_does_not_end_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception outside the engine's error tree becomes that line's error; the rest goes on."""
    from gateway.sts import batch  # noqa: PLC0415 - the module whose function is replaced

    real = batch.generate

    def flaky(line: dict[str, Any]) -> dict[str, object]:
        if line.get("id") == "boom":
            raise ValueError("unexpected")
        return real(line)

    monkeypatch.setattr(batch, "generate", flaky)
    out = io.StringIO()
    failures = run_batch([json.dumps({**V006, "id": "boom"}), json.dumps(V006)], out, decode=False)
    first, second = (json.loads(text) for text in out.getvalue().splitlines())
    assert failures == 1
    assert first["id"] == "boom"
    assert "could not be processed" in first["error"]
    assert second["token"] == V006["token"]


def test_batch_on_standard_input_survives_a_bad_byte_and_a_byte_order_mark() -> None:
    """Bytes that are not UTF-8 spoil only their own line; a leading BOM is not JSON."""
    data = b"\xef\xbb\xbf" + json.dumps(V006).encode() + b'\n{"id": "\xff"}\n'
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "batch"],
        input=data,
        capture_output=True,
        check=False,
    )
    first, second = (json.loads(text) for text in result.stdout.decode().splitlines())
    assert result.returncode == 1
    assert first["token"] == V006["token"]
    assert second["id"] == "\ufffd"
    assert "error" in second


def test_a_dkga02_change_of_base_date_alone_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """DKGA02 ignores the base date: 1993 -> 2014 alone would send the current key with RO = 1.

    Issue 16: the meter would forget its TIDs and take its old tokens again; refused, naming why.
    """
    argv = ["token", "key-change", "--vending-key", "abababababababab", "--dkga", "2"]
    argv += ["--drn", "00000000000", "--sgc", "123456", "--ti", "01", "--krn", "1"]
    argv += ["--base-date", "1993", "--new-base-date", "2014", "--json"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "DKGA02 does not derive the key from the base date" in captured.err
    assert main([*argv[:-3], "--new-krn", "2", *argv[-3:]]) == 0  # with a new KRN it is a new key
