"""Meter registrations from a CSV file: parse and validate, row by row, without I/O.

The utility's meter list arrives as a spreadsheet export. Each row becomes a ``MeterRecord`` or a
list of ``RowProblem``s naming the line, the column, the value and what was wrong, so an operator
can fix the file and import again (valid rows are imported; importing twice updates in place).

Columns (header row required, names case-insensitive, in any order)::

    drn            decoder reference number: 11 digits (13 with IIN 0000), Luhn check digit
    customer_name  as the utility knows the customer
    sgc            supply group code, 6 digits (keep leading zeros: format the column as text)
    tariff_index   TI, 2 digits
    krn            key revision number, 1..9
    tariff_id      our tariff for the meter (must exist in the ledger)
    area           optional, default ""
    iin            optional, 600727 (or the legacy 0000)
    key_type       optional KT, 0..3, default 2 (DUTK)
    ea             optional encryption algorithm, 7 (STA, default) or 11 (MISTY1)
    dkga           optional decoder key generation algorithm, 2 or 4 (default)
    base_date      optional TID base date, 1993, 2014 (default) or 2035
    ken            optional key expiry number, 0..255, default 255 (never)
    status         optional, active (default) or blocked

Short names are accepted too: ``ti``, ``kt``, ``bd``, ``meter``/``meter_number`` for ``drn``,
``name`` for ``customer_name``, ``tariff`` for ``tariff_id``. A UTF-8 byte-order mark (Excel) is
ignored and the delimiter may be ``,``, ``;`` or a tab (taken from the header line). Field checks
reuse the STS engine's validators (``gateway.sts``), so the file is held to the same rules as a
vend.

```
MeterFileError               gateway.errors.GatewayError: the file as a whole cannot be read
                             (no header, unknown or duplicated column, missing required column)
```
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from gateway.errors import GatewayError
from gateway.ledger import MeterNumber, MeterRecord, MeterStatus
from gateway.sts import (
    InvalidField,
    MeterProfile,
    StsError,
    validate_base_date,
    validate_drn,
    validate_iin,
    validate_key_type,
    validate_krn,
    validate_sgc,
    validate_tariff_index,
)
from gateway.sts.cipher import encryption_algorithm

__all__ = [
    "COLUMNS",
    "REQUIRED_COLUMNS",
    "MeterFile",
    "MeterFileError",
    "ParsedRow",
    "RowProblem",
    "format_meters_csv",
    "parse_meters_csv",
]

#: Every column, in the order ``format_meters_csv`` writes them.
COLUMNS: Final = (
    "drn",
    "customer_name",
    "area",
    "iin",
    "sgc",
    "tariff_index",
    "krn",
    "key_type",
    "ea",
    "dkga",
    "base_date",
    "ken",
    "tariff_id",
    "status",
)
REQUIRED_COLUMNS: Final = frozenset(
    {"drn", "customer_name", "sgc", "tariff_index", "krn", "tariff_id"}
)
_ALIASES: Final[Mapping[str, str]] = {
    "ti": "tariff_index",
    "kt": "key_type",
    "bd": "base_date",
    "meter": "drn",
    "meter_number": "drn",
    "name": "customer_name",
    "tariff": "tariff_id",
}
_DEFAULTS: Final[Mapping[str, str]] = {
    "area": "",
    "iin": "600727",
    "key_type": "2",
    "ea": "7",
    "dkga": "4",
    "base_date": "2014",
    "ken": "255",
    "status": MeterStatus.ACTIVE.value,
}
_MAX_TEXT: Final = 100
_MAX_TARIFF_ID: Final = 64
_KEN_MAX: Final = 255
_DKGAS: Final = frozenset({2, 4})
_LEADING_ZERO_HINT: Final = " (a spreadsheet may have dropped a leading zero: format it as text)"


class MeterFileError(GatewayError):
    """The file as a whole cannot be read: its header is missing or wrong. Nothing is imported.

    Attributes:
        line: the line the problem is on (1 for the header).
    """

    def __init__(self, message: str, *, line: int = 1) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass(frozen=True, slots=True, kw_only=True)
class RowProblem:
    """One thing wrong with one row.

    Attributes:
        line: the line of the file the row starts on (the header is line 1).
        column: the column's canonical name, or ``"row"`` for the row as a whole.
        value: what the cell held.
        problem: what was expected, in the operator's words.
    """

    line: int
    column: str
    value: str
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column} ({self.value!r}): {self.problem}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedRow:
    """One data row: the meter it registers, or the problems that keep it out."""

    line: int
    meter: MeterRecord | None
    problems: tuple[RowProblem, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterFile:
    """Every data row of a file, in file order."""

    rows: tuple[ParsedRow, ...]

    @property
    def meters(self) -> list[MeterRecord]:
        """The valid rows' meters, in file order."""
        return [row.meter for row in self.rows if row.meter is not None]

    @property
    def problems(self) -> list[RowProblem]:
        """Every problem of every invalid row, in file order."""
        return [problem for row in self.rows for problem in row.problems]

    @property
    def invalid_rows(self) -> int:
        """How many rows were refused."""
        return sum(1 for row in self.rows if row.meter is None)


def _canonical(name: str) -> str:
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return _ALIASES.get(key, key)


def _delimiter(header_line: str) -> str:
    counts = {sep: header_line.count(sep) for sep in (",", ";", "\t")}
    return max(counts, key=lambda sep: counts[sep]) if any(counts.values()) else ","


def _records(text: str) -> Iterator[tuple[int, list[str]]]:
    """CSV records with the line each starts on (quoted fields may span lines)."""
    first_line = text.split("\n", 1)[0]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(first_line))
    start = 1
    try:
        for record in reader:
            yield start, record
            start = reader.line_num + 1
    except csv.Error as exc:
        raise MeterFileError(f"not readable as CSV: {exc}", line=reader.line_num) from exc


def _header(record: list[str]) -> list[str]:
    names = [_canonical(cell) for cell in record]
    seen: set[str] = set()
    for raw, name in zip(record, names, strict=True):
        if name not in COLUMNS:
            raise MeterFileError(
                f"unknown column {raw.strip()!r}; the columns are {', '.join(COLUMNS)}"
            )
        if name in seen:
            raise MeterFileError(f"column {name!r} appears twice")
        seen.add(name)
    missing = sorted(REQUIRED_COLUMNS - seen)
    if missing:
        raise MeterFileError(f"missing required column(s): {', '.join(missing)}")
    return names


def _integer(value: str) -> int:
    """A decimal integer as typed: digits only (``2``, ``07``); raises ValueError otherwise."""
    if not (value.isascii() and value.isdigit()):
        raise ValueError(value)
    return int(value)


class _Row:
    """Collects one row's values and problems."""

    def __init__(self, line: int, cells: Mapping[str, str]) -> None:
        self.line = line
        self.cells = cells
        self.problems: list[RowProblem] = []

    def refuse(self, column: str, problem: str) -> None:
        self.problems.append(
            RowProblem(
                line=self.line, column=column, value=self.cells.get(column, ""), problem=problem
            )
        )

    def text(self, column: str, *, limit: int = _MAX_TEXT, required: bool = False) -> str:
        value = self.cells.get(column, "")
        if required and not value:
            self.refuse(column, "required")
        elif len(value) > limit:
            self.refuse(column, f"at most {limit} characters")
        elif any(not ch.isprintable() for ch in value):
            self.refuse(column, "contains control characters")
        return value

    def digits(self, column: str, check: Callable[[str], str], *, width: int) -> str:
        value = self.cells.get(column, "")
        try:
            return check(value)
        except InvalidField as exc:
            hint = _LEADING_ZERO_HINT if value.isdigit() and len(value) < width else ""
            self.refuse(column, _reason(exc) + hint)
            return value

    def number(self, column: str, check: Callable[[int], object] | None = None) -> int:
        value = self.cells.get(column, "")
        try:
            number = _integer(value)
        except ValueError:
            self.refuse(column, "a whole number")
            return 0
        if check is not None:
            try:
                check(number)
            except StsError as exc:
                self.refuse(column, _reason(exc))
        return number


def _reason(exc: StsError) -> str:
    """The STS error's text without the ``field:`` prefix and ``(got …)`` suffix we add again."""
    text = str(exc)
    if isinstance(exc, InvalidField):
        text = text.removeprefix(f"{exc.field}: ")
        cut = text.rfind(" (got ")
        text = text[:cut] if cut > 0 else text
    return text


def _check_ken(ken: int) -> None:
    if not 0 <= ken <= _KEN_MAX:
        raise InvalidField("ken", ken, "a key expiry number is 0..255 (255: never expires)")


def _check_dkga(dkga: int) -> None:
    if dkga not in _DKGAS:
        raise InvalidField("dkga", dkga, "the decoder key generation algorithm is 2 or 4")


def _parse_row(line: int, cells: Mapping[str, str]) -> ParsedRow:
    row = _Row(line, cells)
    iin = row.digits("iin", validate_iin, width=4)
    drn_ok = not row.problems
    drn = row.text("drn", required=True)
    if drn and drn_ok:
        row.digits("drn", lambda value: validate_drn(value, iin), width=11 if len(iin) == 6 else 13)
    name = row.text("customer_name", required=True)
    area = row.text("area")
    sgc = row.digits("sgc", validate_sgc, width=6)
    tariff_index = row.digits("tariff_index", validate_tariff_index, width=2)
    krn = row.number("krn", validate_krn)
    key_type = row.number("key_type", validate_key_type)
    ea = row.number("ea", encryption_algorithm)
    dkga = row.number("dkga", _check_dkga)
    base_date = row.number("base_date", validate_base_date)
    ken = row.number("ken", _check_ken)
    tariff_id = row.text("tariff_id", limit=_MAX_TARIFF_ID, required=True)
    if dkga == 2 and ea == 11 and not row.problems:
        row.refuse("dkga", "DKGA02 derives keys for EA07 only; EA11 meters use DKGA04")
    status_text = cells.get("status", "").lower()
    if status_text not in {s.value for s in MeterStatus}:
        row.refuse("status", "active or blocked")
    if not row.problems:
        try:  # the engine's own check of the whole profile, for rules that span columns
            MeterProfile(
                drn=drn,
                iin=iin,
                sgc=sgc,
                tariff_index=tariff_index,
                krn=krn,
                key_type=key_type,
                base_date=base_date,
                ea=ea,
                dkga=dkga,
                ken=ken,
            )
        except StsError as exc:
            column = exc.field if isinstance(exc, InvalidField) else "row"
            row.refuse(column if column in COLUMNS else "row", _reason(exc))
    if row.problems:
        return ParsedRow(line=line, meter=None, problems=tuple(row.problems))
    meter = MeterRecord(
        drn=MeterNumber(drn),
        customer_name=name,
        area=area,
        iin=iin,
        sgc=sgc,
        tariff_index=tariff_index,
        krn=krn,
        key_type=key_type,
        ea=ea,
        dkga=dkga,
        base_date=base_date,
        ken=ken,
        tariff_id=tariff_id,
        status=MeterStatus(status_text),
    )
    return ParsedRow(line=line, meter=meter, problems=())


def parse_meters_csv(text: str) -> MeterFile:
    """Parse and validate a meter file (see the module docstring for its columns).

    Every data row is checked on its own: a bad row never hides the others. A DRN that appears
    on two rows is refused on the second. Blank lines are skipped.

    Args:
        text: the whole file, decoded (a leading byte-order mark is ignored).

    Raises:
        MeterFileError: the header is missing or names an unknown, duplicated or missing column,
            or the text is not CSV at all.
    """
    records = _records(text.removeprefix("\ufeff"))
    header: list[str] | None = None
    rows: list[ParsedRow] = []
    first_line: dict[str, int] = {}
    for line, record in records:
        if not any(cell.strip() for cell in record):
            continue
        if header is None:
            header = _header(record)
            continue
        if len(record) != len(header):
            rows.append(
                ParsedRow(
                    line=line,
                    meter=None,
                    problems=(
                        RowProblem(
                            line=line,
                            column="row",
                            value=",".join(record),
                            problem=f"has {len(record)} fields, the header has {len(header)}",
                        ),
                    ),
                )
            )
            continue
        cells = {
            **_DEFAULTS,
            **{name: cell.strip() for name, cell in zip(header, record, strict=True)},
        }
        for column, default in _DEFAULTS.items():
            if not cells[column]:
                cells[column] = default
        parsed = _parse_row(line, cells)
        meter = parsed.meter
        if meter is not None:
            earlier = first_line.setdefault(meter.drn, line)
            if earlier != line:
                problem = RowProblem(
                    line=line,
                    column="drn",
                    value=meter.drn,
                    problem=f"this meter is already on line {earlier}",
                )
                parsed = ParsedRow(line=line, meter=None, problems=(problem,))
        rows.append(parsed)
    if header is None:
        raise MeterFileError("the file is empty: it needs a header row naming the columns")
    return MeterFile(rows=tuple(rows))


def format_meters_csv(meters: list[MeterRecord]) -> str:
    """Meters as CSV that ``parse_meters_csv`` reads back to the same records (no ``last_tid``)."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for meter in meters:
        writer.writerow(
            [
                meter.drn,
                meter.customer_name,
                meter.area,
                meter.iin,
                meter.sgc,
                meter.tariff_index,
                meter.krn,
                meter.key_type,
                meter.ea,
                meter.dkga,
                meter.base_date,
                meter.ken,
                meter.tariff_id,
                meter.status.value,
            ]
        )
    return out.getvalue()
