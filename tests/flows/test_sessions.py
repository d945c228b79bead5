import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.ports import SessionStore
from flows.sessions import MemorySessionStore, SqliteSessionStore
from tests.support.clock import SecondsClock


@pytest.fixture
def clock() -> SecondsClock:
    """A fake clock shared by the store under test."""
    return SecondsClock(100.0)


@pytest.fixture(params=["memory", "sqlite"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: SecondsClock
) -> Iterator[SessionStore]:
    """Each SessionStore implementation (the same contract for all)."""
    if request.param == "memory":
        yield MemorySessionStore(clock)
        return
    sqlite = SqliteSessionStore.open(tmp_path / "sessions.db", clock=clock)
    yield sqlite
    sqlite.close()


async def test_put_then_get_returns_the_value(store: SessionStore) -> None:
    """A stored value reads back until replaced."""
    await store.put("k", "v1", 10)
    assert await store.get("k") == "v1"
    await store.put("k", "v2", 10)
    assert await store.get("k") == "v2"


async def test_expired_values_read_as_absent(store: SessionStore, clock: SecondsClock) -> None:
    """After its ttl a value is gone."""
    await store.put("k", "v", 10)
    clock.now += 10.5
    assert await store.get("k") is None


async def test_add_stores_only_when_absent_or_expired(
    store: SessionStore, clock: SecondsClock
) -> None:
    """Add is set-if-absent: refused while the key lives, allowed once it expired."""
    assert await store.add("k", "first", 10)
    assert not await store.add("k", "second", 10)
    assert await store.get("k") == "first"
    clock.now += 11
    assert await store.add("k", "third", 10)
    assert await store.get("k") == "third"


async def test_delete_removes_and_tolerates_absence(store: SessionStore) -> None:
    """Delete removes a key; deleting a missing key is fine."""
    await store.put("k", "v", 10)
    await store.delete("k")
    await store.delete("k")
    assert await store.get("k") is None


async def test_two_sqlite_connections_share_state(tmp_path: Path, clock: SecondsClock) -> None:
    """Two worker processes' stores on one file see each other's sessions."""
    first = SqliteSessionStore.open(tmp_path / "s.db", clock=clock)
    second = SqliteSessionStore.open(tmp_path / "s.db", clock=clock)
    await first.put("k", "v", 10)
    assert await second.get("k") == "v"
    assert not await second.add("k", "w", 10)
    first.close()
    second.close()


async def test_a_locked_database_is_waited_for_without_blocking_the_loop(tmp_path: Path) -> None:
    """Waiting on another process's write lock never blocks the event loop."""
    path = tmp_path / "locked.db"
    store = SqliteSessionStore.open(path, busy_timeout_ms=50)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    with pytest.raises(sqlite3.OperationalError):
        await store.put("k", "v", 10)
    task.cancel()
    assert ticks > 10
    blocker.execute("COMMIT")
    blocker.close()
    await store.put("k", "v", 10)
    assert await store.get("k") == "v"
    store.close()


async def test_the_writes_of_one_loop_turn_share_one_commit(tmp_path: Path) -> None:
    """Writes made together are committed together, and each caller sees its own outcome."""
    store = SqliteSessionStore.open(tmp_path / "s.db")
    try:
        before = store.batches
        stored = await asyncio.gather(
            *(store.put(f"k{i}", f"v{i}", 10) for i in range(20)),
            store.add("k0", "other", 10),
            store.add("fresh", "v", 10),
        )
        assert store.batches == before + 1
        assert stored[-2:] == [False, True]
        assert [await store.get(f"k{i}") for i in range(20)] == [f"v{i}" for i in range(20)]
        second = SqliteSessionStore.open(tmp_path / "s.db")  # committed: another connection sees it
        assert await second.get("k19") == "v19"
        second.close()
    finally:
        store.close()


async def test_a_batch_that_cannot_begin_fails_each_caller_instead_of_hanging(
    tmp_path: Path,
) -> None:
    """An error other than "locked" when the turn's transaction begins reaches every caller."""
    store = SqliteSessionStore.open(tmp_path / "s.db")
    store._db.close()  # the file is gone from under the store: BEGIN fails (not as "busy")
    outcomes = await asyncio.wait_for(
        asyncio.gather(store.put("a", "1", 10), store.put("b", "2", 10), return_exceptions=True),
        5,
    )
    assert all(isinstance(outcome, sqlite3.Error) for outcome in outcomes)
    assert not store._pending


def test_workers_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Several processes' first open of one new file (WAL switch, schema) never fails locked."""
    for round_ in range(5):
        path = tmp_path / f"race{round_}.db"
        start = threading.Barrier(6)
        failures: list[BaseException] = []

        def open_it(
            path: Path = path,
            start: threading.Barrier = start,
            failures: list[BaseException] = failures,
        ) -> None:
            start.wait()
            try:
                SqliteSessionStore.open(path).close()
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                failures.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
