"""``gateway token …``: STS tokens from the command line, for engineers and conformance checks.

```
gateway token batch [FILE] [--decode]        JSON lines in and out (docs/sts-vectors.md)
gateway token credit  KEY… --kwh 12.5        a credit token (or --units N, --subclass S)
gateway token decode  TOKEN [KEY…]           what a token says (class 1 needs no key)
gateway token decoder-key KEY…               the meter's decoder key (hex)
gateway token key-change KEY… --new-…        the ordered key-change set
gateway token test [--test N]…               a class 1 test/display token
```

KEY… is the meter's key attributes (``--drn --sgc --ti --krn`` … with ``--vending-key``), or
``--decoder-key`` directly. Output is text by default, one JSON object with ``--json``. The
exit status is 0 on success, 1 if anything failed (for ``batch``: if any line failed).
"""

from __future__ import annotations

import argparse
import io
import json
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import IO, TextIO

from gateway.sts import batch
from gateway.sts.amount import round_currency, round_units
from gateway.sts.carrier import group_digits
from gateway.sts.cipher import BlockCipher, make_cipher
from gateway.sts.dkga import derive_decoder_key
from gateway.sts.ea07 import StaTables
from gateway.sts.errors import InvalidField, InvalidKey, KeyExpired, StsError
from gateway.sts.keychange import KeyAttributes, key_change_fields
from gateway.sts.tid import next_tid
from gateway.sts.tokens import (
    CreditSubclass,
    CurrencyCredit,
    MeterTest,
    TokenClass,
    TokenFields,
    UnitsCredit,
    build_token,
    decode_token,
)

# Base units per natural unit: 0.1 kWh / m³ / min for subclasses 0-3, 0.00001 for currency.
_UNITS_PER = {False: Decimal(10), True: Decimal(100_000)}
_UNIT_NAMES = {0: "kWh", 1: "m³", 2: "m³", 3: "min"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``token`` command group."""
    parser = subparsers.add_parser(
        "token", help="STS tokens: batch conformance, credit, decode, key change, test"
    )
    commands = parser.add_subparsers(dest="token_command", metavar="COMMAND", required=True)

    p = commands.add_parser("batch", help="JSON lines in, JSON lines out (docs/sts-vectors.md)")
    p.add_argument("file", nargs="?", default="-", help="JSON Lines file (default: stdin)")
    p.add_argument("--decode", action="store_true", help="decode tokens instead of generating")
    p.set_defaults(handler=_batch)

    p = commands.add_parser("credit", help="a credit token for a meter")
    _key_options(p)
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--kwh", type=Decimal, help="amount in kWh (or m³, min, currency)")
    amount.add_argument("--units", type=int, help="amount in base units (0.1 kWh …)")
    p.add_argument("--subclass", type=int, default=0, help="0 electricity … 4-7 currency")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--tid", type=int, help="token identifier (default: from --at)")
    when.add_argument("--at", type=_timestamp, help="issue time, ISO 8601 (default: now, UTC)")
    p.add_argument("--last-tid", type=int, help="the meter's last TID (next one is later)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_credit)

    p = commands.add_parser("decode", help="what a token says")
    p.add_argument("token", help="20 digits (spaces or dashes allowed)")
    _key_options(p, required=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_decode)

    p = commands.add_parser("decoder-key", help="the meter's decoder key")
    _key_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_decoder_key)

    p = commands.add_parser("key-change", help="the key-change token set")
    _key_options(p)
    p.add_argument("--new-vending-key", help="hex (default: the same vending key)")
    p.add_argument("--new-sgc")
    p.add_argument("--new-ti")
    p.add_argument("--new-krn", type=int)
    p.add_argument("--new-kt", type=int)
    p.add_argument("--new-ken", type=int)
    p.add_argument("--new-base-date", type=int)
    p.add_argument(
        "--rollover",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="RO flag (default: set when the base date changes)",
    )
    p.add_argument(
        "--three-kct",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="EA07 3-token set with the SGC section, 3KCT = 1 (default: the two-token set)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_key_change)

    p = commands.add_parser("test", help="a class 1 test/display token")
    p.add_argument("--test", type=int, action="append", default=[], help="test n (repeat)")
    p.add_argument("--control", help="raw control field, hex (default: all tests)")
    p.add_argument("--manufacturer-code", type=int, default=0)
    p.add_argument("--subclass", type=int, default=0, help="0: 2-digit, 1: 4-digit code")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_test)


def _timestamp(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _key_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_argument_group("meter key (either --decoder-key, or the attributes)")
    group.add_argument("--decoder-key", help="the decoder key, hex")
    group.add_argument("--vending-key", help="the vending key, hex (8 bytes DKGA02, 20 DKGA04)")
    group.add_argument(
        "--vending-key-file",
        help="read the vending key (hex) from this file, keeping it out of the process list",
    )
    group.add_argument("--dkga", type=int, default=4)
    group.add_argument("--iin", default="600727")
    group.add_argument("--drn", help="meter number, 11 digits (13 with IIN 0000)")
    group.add_argument("--sgc", help="supply group code, 6 digits")
    group.add_argument("--ti", help="tariff index, 2 digits")
    group.add_argument("--krn", type=int, help="key revision number, 1-9")
    group.add_argument("--kt", type=int, default=2, help="key type (default 2, DUTK)")
    group.add_argument("--base-date", type=int, default=2014)
    group.add_argument("--ea", type=int, default=7, help="7 (STA) or 11 (MISTY1)")
    group.add_argument("--ken", type=int, default=255, help="key expiry number")
    group.add_argument("--sample-tables", action="store_true", help="IEC sample STA tables")
    parser.set_defaults(key_required=required)


@dataclass(frozen=True, slots=True)
class _MeterKey:
    decoder_key: bytes
    cipher: BlockCipher
    attributes: KeyAttributes | None


def _attributes(args: argparse.Namespace) -> KeyAttributes:
    for name in ("sgc", "ti", "krn"):
        if getattr(args, name) is None:
            raise InvalidField(name, None, f"--{name} is needed with --vending-key")
    return KeyAttributes(
        key_type=args.kt,
        krn=args.krn,
        tariff_index=args.ti,
        sgc=args.sgc,
        ea=args.ea,
        ken=args.ken,
        base_date=args.base_date,
    )


def _hex(name: str, text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidKey(name, "<redacted>", "must be hexadecimal") from None


def _derive(args: argparse.Namespace, vending_key: str, attributes: KeyAttributes) -> bytes:
    if args.drn is None:
        raise InvalidField("drn", None, "--drn is needed with --vending-key")
    return derive_decoder_key(
        dkga=args.dkga,
        vending_key=_hex("vending_key", vending_key),
        iin=args.iin,
        drn=args.drn,
        key_type=attributes.key_type,
        sgc=attributes.sgc,
        tariff_index=attributes.tariff_index,
        krn=attributes.krn,
        base_date=attributes.base_date,
        ea=attributes.ea,
    )


def _read_key_file(args: argparse.Namespace) -> None:
    if args.vending_key_file is None:
        return
    try:
        with open(args.vending_key_file, encoding="ascii") as handle:  # noqa: PTH123
            args.vending_key = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidKey(
            "vending_key", "<redacted>", f"cannot read {args.vending_key_file}: {exc}"
        ) from None


def _meter_key(args: argparse.Namespace) -> _MeterKey | None:
    _read_key_file(args)
    tables = StaTables.SAMPLE if args.sample_tables else StaTables.REAL
    if args.decoder_key is not None:
        key = _hex("decoder_key", args.decoder_key)
        return _MeterKey(key, make_cipher(args.ea, key, sta_tables=tables), None)
    if args.vending_key is None:
        if args.key_required:
            raise InvalidKey("decoder_key", None, "give --decoder-key or --vending-key")
        return None
    attributes = _attributes(args)
    key = _derive(args, args.vending_key, attributes)
    return _MeterKey(key, make_cipher(args.ea, key, sta_tables=tables), attributes)


def _print(args: argparse.Namespace, data: dict[str, object], lines: Iterable[str]) -> None:
    if args.json:
        print(json.dumps(data))
    else:
        for line in lines:
            print(line)


def _run(handler_body: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    try:
        handler_body(args)
    except StsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# --- batch ------------------------------------------------------------------------------------


def _open_lines(path: str) -> Iterator[str]:
    if path == "-":
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:  # a text stream without bytes underneath (tests, embedding)
            yield from sys.stdin
            return
        # Same decoding as a file: UTF-8, a bad byte spoils its own line only.
        text = io.TextIOWrapper(buffer, encoding="utf-8", errors="replace")
        try:
            yield from text
        finally:
            text.detach()  # leave sys.stdin open
        return
    # utf-8-sig: a byte-order mark some editors write is not part of the first line's JSON;
    # undecodable bytes become U+FFFD so that line fails on its own, not the whole batch.
    with open(path, encoding="utf-8-sig", errors="replace") as handle:  # noqa: PTH123 - a plain text file
        yield from handle


def run_batch(lines: Iterable[str], out: TextIO | IO[str], *, decode: bool) -> int:
    """Process JSON lines per docs/sts-vectors.md, writing one JSON line per input line to ``out``.

    Blank lines are skipped. Returns the number of lines that failed.
    """
    failures = 0
    process = batch.decode if decode else batch.generate
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        line_id: object = None
        try:
            line = json.loads(text.lstrip("\ufeff"))
        except json.JSONDecodeError as exc:
            result: dict[str, object] = {
                "id": None,
                "error": f"line {number} is not valid JSON: {exc.msg} (column {exc.colno}).",
            }
        except RecursionError:
            result = {"id": None, "error": f"line {number} is nested too deeply to read."}
        else:
            if isinstance(line, dict):
                line_id = line.get("id")
                try:
                    result = process(line)
                except StsError as exc:
                    result = {"id": line_id, "error": _sentence(str(exc))}
                except Exception as exc:  # noqa: BLE001 - one odd line must not end the batch
                    result = {
                        "id": line_id,
                        "error": f"line {number} could not be processed ({type(exc).__name__}).",
                    }
            else:
                result = {"id": None, "error": f"line {number} is not a JSON object."}
        if "error" in result:
            failures += 1
        out.write(json.dumps(result) + "\n")
    return failures


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith(".") else text + "."


def _batch(args: argparse.Namespace) -> int:
    try:
        failures = run_batch(_open_lines(args.file), sys.stdout, decode=args.decode)
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    return 1 if failures else 0


# --- credit -----------------------------------------------------------------------------------


def _credit(args: argparse.Namespace) -> int:
    return _run(_credit_body, args)


def _credit_body(args: argparse.Namespace) -> None:
    meter = _meter_key(args)
    assert meter is not None  # noqa: S101 - key_required
    subclass = CreditSubclass(args.subclass) if 0 <= args.subclass <= 7 else None
    if subclass is None:
        raise InvalidField("subclass", args.subclass, "credit subclasses are 0..7")
    if args.units is not None:
        units = args.units
    else:
        try:
            scaled = args.kwh * _UNITS_PER[subclass.is_currency]
            units = int(scaled.to_integral_value(rounding=ROUND_CEILING))
        except InvalidOperation:
            raise InvalidField("amount", args.kwh, "not a number") from None
    if args.tid is not None:
        tid = args.tid
    else:
        at = args.at if args.at is not None else datetime.now(UTC)
        tid = next_tid(at, args.base_date, args.last_tid)
    if tid >> 16 > args.ken:
        raise KeyExpired(tid, args.ken)
    fields: TokenFields
    if subclass.is_currency:
        fields = CurrencyCredit(subclass=subclass, tid=tid, amount=units)
    else:
        fields = UnitsCredit(subclass=subclass, rnd=secrets.randbelow(16), tid=tid, amount=units)
    image = build_token(fields, meter.cipher)
    carried = round_currency(units) if subclass.is_currency else round_units(units)
    natural = Decimal(carried) / _UNITS_PER[subclass.is_currency]
    unit = "currency units" if subclass.is_currency else _UNIT_NAMES[subclass]
    _print(
        args,
        {"token": image.digits, "tid": tid, "subclass": int(subclass), "units": carried},
        [
            group_digits(image.digits),
            (
                f"{subclass.name.lower()} credit {natural.normalize():f} {unit}"
                f" ({carried} base units), TID {tid}"
            ),
        ],
    )


# --- decode -----------------------------------------------------------------------------------


def _decode(args: argparse.Namespace) -> int:
    return _run(_decode_body, args)


def _decode_body(args: argparse.Namespace) -> None:
    meter = _meter_key(args)
    image = decode_token(args.token, meter.cipher if meter is not None else None)
    fields = image.fields.to_json()
    _print(
        args,
        {"data_block": f"{image.data_block:016x}", "fields": fields},
        [
            f"class {TokenClass(image.token_class).name.lower()}, {type(image.fields).__name__}",
            *(f"  {k}: {v}" for k, v in fields.items() if k != "class"),
            f"  data block: {image.data_block:016x}",
        ],
    )


# --- decoder key ------------------------------------------------------------------------------


def _decoder_key(args: argparse.Namespace) -> int:
    return _run(_decoder_key_body, args)


def _decoder_key_body(args: argparse.Namespace) -> None:
    meter = _meter_key(args)
    assert meter is not None  # noqa: S101 - key_required
    _print(args, {"decoder_key": meter.decoder_key.hex()}, [meter.decoder_key.hex()])


# --- key change -------------------------------------------------------------------------------


def _key_change(args: argparse.Namespace) -> int:
    return _run(_key_change_body, args)


def _key_change_body(args: argparse.Namespace) -> None:
    _read_key_file(args)
    if args.vending_key is None:
        raise InvalidKey("vending_key", None, "a key change needs --vending-key")
    meter = _meter_key(args)
    assert meter is not None  # noqa: S101 - key_required
    assert meter.attributes is not None  # noqa: S101 - built from a vending key
    old = meter.attributes
    new = KeyAttributes(
        key_type=old.key_type if args.new_kt is None else args.new_kt,
        krn=old.krn if args.new_krn is None else args.new_krn,
        tariff_index=old.tariff_index if args.new_ti is None else args.new_ti,
        sgc=old.sgc if args.new_sgc is None else args.new_sgc,
        ea=old.ea,
        ken=old.ken if args.new_ken is None else args.new_ken,
        base_date=old.base_date if args.new_base_date is None else args.new_base_date,
    )
    new_key = _derive(args, args.new_vending_key or args.vending_key, new)
    fields = key_change_fields(
        old=old,
        new=new,
        new_key=new_key,
        rollover=args.rollover,
        three_kct=args.three_kct,
        old_key=meter.decoder_key,
    )
    images = [build_token(f, meter.cipher) for f in fields]
    _print(
        args,
        {
            "tokens": [i.digits for i in images],
            "subclasses": [i.fields.subclass for i in images],
        },
        [f"{group_digits(i.digits)}   (subclass {i.fields.subclass})" for i in images],
    )


# --- test -------------------------------------------------------------------------------------


def _test(args: argparse.Namespace) -> int:
    return _run(_test_body, args)


def _test_body(args: argparse.Namespace) -> None:
    width = 36 if args.subclass == 0 else 28
    if args.control is not None:
        control = int(_hex_digits("control", args.control), 16)
    elif args.test:
        control = 0
        for number in args.test:
            if not 1 <= number <= width:
                raise InvalidField("test", number, f"tests are numbered 1..{width}")
            control |= 1 << (number - 1)
    else:
        control = (1 << width) - 1  # all ones: every test
    fields = MeterTest(
        subclass=args.subclass, control=control, manufacturer_code=args.manufacturer_code
    )
    image = build_token(fields, None)
    _print(
        args,
        {"token": image.digits, "control": f"{control:x}"},
        [group_digits(image.digits), f"test/display control {control:x}"],
    )


def _hex_digits(name: str, text: str) -> str:
    try:
        int(text, 16)
    except ValueError:
        raise InvalidField(name, text, "must be hexadecimal") from None
    return text
