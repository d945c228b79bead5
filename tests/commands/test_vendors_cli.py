"""``gateway vendors``: register, list, suspend, top up, statement, keys; exact money, exits."""

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.vendor import signing


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


def test_add_shows_the_secret_once_and_stores_only_its_derived_key(
    flags: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``add`` prints the key's secret; the database holds the derived key, never the secret."""
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
    assert signing.derive_signing_key(secret).encode() in database
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
