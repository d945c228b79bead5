"""Renamed settings: the old names are still accepted, the new name wins when both are given."""

from __future__ import annotations

from pathlib import Path

from gateway.config import ALIASES, Config


def test_the_old_first_check_name_still_sets_it() -> None:
    """``GATEWAY_PAYMENT_DEADLINE_S`` (the old name) sets ``payment_first_check_s``."""
    config = Config.load(env={"GATEWAY_PAYMENT_DEADLINE_S": "7"})
    assert config.payment_first_check_s == 7
    assert config.payment_deadline_s == 7  # and reads back under the old name


def test_the_new_name_wins_over_the_old(tmp_path: Path) -> None:
    """A TOML file with the old key and a variable with the new one: the new one counts."""
    toml = tmp_path / "gateway.toml"
    toml.write_text("payment_deadline_s = 5\n", encoding="utf-8")
    config = Config.load(env={"GATEWAY_PAYMENT_FIRST_CHECK_S": "9"}, file=toml)
    assert config.payment_first_check_s == 9


def test_every_alias_names_a_setting() -> None:
    """Each old name maps to a setting that exists."""
    defaults = Config()
    assert all(hasattr(defaults, new) for new in ALIASES.values())
