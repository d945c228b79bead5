"""``gateway meters …`` and the CSV rules behind it (``gateway.meters_csv``)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cli import main
from gateway.commands.meters import Progress, import_meters
from gateway.ledger import MeterNumber, MeterRecord, MeterStatus, NotFound, open_ledger
from gateway.meters_csv import (
    COLUMNS,
    MeterFileError,
    format_meters_csv,
    parse_meters_csv,
)
from gateway.sts.pan import luhn_check_digit
from gateway.tariff import Tariff

EXAMPLE = Path(__file__).parents[2] / "docs" / "meters.csv.example"
HEADER = "drn,customer_name,sgc,tariff_index,krn,tariff_id"


def drn(serial: int) -> str:
    """A valid 11-digit DRN for a serial number."""
    body = f"{serial:010d}"
    return body + luhn_check_digit(body)


def tariff(tariff_id: str) -> Tariff:
    """A tariff that exists only to be referred to."""
    return Tariff(
        tariff_id=tariff_id,
        name=tariff_id.title(),
        currency="KES",
        price_per_kwh_minor=2500,
        min_purchase_minor=1000,
        max_purchase_minor=1_000_000,
    )


@pytest.fixture
def database(tmp_path: Path) -> str:
    """A migrated ledger file with the tariffs ``domestic`` and ``commercial``."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"

    async def seed() -> None:
        async with open_ledger(url) as ledger:
            await ledger.put_tariff(tariff("domestic"))
            await ledger.put_tariff(tariff("commercial"))

    asyncio.run(seed())
    return url


def registered(url: str, number: str) -> MeterRecord | None:
    """The meter as the ledger has it, or None."""

    async def read() -> MeterRecord | None:
        async with open_ledger(url) as ledger:
            try:
                return await ledger.get_meter(number)
            except NotFound:
                return None

    return asyncio.run(read())


def run_import(
    path: Path, url: str, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[int, dict[str, object]]:
    """``gateway meters import PATH --json``: the exit status and the JSON report."""
    code = main(["meters", "import", str(path), "--database-url", url, "--json", *options])
    return code, json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------- parsing

_NAMES = st.text(
    alphabet=st.characters(categories=("L", "N", "P"), include_characters=" "),
    min_size=1,
    max_size=40,
).map(str.strip)


@st.composite
def meters(draw: st.DrawFn) -> MeterRecord:
    """Any meter registration the rules allow."""
    ea = draw(st.sampled_from([7, 11]))
    return MeterRecord(
        drn=MeterNumber(drn(draw(st.integers(0, 10**10 - 1)))),
        customer_name=draw(_NAMES.filter(bool)),
        area=draw(_NAMES),
        sgc=draw(st.from_regex(r"\A[0-9]{6}\Z")),
        tariff_index=draw(st.from_regex(r"\A[0-9]{2}\Z")),
        krn=draw(st.integers(1, 9)),
        key_type=draw(st.integers(0, 3)),
        ea=ea,
        dkga=draw(st.sampled_from([2, 4])) if ea == 7 else 4,
        base_date=draw(st.sampled_from([1993, 2014, 2035])),
        ken=draw(st.integers(0, 255)),
        tariff_id=draw(st.from_regex(r"\A[a-z][a-z0-9_-]{0,20}\Z")),
        status=draw(st.sampled_from(list(MeterStatus))),
    )


@pytest.mark.slow
@given(st.lists(meters(), max_size=8, unique_by=lambda m: m.drn))
def test_written_meters_parse_back_to_the_same_records(records: list[MeterRecord]) -> None:
    """Any valid registrations written as CSV read back as exactly those registrations."""
    parsed = parse_meters_csv(format_meters_csv(records))
    assert parsed.problems == []
    assert parsed.meters == records


@given(st.text(max_size=300))
def test_parsing_any_text_raises_only_the_file_error(text: str) -> None:
    """Whatever the text, parsing returns rows or raises MeterFileError, nothing else."""
    try:
        parsed = parse_meters_csv(text)
    except MeterFileError:
        return
    for row in parsed.rows:
        assert (row.meter is None) == bool(row.problems)


@pytest.mark.parametrize(
    ("column", "value", "says"),
    [
        ("drn", drn(7)[:-1] + str((int(drn(7)[-1]) + 1) % 10), "Luhn check digit"),
        ("drn", drn(7)[1:], "dropped a leading zero"),
        ("drn", "0000000007X", "11 digits"),
        ("sgc", "12345", "dropped a leading zero"),
        ("sgc", "12345A", "6 decimal digits"),
        ("tariff_index", "1", "2 decimal digits"),
        ("krn", "0", "1 to 9"),
        ("krn", "one", "whole number"),
        ("key_type", "4", "key type"),
        ("ea", "9", "EA09"),
        ("dkga", "1", "2 or 4"),
        ("base_date", "2000", "1993, 2014 or 2035"),
        ("ken", "256", "0..255"),
        ("iin", "60072", "IIN"),
        ("status", "paused", "active or blocked"),
        ("customer_name", "", "required"),
        ("tariff_id", "", "required"),
    ],
)
def test_each_bad_cell_is_reported_with_line_column_and_reason(
    column: str, value: str, says: str
) -> None:
    """A malformed cell refuses its row, naming the line, the column, the value and the rule."""
    good = {
        "drn": drn(7),
        "customer_name": "Wanjiru Kamau",
        "sgc": "123457",
        "tariff_index": "01",
        "krn": "1",
        "tariff_id": "domestic",
        "key_type": "2",
        "ea": "7",
        "dkga": "4",
        "base_date": "2014",
        "ken": "255",
        "iin": "600727",
        "status": "active",
    }
    bad = {**good, "drn": drn(8), column: value}
    names = list(good)
    text = ",".join(names) + "\n" + ",".join(good.values()) + "\n" + ",".join(bad.values()) + "\n"
    parsed = parse_meters_csv(text)
    assert [m.drn for m in parsed.meters] == [drn(7)]
    (problem,) = parsed.problems
    assert (problem.line, problem.column, problem.value) == (3, column, value)
    assert says in problem.problem


def test_dkga02_with_misty1_is_refused() -> None:
    """DKGA02 derives keys for EA07 only, so a row pairing it with EA11 is refused."""
    text = f"{HEADER},ea,dkga\n{drn(1)},A,123457,01,1,domestic,11,2\n"
    (problem,) = parse_meters_csv(text).problems
    assert problem.column == "dkga"


def test_a_meter_twice_in_one_file_is_refused_on_its_second_line() -> None:
    """The second row with the same DRN is refused and names the first one's line."""
    text = f"{HEADER}\n{drn(1)},A,123457,01,1,domestic\n\n{drn(1)},B,123457,01,1,domestic\n"
    parsed = parse_meters_csv(text)
    assert [m.customer_name for m in parsed.meters] == ["A"]
    (problem,) = parsed.problems
    assert (problem.line, problem.column) == (4, "drn")
    assert "line 2" in problem.problem


def test_a_row_with_the_wrong_number_of_fields_is_refused() -> None:
    """A row with more or fewer cells than the header is refused as a whole."""
    text = f"{HEADER}\n{drn(1)},A,123457,01,1\n{drn(2)},B,123457,01,1,domestic\n"
    parsed = parse_meters_csv(text)
    assert [m.drn for m in parsed.meters] == [drn(2)]
    assert [(p.line, p.column) for p in parsed.problems] == [(2, "row")]


def test_lines_are_counted_across_quoted_line_breaks() -> None:
    """A quoted cell spanning two lines is refused and does not shift later rows' lines."""
    text = f'{HEADER},area\n{drn(1)},A,123457,01,1,domestic,"two\nlines"\n{drn(2)},B,1,01,1,x,\n'
    parsed = parse_meters_csv(text)
    assert [(p.line, p.column) for p in parsed.problems] == [(2, "area"), (4, "sgc")]


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("drn,customer_name,sgc,tariff_index,krn", "tariff_id"),
        (f"{HEADER},colour", "unknown column 'colour'"),
        (f"{HEADER},ti", "appears twice"),
        ("", "empty"),
    ],
)
def test_a_bad_header_refuses_the_whole_file(header: str, says: str) -> None:
    """A header with a missing, unknown or repeated column makes the file unreadable."""
    with pytest.raises(MeterFileError, match=says):
        parse_meters_csv(header + "\n" if header else "")


def test_excel_exports_with_bom_semicolons_and_short_names_are_read() -> None:
    """A byte-order mark, ``;`` as the delimiter and short column names are understood."""
    text = f"\ufeffMeter;Name;SGC;TI;KRN;Tariff;KT\r\n{drn(3)};A;123457;07;2;domestic;1\r\n"
    (meter,) = parse_meters_csv(text).meters
    assert (meter.drn, meter.tariff_index, meter.krn, meter.key_type) == (drn(3), "07", 2, 1)


def test_the_documented_example_is_valid() -> None:
    """docs/meters.csv.example parses without a problem and uses every column."""
    text = EXAMPLE.read_text(encoding="utf-8")
    parsed = parse_meters_csv(text)
    assert parsed.problems == []
    assert len(parsed.meters) >= 3
    assert set(text.splitlines()[0].split(",")) == set(COLUMNS)


# --------------------------------------------------------------------------------------- the CLI


def test_import_writes_valid_rows_and_lists_the_bad_ones(
    tmp_path: Path, database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid rows are registered, bad rows are listed by line and column, and the exit is 1."""
    source = tmp_path / "meters.csv"
    source.write_text(
        f"{HEADER}\n"
        f"{drn(1)},Wanjiru Kamau,123457,01,1,domestic\n"
        f"{drn(2)},Otieno,12345,01,1,domestic\n"
        f"{drn(3)},Amina,123457,01,1,nosuchtariff\n"
        f"{drn(4)},Baraka,123457,02,1,commercial\n"
    )
    code, report = run_import(source, database, capsys)
    assert code == 1
    assert (report["imported"], report["added"], report["refused"]) == (2, 2, 2)
    problems = report["problems"]
    assert isinstance(problems, list)
    assert [(p["line"], p["column"]) for p in problems] == [(3, "sgc"), (4, "tariff_id")]
    first = registered(database, drn(1))
    assert first is not None
    assert first.customer_name == "Wanjiru Kamau"
    assert registered(database, drn(2)) is None
    assert registered(database, drn(3)) is None


def test_import_of_a_clean_file_exits_zero(
    database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The documented example imports completely and the command succeeds."""
    code, report = run_import(EXAMPLE, database, capsys)
    assert code == 0
    assert report["refused"] == 0
    assert report["problems"] == []


def test_dry_run_writes_nothing(
    tmp_path: Path, database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--dry-run`` reports what it would import and registers nothing."""
    source = tmp_path / "meters.csv"
    source.write_text(f"{HEADER}\n{drn(1)},A,123457,01,1,domestic\n")
    code, report = run_import(source, database, capsys, "--dry-run")
    assert code == 0
    assert (report["imported"], report["dry_run"]) == (1, True)
    assert registered(database, drn(1)) is None


def test_reimport_updates_details_but_never_a_meters_key(
    tmp_path: Path, database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Importing again updates names and tariffs; a changed KRN or SGC is refused (keys rotate)."""
    source = tmp_path / "meters.csv"
    source.write_text(
        f"{HEADER}\n{drn(1)},A,123457,01,1,domestic\n{drn(2)},B,123457,01,1,domestic\n"
    )
    assert run_import(source, database, capsys)[0] == 0
    source.write_text(
        f"{HEADER}\n{drn(1)},A renamed,123457,01,1,commercial\n{drn(2)},B,123457,01,2,domestic\n"
    )
    code, report = run_import(source, database, capsys)
    assert code == 1
    assert (report["added"], report["updated"], report["refused"]) == (0, 1, 1)
    problems = report["problems"]
    assert isinstance(problems, list)
    assert problems[0]["column"] == "krn"
    assert "keys rotate" in problems[0]["problem"]
    renamed = registered(database, drn(1))
    assert renamed is not None
    assert (renamed.customer_name, renamed.tariff_id) == ("A renamed", "commercial")
    kept = registered(database, drn(2))
    assert kept is not None
    assert kept.krn == 1


def test_a_bad_header_imports_nothing_and_fails(
    tmp_path: Path, database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file whose header is wrong is refused as a whole, with the reason on stderr."""
    source = tmp_path / "meters.csv"
    source.write_text(f"drn,name\n{drn(1)},A\n")
    code = main(["meters", "import", str(source), "--database-url", database])
    assert code == 1
    assert "missing required column" in capsys.readouterr().err
    assert registered(database, drn(1)) is None


def test_a_file_that_is_not_utf8_is_refused_clearly(
    tmp_path: Path, database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file in another encoding fails with advice to save it as CSV UTF-8."""
    source = tmp_path / "meters.csv"
    source.write_bytes(f"{HEADER}\n{drn(1)},Ren\xe9e,123457,01,1,domestic\n".encode("latin-1"))
    assert main(["meters", "import", str(source), "--database-url", database]) == 1
    assert "CSV UTF-8" in capsys.readouterr().err


def test_show_prints_the_registered_meter(
    database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``meters show DRN --json`` prints the registration; an unknown meter fails."""
    run_import(EXAMPLE, database, capsys)
    first = EXAMPLE.read_text().splitlines()[1].split(",")
    assert main(["meters", "show", first[0], "--database-url", database, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["drn"], shown["customer_name"], shown["sgc"]) == (first[0], first[1], first[3])
    assert main(["meters", "show", drn(999), "--database-url", database]) == 1
    assert "no meter" in capsys.readouterr().err


async def test_progress_reaches_every_meter(tmp_path: Path) -> None:
    """The import reports progress per batch, checking then writing, ending at every meter."""
    rows = "\n".join(f"{drn(n)},M{n},123457,01,1,domestic" for n in range(450))
    seen: list[tuple[str, int, int]] = []
    async with open_ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        await ledger.put_tariff(tariff("domestic"))
        report = await import_meters(
            ledger,
            f"{HEADER}\n{rows}\n",
            progress=lambda stage, done, total: seen.append((stage, done, total)),
        )
        assert report.added == 450
        stages = [stage for stage, _, _ in seen]
        assert stages == sorted(stages)  # "checking" before "writing"
        for stage in ("checking", "writing"):
            done = [d for s, d, _ in seen if s == stage]
            assert done == sorted(done)
            assert done[-1] == 450
        assert (await ledger.get_meter(drn(449))).customer_name == "M449"


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        """Always a terminal."""
        return True


def test_progress_bar_draws_only_on_a_terminal() -> None:
    """The bar is drawn in place on a terminal, a line per stage, and stays silent on a pipe."""
    terminal, pipe = _Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        bar = Progress(stream=stream)
        bar("checking", 200, 200)
        bar("writing", 50, 200)
        bar("writing", 200, 200)
        bar.close()
    lines = terminal.getvalue().split("\n")
    assert lines[0].startswith("\rchecking [")
    assert lines[1].startswith("\rwriting  [")
    assert lines[1].endswith("200/200 100%")
    assert lines[2] == ""
    assert pipe.getvalue() == ""


def test_the_command_reports_rows_on_stderr_and_fails(tmp_path: Path, database: str) -> None:
    """Run as a program, ``gateway meters import`` lists bad rows on stderr and exits 1."""
    source = tmp_path / "meters.csv"
    source.write_text(f"{HEADER}\n{drn(1)},A,123457,01,1,domestic\n{drn(2)},B,123457,1,1,x\n")
    command = [sys.executable, "-m", "gateway", "meters", "import", str(source)]
    result = subprocess.run(
        [*command, "--database-url", database],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert f"{source}: line 3, column tariff_index ('1'):" in result.stderr
    assert "1 meter(s) imported (1 new, 0 updated); 1 row(s) refused" in result.stdout


def test_list_shows_registered_meters_or_says_it_cannot(
    database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``meters list`` lists the imported meters, or fails clearly on a ledger that cannot list."""
    run_import(EXAMPLE, database, capsys)
    expected = [line.split(",")[0] for line in EXAMPLE.read_text().splitlines()[1:]]
    code = main(["meters", "list", "--database-url", database, "--json"])
    captured = capsys.readouterr()
    if code == 1:
        assert "cannot list meters" in captured.err
        return
    assert code == 0
    listed = [m["drn"] for m in json.loads(captured.out)["meters"]]
    assert sorted(listed) == sorted(expected)
