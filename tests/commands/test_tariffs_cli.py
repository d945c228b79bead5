import json
from pathlib import Path

import pytest

from gateway.cli import main

BASE = ["--name", "Domestic", "--currency", "KES", "--min", "50", "--max", "35000"]


def test_a_tariff_is_stored_in_minor_units_and_shown_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tariffs set`` then ``tariffs show`` gives the same tariff, money exact."""
    data = ["--data-dir", str(tmp_path)]
    assert main(["tariffs", "set", "domestic", *BASE, "--price-per-kwh", "25.50",
                 "--vat-percent", "16", *data]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["tariffs", "show", "domestic", "--json", *data]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["price_per_kwh"] == "KES 25.50"
    assert shown["vat_percent"] == "16"
    assert shown["min_purchase"] == "KES 50.00"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--price-per-kwh", "25.505"], "--price-per-kwh"),
        (["--price-per-kwh", "abc"], "--price-per-kwh"),
        (["--price-per-kwh", "25", "--vat-percent", "16.125"], "--vat-percent"),
    ],
)
def test_bad_amounts_are_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    """A price finer than the currency allows, or not a number, is refused, never rounded."""
    code = main(["tariffs", "set", "t", *BASE, *flags, "--data-dir", str(tmp_path)])
    assert code == 2
    assert named in capsys.readouterr().err


def test_showing_an_unknown_tariff_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown tariff id exits 1 with a sentence naming it."""
    assert main(["tariffs", "show", "nope", "--data-dir", str(tmp_path)]) == 1
    assert "nope" in capsys.readouterr().err
