"""Numbered schema migrations, one directory per backend, applied in order at open."""

from __future__ import annotations

import importlib.resources
import re
from typing import Final

_MIGRATION_NAME: Final = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def packaged_migrations(dialect: str) -> list[tuple[int, str, str]]:
    """The migrations of ``dialect`` (``sqlite``, ``postgres``): (version, file, SQL), in order."""
    folder = importlib.resources.files(f"gateway.ledger.migrations.{dialect}")
    found: list[tuple[int, str, str]] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    return found
