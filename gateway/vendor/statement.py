"""A vendor's daily float statement as CSV or JSON Lines: opening, movements, totals, closing.

No token appears in a statement (a sale is named by its vend id); amounts are integer minor units.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Final

from gateway.vendor.service import Statement

CSV_COLUMNS: Final = (
    "record",
    "at",
    "kind",
    "amount_minor",
    "commission_minor",
    "balance_after_minor",
    "vend_id",
    "reference",
)


def statement_records(statement: Statement) -> list[dict[str, object]]:
    """The statement as records: an opening line, one per movement, totals and closing."""
    vendor = statement.vendor
    head: dict[str, object] = {
        "record": "opening",
        "vendor_id": vendor.vendor_id,
        "day": statement.day.isoformat(),
        "currency": vendor.currency,
        "balance_minor": statement.opening_minor,
    }
    lines: list[dict[str, object]] = [head]
    lines.extend(
        {
            "record": "movement",
            "at": movement.created_at.isoformat(),
            "kind": movement.kind.value,
            "amount_minor": movement.amount_minor,
            "commission_minor": movement.commission_minor,
            "balance_after_minor": movement.balance_after_minor,
            "vend_id": movement.purchase_id,
            # A top-up's bank reference; a sale is named by its vend id.
            "reference": movement.reference if movement.purchase_id is None else None,
        }
        for movement in statement.movements
    )
    lines.append({"record": "totals", **statement.totals()})
    lines.append({"record": "closing", "balance_minor": statement.closing_minor})
    return lines


def render_statement(statement: Statement, form: str) -> bytes:
    """``jsonl`` (one JSON object a line) or ``csv`` (opening, movements, net totals, closing)."""
    records = statement_records(statement)
    if form == "jsonl":
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    totals = statement.totals()
    net = totals["top_ups_minor"] - totals["debits_minor"] + totals["refunds_minor"]
    day = statement.day.isoformat()
    writer.writerow(["opening", day, "", "", "", statement.opening_minor, "", ""])
    for record in records:
        if record["record"] == "movement":
            writer.writerow(["" if record[c] is None else record[c] for c in CSV_COLUMNS])
    writer.writerow(["totals", day, "net", net, totals["commission_minor"], "", "", ""])
    writer.writerow(["closing", day, "", "", "", statement.closing_minor, "", ""])
    return out.getvalue().encode()
