"""``gateway debts`` and ``gateway fbe``: exact money, events, clear errors and exit codes."""

import asyncio
import json
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.ledger import MeterNumber, MeterRecord, open_ledger
from gateway.money import Money

METER = "01234567890"
BASE = ["--name", "Domestic", "--currency", "KES", "--min", "50", "--max", "35000"]


@pytest.fixture
def data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """A data dir with the domestic tariff and one meter on it."""
    flags = ["--data-dir", str(tmp_path)]
    assert main(["tariffs", "set", "domestic", *BASE, "--price-per-kwh", "25", *flags]) == 0

    async def seed() -> None:
        async with open_ledger(f"sqlite:///{tmp_path / 'gateway.db'}") as ledger:
            await ledger.put_meter(
                MeterRecord(
                    drn=MeterNumber(METER),
                    customer_name="Wanjiru Kamau",
                    sgc="123457",
                    tariff_index="01",
                    krn=1,
                    tariff_id="domestic",
                )
            )

    asyncio.run(seed())
    capsys.readouterr()
    return flags


def _json(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(capsys.readouterr().out)
    return loaded


def test_set_show_clear(data: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A debt set in major units is stored exactly, shown, cleared, each change an event."""
    terms = ["--balance", "1234.56", "--rate-percent", "12.5", "--cap-per-purchase", "100"]
    assert main(["debts", "set", METER, *terms, "--reason", "arrears", "--json", *data]) == 0
    shown = _json(capsys)
    assert (shown["balance_minor"], shown["rate_percent"], shown["cap_per_purchase"]) == (
        123456,
        "12.5",
        "KES 100.00",
    )
    assert main(["debts", "show", METER, "--json", *data]) == 0
    assert _json(capsys)["recoveries"] == []
    assert main(["debts", "clear", METER, "--reason", "written off", "--json", *data]) == 0
    assert _json(capsys)["balance_minor"] == 0

    async def events() -> list[str]:
        async with open_ledger(f"sqlite:///{Path(data[1]) / 'gateway.db'}") as ledger:
            debt = await ledger.get_debt(METER)
            assert debt is not None
            assert debt.balance == Money(0, "KES")
            return [e.kind for e in await ledger.events()]

    assert asyncio.run(events())[:2] == ["debt_cleared", "debt_set"]


@pytest.mark.parametrize(
    ("argv", "code", "said"),
    [
        (["debts", "set", METER, "--balance", "1.234", "--rate-percent", "10"], 2, "--balance"),
        (["debts", "set", METER, "--balance", "10", "--rate-percent", "101"], 2, "--rate-percent"),
        (["debts", "set", METER, "--balance", "-5", "--rate-percent", "10"], 2, "--balance"),
        (
            [
                "debts",
                "set",
                METER,
                "--balance",
                "10",
                "--rate-percent",
                "10",
                "--min-per-purchase",
                "20",
                "--cap-per-purchase",
                "5",
            ],
            2,
            "cap",
        ),
        (["debts", "set", "99999999999", "--balance", "10", "--rate-percent", "1"], 1, "no meter"),
        (["debts", "clear", METER], 1, "no debt"),
        (["debts", "show", "99999999999"], 1, "no meter"),
        (["fbe", "set", "domestic", "--kwh", "5.05"], 2, "--kwh"),
        (["fbe", "set", "domestic", "--kwh", "1638.5"], 2, "a token carries"),
        (["fbe", "set", "nope", "--kwh", "5"], 1, "no tariff"),
        (["fbe", "show", "domestic", "--meter", "99999999999"], 1, "no meter"),
    ],
)
def test_errors_exit_non_zero_and_say_why(
    data: list[str], capsys: pytest.CaptureFixture[str], argv: list[str], code: int, said: str
) -> None:
    """Bad arguments exit 2, unknown meters, tariffs and debts 1, each with a sentence."""
    assert main([*argv, *data]) == code
    assert said in capsys.readouterr().err


def test_fbe_set_and_show(data: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """5.0 kWh a month is 50 units; the meter has no FBE token yet; 0 stops it."""
    assert main(["fbe", "set", "domestic", "--kwh", "5", "--json", *data]) == 0
    assert _json(capsys)["units_per_month"] == 50
    assert main(["fbe", "show", "domestic", "--meter", METER, "--json", *data]) == 0
    shown = _json(capsys)
    assert (shown["kwh_per_month"], shown["issued"]) == ("5.0", [])
    assert main(["fbe", "set", "domestic", "--kwh", "0", *data]) == 0
    capsys.readouterr()
    assert main(["fbe", "show", "domestic", "--json", *data]) == 0
    assert _json(capsys)["units_per_month"] == 0
