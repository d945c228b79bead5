"""``gateway serve --workers``: how many workers each backend runs, and the refusals, explained."""

import itertools
import os
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.commands._workers import (
    RESTART_BACKOFF_MAX_S,
    RESTART_BACKOFF_S,
    STABLE_AFTER_S,
    _Restarts,
)
from gateway.commands.serve import resolve_workers
from gateway.config import Config, Mode, Secret
from gateway.errors import ConfigError

PG = "postgresql://127.0.0.1:5432/test"


def production(**changes: object) -> Config:
    """A production-like configuration on PostgreSQL with no simulator in the process."""
    fields: dict[str, object] = {
        "mode": Mode.PRODUCTION,
        "database_url": PG,
        "payments": "momo",
        "sms": "africastalking",
        "callback_secret": Secret("cb"),
        "admin_token": Secret("admin"),
    }
    fields.update(changes)
    return Config(**fields)  # type: ignore[arg-type]


def test_postgresql_defaults_to_one_worker_per_core_and_takes_what_is_asked() -> None:
    """On PostgreSQL without in-process simulators: the core count, or the number asked."""
    assert resolve_workers(production(), None) == (os.cpu_count() or 1)
    assert resolve_workers(production(), 3) == 3
    assert resolve_workers(production(), 1) == 1


def test_sqlite_runs_one_worker_and_refuses_more_saying_why(tmp_path: Path) -> None:
    """SQLite: one by default; more asked is refused with the reason and the way out."""
    sqlite = production(database_url=f"sqlite:///{tmp_path / 'g.db'}")
    assert resolve_workers(sqlite, None) == 1
    assert resolve_workers(sqlite, 1) == 1
    with pytest.raises(ConfigError, match="SQLite") as refused:
        resolve_workers(sqlite, 2)
    assert "PostgreSQL" in str(refused.value)


def test_in_process_simulators_run_one_worker_even_on_postgresql() -> None:
    """The demo's simulators listen once, in the gateway: one worker unless they run apart."""
    demo_on_pg = Config(database_url=PG)  # payments and SMS simulated
    assert demo_on_pg.uses_simulators
    assert resolve_workers(demo_on_pg, None) == 1
    with pytest.raises(ConfigError, match="gateway sim"):
        resolve_workers(demo_on_pg, 2)


def test_in_memory_sessions_run_one_worker() -> None:
    """A USSD session's hops may land on any worker: memory sessions allow only one."""
    memory = production(session_store="memory")
    assert resolve_workers(memory, None) == 1
    with pytest.raises(ConfigError, match="memory"):
        resolve_workers(memory, 2)
    assert resolve_workers(production(session_store="redis"), 2) == 2


def test_serve_refuses_two_workers_on_sqlite_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gateway serve --workers 2`` on the SQLite default exits 2 naming the flag; no file made."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    data = tmp_path / "data"
    assert main(["serve", "--workers", "2", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "--workers" in err
    assert "SQLite" in err
    assert not data.exists()


def test_workers_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    """``--workers 0`` is a usage error."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--workers", "0"])
    assert exited.value.code == 2
    assert "at least 1" in capsys.readouterr().err


def test_a_worker_dying_again_and_again_waits_longer_each_time_then_starts_afresh() -> None:
    """The restart pause doubles while a worker keeps dying quickly, capped; a stable run resets."""
    restarts = _Restarts()
    pauses = [restarts.schedule(0, lived_s=0.1, now=100.0) for _ in range(10)]
    assert pauses[0] == RESTART_BACKOFF_S
    assert all(b == min(a * 2, RESTART_BACKOFF_MAX_S) for a, b in itertools.pairwise(pauses))
    assert pauses[-1] == RESTART_BACKOFF_MAX_S
    assert restarts.due[0] == 100.0 + RESTART_BACKOFF_MAX_S
    assert restarts.schedule(0, lived_s=STABLE_AFTER_S, now=200.0) == RESTART_BACKOFF_S
    assert restarts.schedule(1, lived_s=0.1, now=200.0) == RESTART_BACKOFF_S  # per worker
