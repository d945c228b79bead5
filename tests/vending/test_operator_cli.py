"""The operator CLI: migrate, keys add/list, purchases find/timeline/reprint, report daily."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.ledger import open_sqlite_ledger
from tests.vending.vending_support import (
    AMOUNT_FOR_TESTS,
    PHONE,
    FakeClock,
    FakeProvider,
    build_vending,
    make_drn,
    seed,
)

MASTER = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A database URL in a temporary directory, with the master key in the environment."""
    monkeypatch.setenv("GATEWAY_MASTER_KEY", MASTER)
    return f"sqlite:///{tmp_path}/gateway.db"


def vended_purchase(url: str) -> str:
    """A purchase vended through the saga; returns its id."""

    async def run() -> str:
        clock = FakeClock()
        provider = FakeProvider()
        async with open_sqlite_ledger(Path(url.removeprefix("sqlite:///")), clock=clock) as ledger:
            await seed(ledger, [make_drn(1)])
            vending = build_vending(ledger, provider, clock)
            purchase = await vending.start_purchase(
                channel="ussd",
                phone=PHONE,
                meter=make_drn(1),
                amount=AMOUNT_FOR_TESTS,
                idempotency_key="cli",
            )
            purchase = await vending.request_payment(purchase.purchase_id)
            provider.settle(purchase.provider_reference or "", amount=AMOUNT_FOR_TESTS)
            await vending.confirm(purchase.purchase_id)
            return purchase.purchase_id

    return asyncio.run(run())


def test_migrate_creates_the_schema(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``gateway migrate --json`` brings a new database up to date and says so."""
    assert main(["migrate", "--database-url", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"database_url": db, "migrated": True}
    assert Path(db.removeprefix("sqlite:///")).exists()


def test_keys_add_then_list_opens_with_the_master_key(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key added from hex is listed by its attributes and opens; the key is never printed."""
    key_hex = "0abc" * 10
    code = main(
        ["keys", "add", "--database-url", db, "--sgc", "123457", "--krn", "1", "--dkga", "4",
         "--base-date", "2014", "--key-hex", key_hex]
    )  # fmt: skip
    assert code == 0
    assert main(["keys", "list", "--database-url", db, "--check", "--json"]) == 0
    out = capsys.readouterr().out
    assert key_hex not in out
    listed = json.loads(out.strip().splitlines()[-1])
    assert (listed["sgc"], listed["krn"], listed["opens"]) == ("123457", 1, True)


def test_wrong_master_key_is_named(
    db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking keys under another master key fails with the GATEWAY_MASTER_KEY hint."""
    main(["keys", "add", "--database-url", db, "--sgc", "123457", "--krn", "1", "--dkga", "4",
          "--base-date", "2014", "--key-hex", "0abc" * 10])  # fmt: skip
    monkeypatch.setenv("GATEWAY_MASTER_KEY", base64.b64encode(bytes(32)).decode())
    assert main(["keys", "list", "--database-url", db, "--check"]) == 1
    assert "wrong GATEWAY_MASTER_KEY" in capsys.readouterr().err


def test_key_of_the_wrong_length_is_refused(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A DKGA04 key that is not 20 bytes is refused and nothing is stored."""
    code = main(
        ["keys", "add", "--database-url", db, "--sgc", "123457", "--krn", "1", "--dkga", "4",
         "--base-date", "2014", "--key-hex", "abcd"]
    )  # fmt: skip
    assert code == 1
    assert "20 bytes" in capsys.readouterr().err
    assert main(["keys", "list", "--database-url", db, "--json"]) == 0
    assert capsys.readouterr().out == ""


def test_find_timeline_and_reprint(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A vended purchase is found by phone with a masked token, has its timeline, reprints."""
    purchase_id = vended_purchase(db)
    capsys.readouterr()  # the setup's own log lines
    assert main(["purchases", "find", "--database-url", db, "--phone", PHONE, "--json"]) == 0
    (found,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert found["purchase_id"] == purchase_id
    assert found["state"] == "vended"
    assert found["token"].startswith("****-")

    assert main(["purchases", "timeline", "--database-url", db, purchase_id, "--json"]) == 0
    kinds = [json.loads(line)["kind"] for line in capsys.readouterr().out.splitlines()]
    assert kinds[0] == "purchase_created"
    assert "token_vended" in kinds

    assert main(["purchases", "reprint", "--database-url", db, purchase_id, "--json"]) == 0
    reprint = json.loads(capsys.readouterr().out)
    assert reprint["recipient"] == PHONE
    assert reprint["state"] == "pending"


def test_reprint_without_token_fails(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Reprinting an unknown purchase exits 1 with the reason."""
    main(["migrate", "--database-url", db])
    assert main(["purchases", "reprint", "--database-url", db, "PNOPE"]) == 1
    assert "PNOPE" in capsys.readouterr().err


def test_daily_report_as_csv(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The daily CSV has a header and one line per provider and state with count and sum."""
    vended_purchase(db)
    capsys.readouterr()
    assert main(["report", "daily", "--database-url", db, "--date", "2026-03-14", "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "day,provider,state,currency,count,amount_minor"
    assert lines[1:] == ["2026-03-14,fakepay,vended,KES,1,11600"]


def _add_key(db: str, krn: int, base_date: int, key_hex: str) -> None:
    code = main(
        ["keys", "add", "--database-url", db, "--sgc", "123457", "--krn", str(krn), "--dkga", "4",
         "--base-date", str(base_date), "--key-hex", key_hex]
    )  # fmt: skip
    assert code == 0


def test_keys_rotate_plans_a_change_per_meter_and_dry_run_changes_nothing(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``keys rotate`` plans listed meters on the old key, skips others; a dry run plans nothing."""
    vended_purchase(db)  # meter make_drn(1) on sgc 123457 krn 1
    _add_key(db, 1, 2014, "0abc" * 10)
    _add_key(db, 2, 2014, "5e7a" * 10)
    listed = tmp_path / "meters.txt"
    listed.write_text(f"# meters to move\n{make_drn(1)}\n{make_drn(9)}\n\n", encoding="utf-8")
    capsys.readouterr()
    rotate = ["keys", "rotate", "--database-url", db, "--sgc", "123457", "--from-krn", "1",
              "--to-krn", "2", "--meters", str(listed), "--json"]  # fmt: skip
    assert main([*rotate, "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert (dry["meters"], dry["skipped"], dry["dry_run"]) == ([make_drn(1)], [make_drn(9)], True)

    async def changes() -> list[object]:
        async with open_sqlite_ledger(Path(db.removeprefix("sqlite:///"))) as ledger:
            return list(await ledger.key_changes(make_drn(1)))

    assert asyncio.run(changes()) == []
    assert main(rotate) == 0
    done = json.loads(capsys.readouterr().out)
    assert (done["meters"], done["rollover"], done["to_base_date"]) == ([make_drn(1)], False, 2014)
    assert len(asyncio.run(changes())) == 1


def test_keys_rotate_refuses_a_key_not_imported_or_a_wrong_base_date(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The new key must be imported first, and ``--base-date`` must agree with it."""
    _add_key(db, 1, 2014, "0abc" * 10)
    rotate = ["keys", "rotate", "--database-url", db, "--sgc", "123457", "--from-krn", "1",
              "--to-krn", "2", "--all"]  # fmt: skip
    assert main(rotate) == 1
    assert "gateway keys add" in capsys.readouterr().err
    _add_key(db, 2, 2014, "5e7a" * 10)
    assert main([*rotate, "--base-date", "2035"]) == 1
    assert "base date 2014" in capsys.readouterr().err
    assert main(rotate) == 0


def test_keys_rotate_refuses_a_dkga02_change_of_base_date_alone(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DKGA02 key re-imported with base date 2014, rotated to itself: refused, naming why.

    DKGA02 ignores the base date: the meters would get their current key with RO = 1 and
    accept their old tokens again (issue 16).
    """
    for base_date in (1993, 2014):  # the same slot imported again with another base date
        code = main(
            ["keys", "add", "--database-url", db, "--sgc", "123457", "--krn", "1", "--dkga", "2",
             "--base-date", str(base_date), "--key-hex", "abababababababab"]
        )  # fmt: skip
        assert code == 0
    capsys.readouterr()
    rotate = ["keys", "rotate", "--database-url", db, "--sgc", "123457", "--from-krn", "1",
              "--to-krn", "1", "--all"]  # fmt: skip
    assert main(rotate) == 1
    error = capsys.readouterr().err
    assert "DKGA02 does not derive the decoder key from the base date" in error
    assert "another KRN" in error
