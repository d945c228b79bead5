"""Guards for the USSD hop's hot path: what it stores, how often, and how stores sweep."""

import sqlite3
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from flows.engine import Frame, Notice, Session, UssdEngine, UssdHop
from flows.journeys import build_screens
from flows.ports import Language
from flows.sessions import MemorySessionStore, SqliteSessionStore
from flows.testing import FakeCustomerServices, make_meter_number
from gateway.phone import Msisdn
from tests.support.clock import SecondsClock

PHONE = Msisdn("+254711000001")
METER = make_meter_number("3701234567")


class CountingStore(MemorySessionStore):
    """The in-memory store, counting reads and writes."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.puts = 0

    async def get(self, key: str) -> str | None:
        """Count, then read."""
        self.gets += 1
        return await super().get(key)

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        """Count, then write."""
        self.puts += 1
        await super().put(key, value, ttl_s)


texts = st.text(max_size=12)
notices = st.none() | st.builds(Notice, texts, st.dictionaries(texts, texts, max_size=3))
frames = st.builds(
    Frame,
    st.sampled_from(["home", "buy_meter", "buy_amount", "buy_confirm"]),
    st.dictionaries(texts, texts, max_size=6),
    st.integers(0, 9),
    notices,
    st.dictionaries(st.integers(1, 99).map(str), texts, max_size=8),
    st.booleans(),
    st.booleans(),
)
sessions = st.builds(
    Session,
    session_id=texts,
    phone=texts,
    language=st.sampled_from(list(Language)),
    stack=st.lists(frames, min_size=1, max_size=5),
    last_text=st.none() | texts,
    last_reply=st.text(max_size=182),
    ended=st.booleans(),
    hops=st.integers(0, 1000),
    updated_at=st.floats(0, 4e9, allow_nan=False),
)


@given(sessions)
def test_a_session_reads_back_exactly_as_it_was_written(session: Session) -> None:
    """Any session survives dumps then loads unchanged (every field, every frame)."""
    assert Session.loads(session.dumps()) == session


def test_a_session_stored_by_an_earlier_release_is_still_read() -> None:
    """The keyed-object form written before the compact one loads into the same session."""
    raw = (
        '{"id":"at:x","ph":"+254711000001","l":"sw","st":[{"s":"home","a":{},"p":0,'
        '"c":{"1":"buy","2":"token"}},{"s":"buy_meter","a":{"m":"1"},"p":1,'
        '"n":["meter_bad_format",{}],"m":1,"f":1}],"t":"1","r":"Weka","e":false,"h":2,"u":5.5}'
    )
    session = Session.loads(raw)
    assert session == Session(
        session_id="at:x",
        phone="+254711000001",
        language=Language.SW,
        stack=[
            Frame("home", {}, 0, None, {"1": "buy", "2": "token"}),
            Frame(
                "buy_meter",
                {"m": "1"},
                page=1,
                notice=Notice("meter_bad_format", {}),
                has_more=True,
                free_text=True,
            ),
        ],
        last_text="1",
        last_reply="Weka",
        ended=False,
        hops=2,
        updated_at=5.5,
    )


async def test_a_hop_after_the_dial_reads_once_and_writes_once() -> None:
    """Every hop after the dial costs the store exactly one get and one put."""
    services = FakeCustomerServices()
    services.add_meter(METER)
    store = CountingStore()
    engine = UssdEngine(services, store, build_screens())
    path: list[str] = []
    costs: list[tuple[int, int]] = []
    for step, answer in enumerate(["", "1", METER, "500", "2"]):
        if step:
            path.append(answer)
        before = (store.gets, store.puts)
        await engine.handle(
            UssdHop(session_id="at:s1", phone=PHONE, service_code="*384*123#", text="*".join(path))
        )
        costs.append((store.gets - before[0], store.puts - before[1]))
    # the dial also reads and writes the phone's last-session pointer (resume on redial)
    assert costs == [(2, 2), (1, 1), (1, 1), (1, 1), (1, 1)]


async def test_the_memory_store_sweeps_expired_keys_and_keeps_live_ones() -> None:
    """After enough writes, every expired key is gone from memory and every live one remains."""
    clock = SecondsClock()
    store = MemorySessionStore(clock)
    for i in range(192):
        await store.put(f"old{i}", "v", 10)
    clock.now += 20
    for i in range(192):
        await store.put(f"new{i}", "v", 10)
    assert len(store) == 192
    assert await store.get("new0") == "v"


async def test_the_sqlite_store_sweeps_expired_rows_and_keeps_live_ones(tmp_path: Path) -> None:
    """After enough writes, every expired row is deleted from the file and every live one stays."""
    clock = SecondsClock()
    store = SqliteSessionStore.open(tmp_path / "s.db", clock=clock)
    try:
        for i in range(192):
            await store.put(f"old{i}", "v", 10)
        clock.now += 20
        for i in range(192):
            await store.put(f"new{i}", "v", 10)
        with sqlite3.connect(tmp_path / "s.db") as peek:
            keys = [row[0] for row in peek.execute("SELECT key FROM ussd_sessions")]
        assert sorted(keys) == sorted(f"new{i}" for i in range(192))
    finally:
        store.close()
