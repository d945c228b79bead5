"""Arguments every command that touches a running configuration shares.

``--config FILE``, ``--data-dir DIR`` and ``--database-url URL`` (each also a ``GATEWAY_*``
variable), loaded through ``Config.load`` so flags beat variables beat the file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gateway.config import Config
from gateway.money import Money


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config``, ``--data-dir`` and ``--database-url`` to ``parser``."""
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where the SQLite files live (default ./var)"
    )
    parser.add_argument(
        "--database-url", default=None, help="sqlite:///path or postgresql://… (default: data dir)"
    )


def load_config(args: argparse.Namespace, **overrides: object) -> Config:
    """The configuration from the environment, the ``--config`` file and the flags.

    Raises:
        ConfigError: a setting is malformed; the message names it.
    """
    flags: dict[str, object] = {
        "data_dir": getattr(args, "data_dir", None),
        "database_url": getattr(args, "database_url", None),
        **overrides,
    }
    return Config.load(env=os.environ, file=getattr(args, "config", None), overrides=flags)


def minor_units(flag: str, text: str, currency: str) -> int:
    """``text`` (major units, e.g. ``"1500.50"``) as minor units of ``currency``, never negative.

    Raises:
        ValueError: not an amount of ``currency``, or negative; the message names ``flag``.
    """
    try:
        value = Money.of(text, currency).amount_minor
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from exc
    if value < 0:
        raise ValueError(f"{flag}: cannot be negative: {text!r}")
    return value
