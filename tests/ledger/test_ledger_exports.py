"""The ledger package's public surface is exactly its ``__all__``."""

from __future__ import annotations

import gateway.ledger


def test_every_exported_name_exists_and_is_public() -> None:
    """Each name in ``gateway.ledger.__all__`` is importable; no private name is exported."""
    for name in gateway.ledger.__all__:
        assert hasattr(gateway.ledger, name), name
        assert not name.startswith("_"), name
    assert len(set(gateway.ledger.__all__)) == len(gateway.ledger.__all__)
