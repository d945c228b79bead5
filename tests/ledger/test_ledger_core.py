"""The ledger core over its dialects: one statement, two spellings; refusals reach the rules."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.ledger import DuplicateError, Ledger, SavedMetersFull
from gateway.ledger.core import Steps, run
from gateway.ledger.postgres import _postgres_text
from gateway.ledger.sqlite import _sqlite_text
from gateway.phone import Msisdn

LOCKED = (
    "SELECT p.*, v.vend_id FROM purchases p LEFT JOIN vends v ON v.purchase_id = p.purchase_id"
    " WHERE p.purchase_id = ? FOR UPDATE OF p"
)


def test_sqlite_spells_no_row_locks_and_a_null_safe_is() -> None:
    """The one writer serialises writes: FOR UPDATE (OF, SKIP LOCKED) goes; IS stays null-safe."""
    assert _sqlite_text(LOCKED) == LOCKED.removesuffix(" FOR UPDATE OF p")
    assert _sqlite_text("SELECT 1 FROM outbox LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING *") == (
        "SELECT 1 FROM outbox LIMIT ?) RETURNING *"
    )
    assert _sqlite_text("UPDATE meters SET last_tid = ? WHERE last_tid IS NOT DISTINCT FROM ?") == (
        "UPDATE meters SET last_tid = ? WHERE last_tid IS ?"
    )


def test_postgres_numbers_the_placeholders() -> None:
    """Each ``?`` becomes ``$n`` in order; the locks stay."""
    assert _postgres_text("UPDATE t SET a = ?, b = ? WHERE c IN (?, ?)") == (
        "UPDATE t SET a = $1, b = $2 WHERE c IN ($3, $4)"
    )
    assert _postgres_text(LOCKED).endswith("WHERE p.purchase_id = $1 FOR UPDATE OF p")


async def test_a_refusal_reaches_the_rules_as_our_error(ledger: Ledger) -> None:
    """A UNIQUE refusal is thrown into the steps as DuplicateError: a rule names it; nothing stays.

    Both dialects: the operation's first write is gone with it (SQLite's guarded rerun rolls the
    operation back, PostgreSQL the transaction).
    """
    now = datetime(2026, 1, 1, tzinfo=UTC)
    insert = "INSERT INTO customer_preferences (phone, language, updated_at) VALUES (?, ?, ?)"

    def op() -> Steps[None]:
        stamp = ledger._stamp(now)  # type: ignore[attr-defined]
        yield run(insert, "+254700000001", "en", stamp)
        try:
            yield run(insert, "+254700000001", "sw", stamp)
        except DuplicateError as exc:
            raise SavedMetersFull("named by the rule") from exc

    with pytest.raises(SavedMetersFull) as caught:
        await ledger._write(op)  # type: ignore[attr-defined]
    assert isinstance(caught.value.__cause__, DuplicateError)
    assert await ledger.get_language(Msisdn("+254700000001")) is None
