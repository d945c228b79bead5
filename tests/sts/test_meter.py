"""The meter emulator's acceptance rules (docs/sts.md §9-§10), driven by the local engine."""

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from gateway.sts.amount import UNITS_MAX, round_currency, round_units
from gateway.sts.carrier import extract_class, insert_class, to_digits
from gateway.sts.cipher import make_cipher
from gateway.sts.crc import crc_field
from gateway.sts.dkga import derive_decoder_key
from gateway.sts.engine import LocalTokenEngine, MeterProfile, VendingKey
from gateway.sts.errors import InvalidKey, TidRangeExhausted
from gateway.sts.keychange import key_change_fields
from gateway.sts.meter import (
    CreditAdded,
    CreditCleared,
    DisplayRequested,
    KeyChanged,
    KeySectionStored,
    MeterEmulator,
    Setting,
    SettingChanged,
    TamperCleared,
    Verdict,
)
from gateway.sts.tid import next_tid
from gateway.sts.tokens import (
    ClearCredit,
    ClearTamper,
    CurrencyCredit,
    KeySection1,
    KeySection2,
    KeySectionExtra,
    MeterTest,
    PowerLimit,
    RegisterSetting,
    TokenFields,
    UnitsCredit,
    build_token,
)

VK_2014 = VendingKey(
    sgc="201457",
    krn=1,
    dkga=4,
    base_date=2014,
    key=bytes.fromhex("abababababababab949494949494949401234567"),
)
VK_NEW_SGC = VendingKey(sgc="201461", krn=1, dkga=4, base_date=2014, key=bytes.fromhex("cd" * 20))
VK_2035 = VendingKey(sgc="203557", krn=6, dkga=4, base_date=2035, key=bytes.fromhex("ef" * 20))
VK_1993 = VendingKey(sgc="123456", krn=1, dkga=2, base_date=1993, key=bytes.fromhex("ab" * 8))
METER = MeterProfile(drn="00000000000", sgc="201457", tariff_index="01", krn=1)
OTHER_METER = replace(METER, drn="47500150231")
NOW = datetime(2025, 6, 1, 12, 30, tzinfo=UTC)


@pytest.fixture
def engine() -> LocalTokenEngine:
    """A local engine holding every test vending key."""
    return LocalTokenEngine([VK_2014, VK_NEW_SGC, VK_2035, VK_1993])


@pytest.fixture
def meter() -> MeterEmulator:
    """A keypad meter keyed like METER (DKGA04, EA07, base date 2014)."""
    return MeterEmulator.for_profile(METER, VK_2014)


def _tid(minute: int = 0) -> int:
    return next_tid(NOW, 2014, None) + minute


def test_fresh_credit_is_accepted_once_then_used(
    engine: LocalTokenEngine, meter: MeterEmulator
) -> None:
    """A fresh credit token is accepted and credited; the same token again is USED."""
    token = engine.credit_token_sync(METER, 125, _tid())
    first = meter.enter(token.digits)
    assert first.verdict is Verdict.ACCEPTED
    assert first.change == CreditAdded(register=0, amount=125, balance=125)
    second = meter.enter(token.digits)
    assert second.verdict is Verdict.USED
    assert meter.credit[0] == 125


def test_token_for_another_meter_is_a_crc_error(
    engine: LocalTokenEngine, meter: MeterEmulator
) -> None:
    """A token made with another meter's decoder key fails the CRC check."""
    token = engine.credit_token_sync(OTHER_METER, 10, _tid())
    assert meter.enter(token.digits).verdict is Verdict.CRC_ERROR
    assert meter.credit[0] == 0


async def test_same_minute_tokens_get_consecutive_tids_and_both_are_accepted(
    engine: LocalTokenEngine, meter: MeterEmulator
) -> None:
    """Two vends in one minute (TIDs via next_tid) carry consecutive TIDs; the meter takes both."""
    first_tid = next_tid(NOW, METER.base_date, None)
    second_tid = next_tid(NOW, METER.base_date, first_tid)
    assert second_tid == first_tid + 1
    first = await engine.credit_token(METER, 10, first_tid)
    second = await engine.credit_token(METER, 10, second_tid)
    assert meter.enter(first.digits).verdict is Verdict.ACCEPTED
    assert meter.enter(second.digits).verdict is Verdict.ACCEPTED
    assert meter.tids == (first_tid, second_tid)


def test_1993_key_in_2025_needs_a_rollover_key_change() -> None:
    """A meter on a 1993 base-date key gets no TID in 2025: the error names the rollover."""
    with pytest.raises(TidRangeExhausted, match="rollover"):
        next_tid(datetime(2025, 1, 15, tzinfo=UTC), VK_1993.base_date, None)


def test_full_store_refuses_older_tids(engine: LocalTokenEngine) -> None:
    """With the store full, a TID below its smallest is OLD; a newer one evicts the smallest."""
    meter = MeterEmulator.for_profile(METER, VK_2014, tid_store_depth=3)
    for minute in (10, 20, 30):
        assert meter.enter(engine.credit_token_sync(METER, 1, _tid(minute)).digits).accepted
    assert meter.enter(engine.credit_token_sync(METER, 1, _tid(5)).digits).verdict is Verdict.OLD
    assert meter.enter(engine.credit_token_sync(METER, 1, _tid(15)).digits).accepted
    assert meter.tids == (_tid(15), _tid(20), _tid(30))


def test_store_not_full_accepts_an_older_tid(
    engine: LocalTokenEngine, meter: MeterEmulator
) -> None:
    """Out-of-order tokens are fine while the store has room (tokens may be keyed late)."""
    assert meter.enter(engine.credit_token_sync(METER, 1, _tid(10)).digits).accepted
    assert meter.enter(engine.credit_token_sync(METER, 1, _tid(1)).digits).accepted


def test_tid_past_the_ken_is_key_expired(engine: LocalTokenEngine) -> None:
    """With KEN 0, a TID whose top 8 bits are 1 is refused as KEY_EXPIRED."""
    profile = replace(METER, ken=0)
    meter = MeterEmulator.for_profile(profile, VK_2014)
    image = build_token(
        UnitsCredit(rnd=1, tid=0x010000, amount=1), make_cipher(7, engine.decoder_key(METER))
    )
    assert meter.enter(image.digits).verdict is Verdict.KEY_EXPIRED


def test_default_key_refuses_credit_but_takes_management(engine: LocalTokenEngine) -> None:
    """A meter with a DDTK (KT 1) refuses credit tokens and accepts a clear-tamper token."""
    profile = replace(METER, key_type=1)
    meter = MeterEmulator.for_profile(profile, VK_2014)
    credit = engine.credit_token_sync(profile, 10, _tid())
    assert meter.enter(credit.digits).verdict is Verdict.KEY_TYPE_REFUSED
    tamper = engine.management_token_sync(profile, 5, _tid(1), 0)
    assert meter.enter(tamper.digits).verdict is Verdict.ACCEPTED


@pytest.mark.parametrize(
    "text",
    ["1234", "73786976294838206464", "abcdefghijabcdefghij"],
    ids=["short", "2**66", "alpha"],
)
def test_malformed_text_is_a_format_error(meter: MeterEmulator, text: str) -> None:
    """Wrong length, non-digits and values >= 2**66 are FORMAT_ERROR."""
    assert meter.enter(text).verdict is Verdict.FORMAT_ERROR


def test_reserved_subclass_is_not_supported(engine: LocalTokenEngine, meter: MeterEmulator) -> None:
    """A CRC-valid class 0 subclass 12 token (proprietary) is NOT_SUPPORTED."""
    head = 12 << 44 | 0x5_00ABCD_0001
    block = head << 16 | crc_field(head)
    cipher = make_cipher(7, engine.decoder_key(METER))
    digits = to_digits(insert_class(cipher.encrypt(block), 0))
    assert meter.enter(digits).verdict is Verdict.NOT_SUPPORTED


def test_management_tokens_set_the_registers(
    engine: LocalTokenEngine, meter: MeterEmulator
) -> None:
    """Power limit, phase unbalance, tariff, water factor, clear tamper and clear credit apply."""
    meter.tamper()
    meter.enter(engine.credit_token_sync(METER, 50, _tid(0)).digits)
    meter.enter(engine.credit_token_sync(METER, 70, _tid(1), subclass=1).digits)
    answers = [
        meter.enter(engine.management_token_sync(METER, sub, _tid(2 + i), value).digits)
        for i, (sub, value) in enumerate([(0, 20000), (6, 3000), (2, 1234), (7, 55), (5, 0)])
    ]
    assert [a.change for a in answers] == [
        SettingChanged(setting=Setting.MAXIMUM_POWER_LIMIT, value=round_units(20000)),
        SettingChanged(setting=Setting.PHASE_UNBALANCE_LIMIT, value=3000),
        SettingChanged(setting=Setting.TARIFF_RATE, value=1234),
        SettingChanged(setting=Setting.WATER_METER_FACTOR, value=55),
        TamperCleared(),
    ]
    assert not meter.tampered
    cleared = meter.enter(engine.management_token_sync(METER, 1, _tid(9), 0).digits)
    assert cleared.change == CreditCleared(registers=(0,))
    assert (meter.credit[0], meter.credit[1]) == (0, 70)
    everything = meter.enter(engine.management_token_sync(METER, 1, _tid(10), 0xFFFF).digits)
    assert everything.accepted
    assert set(meter.credit.values()) == {0}


def test_test_token_is_accepted_without_a_key(meter: MeterEmulator) -> None:
    """A class 1 test token needs no key and asks for the tests in its control field."""
    answer = meter.enter("00000000000150997584")
    assert answer.change == DisplayRequested(control=1, manufacturer_code=0)


# --- key change -----------------------------------------------------------------------------


def test_key_change_installs_the_new_key_only_when_complete(
    engine: LocalTokenEngine, meter: MeterEmulator
) -> None:
    """After the 2-token set the meter takes new-key tokens only; halfway it still uses the old."""
    new = replace(METER, tariff_index="02", krn=1)
    first, second = engine.key_change_tokens_sync(METER, new)
    pending = meter.enter(first.digits)
    assert pending.verdict is Verdict.KEY_CHANGE_PENDING
    assert pending.change == KeySectionStored(subclass=3, missing=(4,))
    assert meter.enter(engine.credit_token_sync(METER, 1, _tid(0)).digits).accepted
    done = meter.enter(second.digits)
    assert isinstance(done.change, KeyChanged)
    assert done.change.attributes == new.key_attributes()
    assert meter.enter(engine.credit_token_sync(METER, 1, _tid(1)).digits).verdict is (
        Verdict.CRC_ERROR
    )
    assert meter.enter(engine.credit_token_sync(new, 1, _tid(2)).digits).accepted


def test_sgc_change_is_the_two_token_set(engine: LocalTokenEngine, meter: MeterEmulator) -> None:
    """An EA07 SGC change is sections 3 + 4 with 3KCT = 0, as CTSA19.4 (v074) and CTSA05 do.

    The SGC is part of the derived key: the meter takes the new key and credit under it.
    """
    new = replace(METER, sgc="201461")
    tokens = engine.key_change_tokens_sync(METER, new)
    answers = [meter.enter(t.digits) for t in tokens]
    assert [a.verdict for a in answers] == [Verdict.KEY_CHANGE_PENDING, Verdict.ACCEPTED]
    first = answers[0].token
    assert first is not None
    assert isinstance(first.fields, KeySection1)
    assert first.fields.three_kct == 0
    assert meter.enter(engine.credit_token_sync(new, 1, _tid()).digits).accepted


def test_the_three_token_set_when_asked_carries_the_sgc(
    engine: LocalTokenEngine, meter: MeterEmulator
) -> None:
    """``three_kct=True`` sends 3 + 4 + 8 with 3KCT = 1; the meter takes the new SGC."""
    new = replace(METER, sgc="201461")
    tokens = engine.key_change_tokens_sync(METER, new, three_kct=True)
    answers = [meter.enter(t.digits) for t in tokens]
    assert [a.verdict for a in answers] == [
        Verdict.KEY_CHANGE_PENDING,
        Verdict.KEY_CHANGE_PENDING,
        Verdict.ACCEPTED,
    ]
    assert meter.attributes.sgc == "201461"
    assert meter.enter(engine.credit_token_sync(new, 1, _tid()).digits).accepted


def test_rollover_clears_the_tid_store(engine: LocalTokenEngine, meter: MeterEmulator) -> None:
    """Moving to a 2035 key sets RO; the meter forgets its TIDs and takes small new TIDs."""
    meter.enter(engine.credit_token_sync(METER, 1, _tid()).digits)
    new = replace(METER, sgc="203557", krn=6, base_date=2035)
    answers = [meter.enter(t.digits) for t in engine.key_change_tokens_sync(METER, new)]
    change = answers[-1].change
    assert isinstance(change, KeyChanged)
    assert change.rollover
    assert meter.tids == ()
    assert meter.attributes.base_date == 2035
    assert meter.enter(engine.credit_token_sync(new, 1, 495).digits).accepted


def test_ea11_key_change_is_four_tokens(engine: LocalTokenEngine) -> None:
    """An EA11 set is 3 + 4 + 8 + 9 and installs the 16-byte key with the new SGC."""
    old = replace(METER, ea=11)
    new = replace(old, sgc="201461", krn=1)
    meter = MeterEmulator.for_profile(old, VK_2014)
    tokens = engine.key_change_tokens_sync(old, new)
    answers = [meter.enter(t.digits) for t in tokens]
    assert [a.token.fields.subclass for a in answers if a.token] == [3, 4, 8, 9]
    assert answers[-1].verdict is Verdict.ACCEPTED
    assert meter.attributes.sgc == "201461"
    assert meter.enter(engine.credit_token_sync(new, 7, _tid()).digits).accepted
    assert meter.enter(engine.credit_token_sync(old, 7, _tid(1)).digits).verdict is (
        Verdict.CRC_ERROR
    )


@pytest.mark.parametrize(("new_kt", "keypad"), [(0, True), (3, True)])
def test_forbidden_new_key_types_are_refused(
    engine: LocalTokenEngine, meter: MeterEmulator, new_kt: int, keypad: bool
) -> None:
    """A change to KT 0 (from KT 2) or to KT 3 on a keypad meter is KEY_TYPE_REFUSED."""
    new = replace(METER, key_type=new_kt)
    first = engine.key_change_tokens_sync(METER, new)[0]
    assert meter.enter(first.digits).verdict is Verdict.KEY_TYPE_REFUSED


# --- properties -------------------------------------------------------------------------------

_KEYS = LocalTokenEngine([VK_2014])
DK = _KEYS.decoder_key(METER)
DK11 = _KEYS.decoder_key(replace(METER, ea=11))
RND = st.integers(0, 15)
TID = st.integers(0, 2**24 - 1)
WORD = st.integers(0, 0xFFFF)
CREDIT_FIELDS: st.SearchStrategy[TokenFields] = st.one_of(
    st.builds(
        UnitsCredit,
        subclass=st.integers(0, 3),
        rnd=RND,
        tid=TID,
        amount=st.integers(0, UNITS_MAX),
    ),
    st.builds(
        CurrencyCredit, subclass=st.integers(4, 7), tid=TID, amount=st.integers(-(10**12), 10**12)
    ),
)
ALL_FIELDS: st.SearchStrategy[TokenFields] = st.one_of(
    CREDIT_FIELDS,
    st.builds(MeterTest, subclass=st.just(0), control=st.integers(0, 2**36 - 1)),
    st.builds(MeterTest, subclass=st.just(1), control=st.integers(0, 2**28 - 1)),
    st.builds(PowerLimit, subclass=st.sampled_from([0, 6]), rnd=RND, tid=TID, amount=WORD),
    st.builds(ClearCredit, rnd=RND, tid=TID, register=st.sampled_from([*range(8), 0xFFFF])),
    st.builds(RegisterSetting, subclass=st.sampled_from([2, 7, 10]), rnd=RND, tid=TID, value=WORD),
    st.builds(ClearTamper, rnd=RND, tid=TID),
    st.builds(
        KeySection1,
        kenho=RND,
        krn=st.integers(1, 9),
        ro=st.integers(0, 1),
        three_kct=st.integers(0, 1),
        kt=st.sampled_from([1, 2]),
        nkho=st.integers(0, 2**32 - 1),
    ),
    st.builds(KeySection2, kenlo=RND, ti=st.integers(0, 99), nklo=st.integers(0, 2**32 - 1)),
    st.builds(KeySectionExtra, subclass=st.sampled_from([8, 9]), payload=st.integers(0, 2**44 - 1)),
)


def _fresh_meter(ea: int) -> MeterEmulator:
    profile = replace(METER, ea=ea)
    return MeterEmulator.for_profile(profile, VK_2014)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(fields=ALL_FIELDS, ea=st.sampled_from([7, 11]))
def test_every_token_reads_back_in_the_meter(fields: TokenFields, ea: int) -> None:
    """Any valid contents → token under the meter's key → the meter decodes the same contents."""
    meter = _fresh_meter(ea)
    cipher = make_cipher(ea, DK if ea == 7 else DK11)
    image = build_token(fields, cipher)
    answer = meter.enter(image.digits)
    note(f"{answer.verdict}: {answer.reason}")
    assert answer.token is not None
    expected = fields
    if isinstance(fields, UnitsCredit | PowerLimit):
        expected = replace(fields, amount=round_units(fields.amount))
    if isinstance(fields, CurrencyCredit):
        expected = replace(fields, amount=round_currency(fields.amount))
    assert answer.token.fields == expected
    if isinstance(fields, KeySectionExtra) and fields.subclass == 9 and ea == 7:
        assert answer.verdict is Verdict.NOT_SUPPORTED  # a 4th section exists for EA11 only
    else:
        assert answer.verdict not in {
            Verdict.CRC_ERROR,
            Verdict.FORMAT_ERROR,
            Verdict.NOT_SUPPORTED,
        }


# A one-digit change turns the 66-bit value into another one; after decryption its CRC matches
# by chance with probability 2**-16 (as on a real meter), so the examples are derandomized: the
# fixed set below never hits that case, and a broken CRC check or transposition fails it.
@settings(max_examples=200, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=CREDIT_FIELDS,
    ea=st.sampled_from([7, 11]),
    position=st.integers(0, 19),
    delta=st.integers(1, 9),
)
def test_changing_any_digit_makes_the_meter_reject_the_token(
    fields: TokenFields, ea: int, position: int, delta: int
) -> None:
    """A token with one digit changed is rejected (format or CRC error), never credited."""
    meter = _fresh_meter(ea)
    digits = build_token(fields, make_cipher(ea, DK if ea == 7 else DK11)).digits
    changed = digits[:position] + str((int(digits[position]) + delta) % 10) + digits[position + 1 :]
    answer = meter.enter(changed)
    note(f"{digits} -> {changed}: {answer.verdict}")
    assert not answer.accepted
    assert set(meter.credit.values()) == {0}


@pytest.mark.parametrize("digits", ["00000000000150997584", "56493153725450313471"])
def test_every_one_digit_change_of_a_test_token_is_rejected(digits: str) -> None:
    """Exhaustively: all 180 one-digit variants of a clear class 1 token are refused."""
    meter = _fresh_meter(7)
    for position in range(20):
        for delta in range(1, 10):
            digit = str((int(digits[position]) + delta) % 10)
            changed = digits[:position] + digit + digits[position + 1 :]
            assert not meter.enter(changed).accepted, changed


def test_class_bits_survive_transposition_in_the_meter(engine: LocalTokenEngine) -> None:
    """The meter reads class 2 from a management token (the transposed bits are restored)."""
    token = engine.management_token_sync(METER, 5, _tid(), 0)
    assert extract_class(int(token.digits))[0] == 2


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    tids=st.lists(st.integers(1000, 1060), min_size=1, max_size=40),
    depth=st.integers(1, 6),
)
def test_tid_store_invariants(tids: list[int], depth: int) -> None:
    """Whatever the order of credit tokens, each TID is credited at most once (newest always)."""
    engine = LocalTokenEngine([VK_2014], rnd=lambda: 0)
    meter = MeterEmulator.for_profile(METER, VK_2014, tid_store_depth=depth)
    accepted: list[int] = []
    for tid in tids:
        answer = meter.enter(engine.credit_token_sync(METER, 1, tid).digits)
        note(f"{tid}: {answer.verdict}")
        if accepted and tid > max(accepted):
            assert answer.verdict is Verdict.ACCEPTED
        if tid in accepted:
            assert answer.verdict in {Verdict.USED, Verdict.OLD}
        if answer.accepted:
            accepted.append(tid)
        assert len(meter.tids) <= depth
    assert len(set(accepted)) == len(accepted)
    assert meter.credit[0] == len(accepted)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    ea=st.sampled_from([7, 11]),
    krn=st.integers(0, 15),
    ti=st.integers(0, 255),
    sgc=st.integers(0, 2**24 - 1),
    three_kct=st.integers(0, 1),
)
def test_a_key_change_set_with_impossible_attributes_is_refused_not_raised(
    ea: int, krn: int, ti: int, sgc: int, three_kct: int
) -> None:
    """A key-change set with KRN 0/10-15, TI > 99 or SGC > 999999 is refused, not raised.

    The CRC-valid sections get a rejection verdict and the old key stays; valid ones install.
    """
    meter = _fresh_meter(ea)
    cipher = make_cipher(ea, DK if ea == 7 else DK11)
    sections: list[TokenFields] = [
        KeySection1(kenho=15, krn=krn, ro=0, three_kct=three_kct if ea == 7 else 0, kt=2, nkho=1),
        KeySection2(kenlo=15, ti=ti, nklo=2),
    ]
    if ea == 11:
        sections += [
            KeySectionExtra(subclass=8, payload=(sgc & 0xFFF) << 32 | 3),
            KeySectionExtra(subclass=9, payload=(sgc >> 12) << 32 | 4),
        ]
    elif three_kct:
        sections.append(KeySectionExtra(subclass=8, payload=sgc << 20))
    sgc_sent = ea == 11 or three_kct == 1
    valid = 1 <= krn <= 9 and ti <= 99 and (not sgc_sent or sgc <= 999_999)
    *first, last = [meter.enter(build_token(f, cipher).digits) for f in sections]
    assert all(r.verdict is Verdict.KEY_CHANGE_PENDING for r in first)
    assert last.verdict is (Verdict.ACCEPTED if valid else Verdict.NOT_SUPPORTED)
    old_key_works = meter.enter(build_token(ClearTamper(rnd=0, tid=_tid()), cipher).digits)
    assert old_key_works.accepted is not valid


# --- a rollover to the key the meter holds (issue 16, point 3) ----------------------------------

METER_1993 = MeterProfile(
    drn="00000000000", sgc="123456", tariff_index="01", krn=1, dkga=2, base_date=1993
)


def test_a_rollover_to_the_current_key_is_refused_and_old_tokens_stay_used(
    engine: LocalTokenEngine,
) -> None:
    """A DKGA02 1993 -> 2014 change alone derives the same key; with RO = 1 the meter refuses it.

    Before, it cleared the TID store and took a token used before the change again.
    """
    meter = MeterEmulator.for_profile(METER_1993, VK_1993)
    old_key = engine.decoder_key(METER_1993)
    used = engine.credit_token_sync(METER_1993, 10, 16_000_000)
    assert meter.enter(used.digits).accepted
    old, new = METER_1993.key_attributes(), replace(METER_1993, base_date=2014).key_attributes()
    same_key = derive_decoder_key(
        dkga=2,
        vending_key=VK_1993.key,
        iin=METER_1993.iin,
        drn=METER_1993.drn,
        key_type=2,
        sgc=new.sgc,
        tariff_index=new.tariff_index,
        krn=new.krn,
        base_date=new.base_date,
        ea=7,
    )
    assert same_key == old_key
    cipher = make_cipher(7, old_key)
    replay_set = [
        build_token(f, cipher) for f in key_change_fields(old=old, new=new, new_key=same_key)
    ]
    answers = [meter.enter(image.digits) for image in replay_set]
    assert [a.verdict for a in answers] == [Verdict.KEY_CHANGE_PENDING, Verdict.NOT_SUPPORTED]
    assert "rollover" in answers[-1].reason
    assert meter.attributes == old
    assert meter.enter(used.digits).verdict is Verdict.USED


def test_the_engine_refuses_to_build_a_rollover_to_the_current_key(
    engine: LocalTokenEngine,
) -> None:
    """The engine and ``key_change_fields`` refuse it, naming the reason."""
    with pytest.raises(InvalidKey, match="current one"):
        engine.key_change_tokens_sync(METER, METER, rollover=True)
    old_key = engine.decoder_key(METER_1993)
    with pytest.raises(InvalidKey, match="DKGA02 does not derive the key from the base date"):
        key_change_fields(
            old=METER_1993.key_attributes(),
            new=replace(METER_1993, base_date=2014).key_attributes(),
            new_key=old_key,
            old_key=old_key,
        )
    # A new key with RO = 1 is fine (the 2035 rollover of docs/sts.md §9); so is the same key
    # without a rollover or a change of base date (a KEN change).
    assert (
        len(
            engine.key_change_tokens_sync(
                METER, replace(METER, sgc="203557", krn=6, base_date=2035)
            )
        )
        >= 2
    )
    assert len(engine.key_change_tokens_sync(METER, replace(METER, ken=200))) == 2


# --- key-change sets as the conformance-style sets make them (issue 16, point 4) ----------------

VK = VK_2014.key  # abab…4567: the key of docs/sts.md §11 and of the STS 531-style sets


def test_default_sets_are_the_published_two_token_sets() -> None:
    """The published sets that change the SGC are two-token sets with 3KCT = 0.

    docs/sts.md §9's CTSA05 rollover (SGC 201457 -> 203557, 2014 -> 2035, KRN 6, TI 02) and v074's
    CTSA19.4 (SGC 201457 -> 201461, KRN 8).
    """
    engine = LocalTokenEngine(
        [
            VK_2014,
            VendingKey(sgc="203557", krn=6, dkga=4, base_date=2035, key=VK),
            VendingKey(sgc="201461", krn=8, dkga=4, base_date=2014, key=VK),
        ]
    )
    rollover = replace(METER, sgc="203557", krn=6, base_date=2035, tariff_index="02")
    assert [t.digits for t in engine.key_change_tokens_sync(METER, rollover)] == [
        "65413070543688156280",
        "27469374567476953413",
    ]
    first, _second = engine.key_change_tokens_sync(METER, replace(METER, sgc="201461", krn=8))
    assert first.digits == "41266369345358295161"


def test_a_key_is_never_assembled_from_two_sets(engine: LocalTokenEngine) -> None:
    """Set A's second section left over, then set B: B's first section starts afresh.

    Before, A's NKLO and B's NKHO made a key no token works under, installed at B's first
    section; now the meter waits for B's second section and takes credit under B's key.
    """
    meter = MeterEmulator.for_profile(METER, VK_2014)
    to_a, to_b = replace(METER, tariff_index="02"), replace(METER, tariff_index="03")
    _a1, a2 = engine.key_change_tokens_sync(METER, to_a)
    b1, b2 = engine.key_change_tokens_sync(METER, to_b)
    assert meter.enter(a2.digits).verdict is Verdict.KEY_CHANGE_PENDING  # A's first one was lost
    assert meter.enter(b1.digits).change == KeySectionStored(subclass=3, missing=(4,))
    done = meter.enter(b2.digits)
    assert isinstance(done.change, KeyChanged)
    assert done.change.attributes == to_b.key_attributes()
    assert meter.enter(engine.credit_token_sync(to_b, 1, _tid()).digits).verdict is (
        Verdict.ACCEPTED
    )


def test_a_three_token_set_left_incomplete_never_mixes_into_the_next_set(
    engine: LocalTokenEngine,
) -> None:
    """A 3-token set missing its SGC section, then a two-token set: only the latter is installed."""
    meter = MeterEmulator.for_profile(METER, VK_2014)
    moved = replace(METER, sgc="201461")
    a1, a2, _a8 = engine.key_change_tokens_sync(METER, moved, three_kct=True)
    to_b = replace(METER, tariff_index="03")
    b1, b2 = engine.key_change_tokens_sync(METER, to_b)
    verdicts = [meter.enter(t.digits).verdict for t in (a1, a2, b1)]
    assert verdicts == [Verdict.KEY_CHANGE_PENDING] * 3
    assert meter.enter(b2.digits).verdict is Verdict.ACCEPTED
    assert meter.enter(engine.credit_token_sync(to_b, 1, _tid()).digits).accepted
