"""``gateway meters …``: register the utility's meters from a CSV file, and look them up.

```
gateway meters import FILE.csv [--dry-run] [--json]   valid rows imported, invalid ones listed
gateway meters show DRN [--json]                      one meter as registered
gateway meters list [--limit N] [--after DRN] [--json]
```

Every sub-command takes ``--config FILE``, ``--data-dir DIR`` and ``--database-url URL`` (the
same settings, and ``GATEWAY_*`` variables, as ``gateway serve``). ``import`` shows a progress
bar on stderr when stderr is a terminal, lists every refused row on stderr (line, column, value,
what was wrong; in ``--json`` the same list is in the output object) and exits 1 if any row was
refused, 0 when every row was imported. The file's columns are described in
``gateway.meters_csv`` and ``docs/meters.csv.example``.

Importing a meter that is registered already updates its name, area, tariff and status. Its key
attributes (SGC, KRN, TI, KT, EA, DKGA, base date, KEN, IIN) are never changed by an import: a
changed key needs key-change tokens delivered to the meter, which ``gateway keys rotate`` does;
such rows are refused with that advice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TextIO, runtime_checkable

import structlog

from gateway.config import Config
from gateway.errors import GatewayError
from gateway.ledger import Ledger, MeterRecord, NotFound, open_ledger
from gateway.logging import configure_logging
from gateway.meters_csv import MeterFileError, RowProblem, parse_meters_csv

#: Meters written concurrently: the ledger's single writer commits them in groups.
BATCH: Final = 200
_BAR_WIDTH: Final = 30
#: Registration fields an import may change on an existing meter; the rest is its key.
_KEY_FIELDS: Final = (
    "iin",
    "sgc",
    "tariff_index",
    "krn",
    "key_type",
    "ea",
    "dkga",
    "base_date",
    "ken",
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``meters`` command group."""
    parser = subparsers.add_parser("meters", help="register meters from CSV; show and list them")
    commands = parser.add_subparsers(dest="meters_command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "import", help="register meters from a CSV file (valid rows imported, bad rows listed)"
    )
    p.add_argument("file", type=Path, help="the CSV file (see docs/meters.csv.example)")
    p.add_argument("--dry-run", action="store_true", help="check everything, write nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _ledger_options(p)
    p.set_defaults(handler=_import_command)

    p = commands.add_parser("show", help="one meter as registered")
    p.add_argument("drn", help="the meter number (DRN)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _ledger_options(p)
    p.set_defaults(handler=_show_command)

    p = commands.add_parser("list", help="registered meters, by meter number")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--after", default=None, help="start after this meter number (paging)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _ledger_options(p)
    p.set_defaults(handler=_list_command)


def _ledger_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument("--data-dir", default=None, help="data directory (default ./var)")
    parser.add_argument("--database-url", default=None, help="ledger URL (sqlite:///path)")


def _database_url(args: argparse.Namespace) -> str:
    config = Config.load(
        env=os.environ,
        file=args.config,
        overrides={"data_dir": args.data_dir, "database_url": args.database_url},
    )
    return config.effective_database_url


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Warnings and errors only, on stderr (stdout carries the command's output)."""
    saved = structlog.get_config()
    configure_logging(level="warning", stream=sys.stderr)
    try:
        yield
    finally:
        structlog.configure(**saved)


def _out(line: str) -> None:
    print(line)


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _fail(message: str) -> int:
    _err(f"gateway meters: {message}")
    return 1


# ------------------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar redrawn in place; silent unless the stream is a terminal.

    Call it with ``(stage, done, total)``; a new stage starts a new line; ``close`` ends the last.
    """

    def __init__(self, *, stream: TextIO) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._stage: str | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        """Redraw the bar of ``stage`` at ``done`` of ``total``."""
        if not self._enabled or total <= 0:
            return
        if self._stage is not None and stage != self._stage:
            self._stream.write("\n")
        self._stage = stage
        filled = _BAR_WIDTH * done // total
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        self._stream.write(f"\r{stage:<8} [{bar}] {done}/{total} {100 * done // total:3d}%")
        self._stream.flush()

    def close(self) -> None:
        """End the bar's line (if one was drawn)."""
        if self._stage is not None:
            self._stream.write("\n")
            self._stream.flush()
            self._stage = None


# --------------------------------------------------------------------------------------- import


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportReport:
    """What an import did (or, in a dry run, would do)."""

    rows: int
    added: int
    updated: int
    problems: tuple[RowProblem, ...]
    refused_rows: int
    dry_run: bool

    @property
    def imported(self) -> int:
        """Meters written (or that would be written)."""
        return self.added + self.updated

    def as_json(self) -> dict[str, object]:
        """The report as one JSON-able object."""
        return {
            "rows": self.rows,
            "imported": self.imported,
            "added": self.added,
            "updated": self.updated,
            "refused": self.refused_rows,
            "dry_run": self.dry_run,
            "problems": [
                {"line": p.line, "column": p.column, "value": p.value, "problem": p.problem}
                for p in self.problems
            ],
        }


def _key_change(existing: MeterRecord, new: MeterRecord) -> RowProblem | None:
    """Why ``new`` may not replace ``existing`` (a key attribute differs), or None."""
    changed = [name for name in _KEY_FIELDS if getattr(existing, name) != getattr(new, name)]
    if not changed:
        return None
    details = ", ".join(f"{n} {getattr(existing, n)} → {getattr(new, n)}" for n in changed)
    return RowProblem(
        line=0,
        column=changed[0],
        value=str(getattr(new, changed[0])),
        problem=f"the meter is registered with other key attributes ({details}): changing a"
        " key needs key-change tokens on the meter; use gateway keys rotate",
    )


async def import_meters(
    ledger: Ledger,
    text: str,
    *,
    dry_run: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> ImportReport:
    """Validate a meter file and register its valid rows; safe to run again on the same file.

    Rows are refused for malformed fields (see ``gateway.meters_csv``), an unknown tariff, or
    key attributes that differ from an already registered meter's. Everything else is written
    with ``Ledger.put_meter`` (insert, or update in place keeping the meter's last TID), unless
    ``dry_run``. ``progress`` is called with (stage, done, total) after each batch of the
    ``checking`` stage (valid rows against the ledger) and of the ``writing`` stage.

    Raises:
        MeterFileError: the file's header is unusable (nothing is imported).
        LedgerError: the ledger failed; rows written before the failure stay written.
    """
    parsed = parse_meters_csv(text)
    problems = list(parsed.problems)
    refused = parsed.invalid_rows
    known = await _known_tariffs(ledger, {m.tariff_id for m in parsed.meters})
    accepted: list[tuple[MeterRecord, bool]] = []  # (meter, is it new?)
    valid_rows = [(row.line, row.meter) for row in parsed.rows if row.meter is not None]
    for start in range(0, len(valid_rows), BATCH):
        chunk = valid_rows[start : start + BATCH]
        found = await asyncio.gather(*(_registered(ledger, meter.drn) for _, meter in chunk))
        for (line, meter), existing in zip(chunk, found, strict=True):
            problem = _screen(meter, existing, known)
            if problem is None:
                accepted.append((meter, existing is None))
            else:
                problems.append(dataclasses.replace(problem, line=line))
                refused += 1
        if progress is not None:
            progress("checking", start + len(chunk), len(valid_rows))
    if not dry_run:
        for start in range(0, len(accepted), BATCH):
            chunk_meters = [meter for meter, _ in accepted[start : start + BATCH]]
            await asyncio.gather(*(ledger.put_meter(meter) for meter in chunk_meters))
            if progress is not None:
                progress("writing", start + len(chunk_meters), len(accepted))
    problems.sort(key=lambda p: p.line)
    added = sum(1 for _, is_new in accepted if is_new)
    return ImportReport(
        rows=len(parsed.rows),
        added=added,
        updated=len(accepted) - added,
        problems=tuple(problems),
        refused_rows=refused,
        dry_run=dry_run,
    )


async def _registered(ledger: Ledger, drn: str) -> MeterRecord | None:
    try:
        return await ledger.get_meter(drn)
    except NotFound:
        return None


async def _known_tariffs(ledger: Ledger, tariff_ids: set[str]) -> set[str]:
    known: set[str] = set()
    for tariff_id in sorted(tariff_ids):
        try:
            await ledger.get_tariff(tariff_id)
        except NotFound:
            continue
        known.add(tariff_id)
    return known


def _screen(meter: MeterRecord, existing: MeterRecord | None, known: set[str]) -> RowProblem | None:
    """Why a well-formed row may still not be imported (line filled in by the caller), or None."""
    if meter.tariff_id not in known:
        return RowProblem(
            line=0,
            column="tariff_id",
            value=meter.tariff_id,
            problem=f"no tariff {meter.tariff_id!r} in the ledger: add it first",
        )
    return None if existing is None else _key_change(existing, meter)


def _read(path: Path) -> str:
    """The file's text: UTF-8, with or without Excel's byte-order mark."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MeterFileError(
            f"{path} is not UTF-8 text (byte {exc.start}): save it as 'CSV UTF-8'", line=0
        ) from exc


def _import_command(args: argparse.Namespace) -> int:
    try:
        text = _read(args.file)
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror}")
    except MeterFileError as exc:
        return _fail(str(exc))
    with _quiet_logs():
        try:
            url = _database_url(args)
            report = asyncio.run(_run_import(url, text, dry_run=args.dry_run))
        except MeterFileError as exc:
            return _fail(f"{args.file}: {exc}; nothing was imported")
        except GatewayError as exc:
            return _fail(str(exc))
    if args.json:
        _out(json.dumps({"file": str(args.file), **report.as_json()}))
    else:
        for problem in report.problems:
            _err(
                f"{args.file}: line {problem.line}, column {problem.column}"
                f" ({problem.value!r}): {problem.problem}"
            )
        _out(_summary(report))
    return 1 if report.refused_rows else 0


async def _run_import(url: str, text: str, *, dry_run: bool) -> ImportReport:
    async with open_ledger(url) as ledger:
        progress = Progress(stream=sys.stderr)
        try:
            return await import_meters(ledger, text, dry_run=dry_run, progress=progress)
        finally:
            progress.close()


def _summary(report: ImportReport) -> str:
    verb = "would be imported" if report.dry_run else "imported"
    line = (
        f"{report.imported} meter(s) {verb} ({report.added} new, {report.updated} updated);"
        f" {report.refused_rows} row(s) refused"
    )
    return line + ("; dry run: nothing was written" if report.dry_run else "")


# ------------------------------------------------------------------------------------ show, list


def _meter_json(meter: MeterRecord) -> dict[str, object]:
    return {
        "drn": meter.drn,
        "customer_name": meter.customer_name,
        "area": meter.area,
        "iin": meter.iin,
        "sgc": meter.sgc,
        "tariff_index": meter.tariff_index,
        "krn": meter.krn,
        "key_type": meter.key_type,
        "ea": meter.ea,
        "dkga": meter.dkga,
        "base_date": meter.base_date,
        "ken": meter.ken,
        "last_tid": meter.last_tid,
        "tariff_id": meter.tariff_id,
        "status": meter.status.value,
    }


def _show_command(args: argparse.Namespace) -> int:
    async def run() -> MeterRecord:
        async with open_ledger(_database_url(args)) as ledger:
            return await ledger.get_meter(args.drn.strip())

    with _quiet_logs():
        try:
            meter = asyncio.run(run())
        except NotFound:
            return _fail(f"no meter {args.drn!r} is registered")
        except GatewayError as exc:
            return _fail(str(exc))
    data = _meter_json(meter)
    if args.json:
        _out(json.dumps(data))
    else:
        width = max(len(key) for key in data)
        for key, value in data.items():
            _out(f"{key:<{width}}  {'—' if value is None else value}")
    return 0


@runtime_checkable
class MeterListing(Protocol):
    """A ledger that can page through its meters (``Ledger.list_meters``)."""

    async def list_meters(self, *, after: str | None = None, limit: int = 100) -> list[MeterRecord]:
        """Meters ordered by DRN, after ``after``, at most ``limit``."""
        ...


def _list_command(args: argparse.Namespace) -> int:
    async def run() -> list[MeterRecord] | None:
        async with open_ledger(_database_url(args)) as ledger:
            if not isinstance(ledger, MeterListing):
                return None
            return await ledger.list_meters(after=args.after, limit=args.limit)

    with _quiet_logs():
        try:
            meters = asyncio.run(run())
        except GatewayError as exc:
            return _fail(str(exc))
    if meters is None:
        return _fail("this ledger cannot list meters yet (it lacks list_meters); use meters show")
    if args.json:
        _out(json.dumps({"meters": [_meter_json(m) for m in meters]}))
    else:
        _print_table(meters)
    return 0


def _print_table(meters: Sequence[MeterRecord]) -> None:
    header = ("DRN", "SGC", "TI", "KRN", "TARIFF", "STATUS", "CUSTOMER")
    rows = [
        (m.drn, m.sgc, m.tariff_index, str(m.krn), m.tariff_id, m.status.value, m.customer_name)
        for m in meters
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        _out("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
