"""``gateway vendors``: register, list, suspend, top up, statement, keys; exact money, exits."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.vendor import sealing, signing


@pytest.fixture
def flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """A fresh data dir, migrated (its log lines read away)."""
    data = ["--data-dir", str(tmp_path)]
    assert main(["vendors", "list", *data]) == 0
    capsys.readouterr()
    return data


def _json(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(capsys.readouterr().out)
    return loaded


def test_add_shows_the_secret_once_and_stores_its_key_sealed(
    flags: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``add`` prints the key's secret; the database holds neither it nor its derived key."""
    terms = ["--name", "Corner shop", "--commission-percent", "2.5", "--credit-limit", "100.50"]
    assert main(["vendors", "add", "shop", *terms, "--terminal", "till-1", "--json", *flags]) == 0
    added = _json(capsys)
    assert added["commission_percent"] == "2.5"
    assert added["credit_limit_minor"] == 10_050
    assert added["terminals"] == ["till-1"]
    secret = str(added["secret"])
    assert secret.startswith("vsk_")
    database = (tmp_path / "gateway.db").read_bytes()
    assert secret.encode() not in database
    derived = signing.derive_signing_key(secret)
    assert derived.encode() not in database
    assert bytes.fromhex(derived) not in database
    assert sealing.fingerprint(derived).encode() in database  # the hash beside the sealed key
    assert main(["vendors", "add", "shop", "--name", "again", *flags]) == 1
    assert "exists" in capsys.readouterr().err


def test_top_up_list_suspend_statement(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A top-up counts once per reference; list, suspend and the day's statement show it."""
    assert main(["vendors", "add", "shop", "--name", "Shop", *flags]) == 0
    capsys.readouterr()
    top_up = ["vendors", "top-up", "shop", "5000.25", "--reference", "BANK-7", "--json", *flags]
    assert main(top_up) == 0
    assert _json(capsys)["balance_after_minor"] == 500_025
    assert main(top_up) == 0  # the same transfer again: counted once
    assert _json(capsys)["balance_after_minor"] == 500_025
    assert main(["vendors", "top-up", "shop", "1.234", "--reference", "B8", *flags]) == 2
    assert "AMOUNT" in capsys.readouterr().err
    assert main(["vendors", "list", "--json", *flags]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["vendor_id"], v["balance_minor"]) for v in listed] == [("shop", 500_025)]
    assert main(["vendors", "suspend", "shop", "--json", *flags]) == 0
    assert _json(capsys)["status"] == "suspended"
    assert main(["vendors", "suspend", "shop", "--resume", "--json", *flags]) == 0
    assert _json(capsys)["status"] == "active"
    day = datetime.now(UTC).date().isoformat()
    assert main(["vendors", "statement", "shop", "--day", day, "--json", *flags]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[0]["balance_minor"] == 0
    assert records[-1] == {"record": "closing", "balance_minor": 500_025}
    assert main(["vendors", "statement", "shop", "--day", day, "--format", "csv", *flags]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split(",")[5] == "500025"
    assert main(["vendors", "statement", "nobody", *flags]) == 1
    assert main(["vendors", "statement", "shop", "--day", "14/03/2026", *flags]) == 2


def test_keys_are_added_scoped_and_revoked(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A scoped key for a terminal; revoking needs the vendor's own key id."""
    assert main(["vendors", "add", "shop", "--name", "Shop", "--terminal", "t1", *flags]) == 0
    capsys.readouterr()
    assert (
        main(["vendors", "key", "shop", "--scope", "meters", "--terminal", "t1", "--json", *flags])
        == 0
    )
    made = _json(capsys)
    assert made["scopes"] == ["meters"]
    assert main(["vendors", "key", "shop", "--scope", "refunds", *flags]) == 2
    assert main(["vendors", "key", "shop", "--revoke", "vk_0000000000000000", *flags]) == 1
    assert main(["vendors", "key", "shop", "--revoke", str(made["key_id"]), "--json", *flags]) == 0
    assert _json(capsys)["status"] == "revoked"


def test_keys_are_listed_and_rotated_with_an_overlap(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """rotate-key: a new key, the old scopes and terminal; the old key ends after the overlap."""
    assert main(["vendors", "add", "shop", "--name", "Shop", "--terminal", "t1", *flags]) == 0
    capsys.readouterr()
    key = ["vendors", "key", "shop", "--scope", "read", "--terminal", "t1", "--json", *flags]
    assert main(key) == 0
    old = _json(capsys)
    before = datetime.now(UTC)
    rotate = ["vendors", "rotate-key", str(old["key_id"]), "--overlap-hours", "2", "--json"]
    assert main([*rotate, *flags]) == 0
    rotated = _json(capsys)
    assert str(rotated["secret"]).startswith("vsk_")
    assert (rotated["scopes"], rotated["terminal"]) == (["read"], "t1")
    ends = datetime.fromisoformat(str(rotated["old_key_expires_at"]))
    assert before + timedelta(hours=2) <= ends <= datetime.now(UTC) + timedelta(hours=2)
    assert main(["vendors", "keys", "shop", "--json", *flags]) == 0
    listed = {k["key_id"]: k for k in json.loads(capsys.readouterr().out)}
    assert len(listed) == 3
    assert listed[str(old["key_id"])]["replaced_by"] == rotated["key_id"]
    assert all(k["sealed"] and len(k["fingerprint"]) == 16 for k in listed.values())
    assert str(rotated["secret"]) not in json.dumps(listed)
    assert main(["vendors", "rotate-key", "vk_0000000000000000", *flags]) == 1
    assert main(["vendors", "rotate-key", str(old["key_id"]), "--overlap-hours", "x", *flags]) == 2
    now = ["vendors", "rotate-key", str(rotated["key_id"]), "--overlap-hours", "0", "--json"]
    assert main([*now, *flags]) == 0
    capsys.readouterr()
    assert main([*now, *flags]) == 1  # the key ended at once: nothing left to rotate


def test_add_terminal(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """add-terminal registers a till with its rate; a duplicate or a bad id is refused."""
    assert main(["vendors", "add", "shop", "--name", "Shop", *flags]) == 0
    capsys.readouterr()
    add = ["vendors", "add-terminal", "shop", "till-3", "--label", "Front", "--json"]
    assert main([*add, "--rate-per-minute", "30", *flags]) == 0
    assert _json(capsys) == {
        "vendor_id": "shop", "terminal": "till-3", "label": "Front", "rate_per_minute": 30,
        "status": "active",
    }  # fmt: skip
    assert main([*add, *flags]) == 1
    assert main(["vendors", "add-terminal", "shop", "till 4", *flags]) == 2
    assert main(["vendors", "add-terminal", "nobody", "till-4", *flags]) == 1
    assert main(["vendors", "add-terminal", "shop", "t5", "--rate-per-minute", "0", *flags]) == 2
