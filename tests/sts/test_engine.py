"""LocalTokenEngine and the value types the rest of the product uses."""

from dataclasses import replace

import pytest

import gateway.sts
from gateway.sts.amount import round_currency
from gateway.sts.engine import (
    LocalTokenEngine,
    MeterProfile,
    Token,
    TokenEngine,
    VendingKey,
    meter_test_token,
)
from gateway.sts.errors import (
    AmountNotEncodable,
    InvalidField,
    InvalidKey,
    KeyExpired,
    TokenFormatError,
    UnknownKey,
)
from gateway.sts.keychange import KeyAttributes, key_change_fields
from gateway.sts.meter import MeterEmulator, Verdict
from gateway.sts.tokens import (
    CurrencyCredit,
    KeySection1,
    KeySection2,
    KeySectionExtra,
    UnitsCredit,
)

SECRET = bytes.fromhex("abababababababab949494949494949401234567")
VK = VendingKey(sgc="201457", krn=1, dkga=4, base_date=2014, key=SECRET)
METER = MeterProfile(drn="00000000000", sgc="201457", tariff_index="01", krn=1)


def test_local_engine_satisfies_the_port() -> None:
    """LocalTokenEngine is usable wherever a TokenEngine is expected."""
    engine: TokenEngine = LocalTokenEngine([VK])
    assert engine is not None


async def test_credit_token_decodes_to_the_rounded_amount() -> None:
    """credit_token rounds the amount up; the engine's own decode reads back TID and amount."""
    engine = LocalTokenEngine([VK], rnd=lambda: 5)
    token = await engine.credit_token(METER, 20000, 85740)
    fields = engine.decode(METER, token).fields
    assert fields == UnitsCredit(subclass=0, rnd=5, tid=85740, amount=20004)


def test_worked_example_token() -> None:
    """docs/sts.md §11: 0.1 kWh at TID 85740 with RND 5 is 70630503470028726114."""
    engine = LocalTokenEngine([VK], rnd=lambda: 5)
    assert engine.credit_token_sync(METER, 1, 85740).digits == "70630503470028726114"


def test_currency_credit_token() -> None:
    """Subclasses 4-7 make currency tokens (rounded up, no RND)."""
    engine = LocalTokenEngine([VK])
    token = engine.credit_token_sync(METER, 1_000_001, 85740, subclass=4)
    assert engine.decode(METER, token).fields == CurrencyCredit(
        subclass=4, tid=85740, amount=round_currency(1_000_001)
    )


def test_missing_vending_key_is_unknown_key() -> None:
    """A meter whose (SGC, KRN) has no vending key raises UnknownKey naming both."""
    engine = LocalTokenEngine([VK])
    with pytest.raises(UnknownKey, match="201457 KRN 2"):
        engine.credit_token_sync(replace(METER, krn=2), 1, 1)


def test_profile_and_key_base_dates_must_agree() -> None:
    """A profile claiming base date 2035 for a 2014 vending key is refused."""
    engine = LocalTokenEngine([VK])
    with pytest.raises(InvalidField, match="base date"):
        engine.credit_token_sync(replace(METER, base_date=2035), 1, 1)


def test_duplicate_vending_keys_are_refused() -> None:
    """Two keys for the same (SGC, KRN) are ambiguous."""
    with pytest.raises(InvalidKey):
        LocalTokenEngine([VK, replace(VK, key=bytes(20))])


def test_tid_past_the_ken_is_not_vended() -> None:
    """The vending side refuses a TID whose top 8 bits exceed the key's KEN."""
    engine = LocalTokenEngine([VK])
    with pytest.raises(KeyExpired):
        engine.credit_token_sync(replace(METER, ken=1), 1, 2 << 16)


def test_amount_above_the_maximum_is_refused() -> None:
    """More than 1 820 162.4 kWh in one token is refused."""
    with pytest.raises(AmountNotEncodable):
        LocalTokenEngine([VK]).credit_token_sync(METER, 18_201_625, 1)


def test_malformed_profile_is_refused() -> None:
    """A DRN with a wrong Luhn digit cannot make a MeterProfile."""
    with pytest.raises(InvalidField):
        MeterProfile(drn="12345678904", sgc="201457", tariff_index="01", krn=1)


def test_cache_is_bounded_and_keeps_recent_meters() -> None:
    """The per-meter cache holds at most cache_size meters, evicting the least recent."""
    engine = LocalTokenEngine([VK], cache_size=2)
    meters = [replace(METER, drn=drn) for drn in ("00000000000", "47500150231", "01000000008")]
    for meter in meters:
        engine.credit_token_sync(meter, 1, 1)
    assert list(engine._cache) == meters[1:]


def test_cache_size_zero_disables_caching() -> None:
    """With cache_size=0 nothing is kept (the benchmark's no-cache baseline)."""
    engine = LocalTokenEngine([VK], cache_size=0)
    engine.credit_token_sync(METER, 1, 1)
    assert not engine._cache


async def test_management_token_refuses_key_change_subclasses() -> None:
    """Key changes go through key_change_tokens, not management_token."""
    with pytest.raises(InvalidField, match="subclass"):
        await LocalTokenEngine([VK]).management_token(METER, 3, 1, 0)


async def test_key_change_tokens_for_a_ti_change_match_ctsa05() -> None:
    """TI 01 -> 02 gives docs/sts.md §9's two tokens (CTSA05 step 1)."""
    tokens = await LocalTokenEngine([VK]).key_change_tokens(
        METER, replace(METER, tariff_index="02")
    )
    assert [t.digits for t in tokens] == ["06510894141453018386", "22979178279997208272"]


def test_key_change_across_meters_is_refused() -> None:
    """A key change set is for one meter: old and new DRN must match."""
    with pytest.raises(InvalidField, match="one meter"):
        LocalTokenEngine([VK]).key_change_tokens_sync(METER, replace(METER, drn="47500150231"))


def test_key_change_fields_for_ea11_carry_the_sgc_halves() -> None:
    """EA11 sections 8 and 9 carry the SGC's low/high 12 bits and key bytes 4..7 / 8..11."""
    key = bytes(range(16))
    attributes = KeyAttributes(key_type=2, krn=2, tariff_index="01", sgc="123457", ea=11)
    fields = key_change_fields(old=attributes, new=attributes, new_key=key)
    assert fields[0] == KeySection1(kenho=15, krn=2, ro=0, three_kct=0, kt=2, nkho=0x00010203)
    assert fields[1] == KeySection2(kenlo=15, ti=1, nklo=0x0C0D0E0F)
    # SGC 123457 = 0x01E241: low 12 bits 0x241, high 12 bits 0x01E (as vectors v387/v393).
    assert fields[2] == KeySectionExtra(subclass=8, payload=0x241_04050607)
    assert fields[3] == KeySectionExtra(subclass=9, payload=0x01E_08090A0B)


def test_key_change_cannot_switch_algorithm() -> None:
    """EA07 -> EA11 is not a key change this engine makes."""
    old = KeyAttributes(key_type=2, krn=1, tariff_index="01", sgc="123457", ea=7)
    with pytest.raises(InvalidField, match="algorithm"):
        key_change_fields(old=old, new=replace(old, ea=11), new_key=bytes(16))


def test_rollover_can_be_forced() -> None:
    """RO is set on request even when the base date stays."""
    old = KeyAttributes(key_type=2, krn=1, tariff_index="01", sgc="123457")
    first = key_change_fields(old=old, new=replace(old, krn=2), new_key=bytes(8), rollover=True)[0]
    assert isinstance(first, KeySection1)
    assert first.ro == 1


# --- value types ------------------------------------------------------------------------------


def test_token_repr_and_str_show_only_the_last_four_digits() -> None:
    """A Token in a log line or repr never shows its full value."""
    token = Token("70630503470028726114")
    assert str(token) == "****-****-****-****-6114"
    assert "7063050347" not in repr(token)
    assert token.grouped() == "7063 0503 4700 2872 6114"
    assert token.masked() == "****-****-****-****-6114"


def test_token_must_be_20_digits() -> None:
    """A Token is exactly 20 digits; typed groups are accepted by Token.parse."""
    with pytest.raises(TokenFormatError):
        Token("7063 0503 4700 2872 6114")
    assert Token.parse("7063 0503 4700-2872-6114").digits == "70630503470028726114"


def test_vending_key_repr_hides_the_key() -> None:
    """The vending key's bytes never appear in its repr."""
    assert SECRET.hex() not in repr(VK)
    assert repr(SECRET) not in repr(VK)


def test_engine_repr_hides_keys() -> None:
    """The engine's repr names key slots but no key material."""
    assert SECRET.hex() not in repr(LocalTokenEngine([VK]))


def test_vending_key_length_is_checked() -> None:
    """A DKGA04 vending key is 20 bytes."""
    with pytest.raises(InvalidKey):
        VendingKey(sgc="201457", krn=1, dkga=4, base_date=2014, key=bytes(8))


def test_meter_test_token_is_the_published_one() -> None:
    """Test 1 (subclass 0, manufacturer code 0) is 00000000000150997584."""
    assert meter_test_token(1).digits == "00000000000150997584"


def test_emulator_accepts_engine_tokens_for_every_meter_kind() -> None:
    """Tokens for DKGA02/EA07, DKGA04/EA07 and DKGA04/EA11 meters are accepted by their meter."""
    vk02 = VendingKey(sgc="123456", krn=1, dkga=2, base_date=1993, key=bytes.fromhex("ab" * 8))
    engine = LocalTokenEngine([VK, vk02])
    profiles = [
        (METER, VK),
        (replace(METER, ea=11), VK),
        (replace(METER, sgc="123456", dkga=2, base_date=1993), vk02),
    ]
    for profile, key in profiles:
        meter = MeterEmulator.for_profile(profile, key)
        assert meter.enter(engine.credit_token_sync(profile, 10, 1000).digits).verdict is (
            Verdict.ACCEPTED
        )


# --- the public surface -----------------------------------------------------------------------


def test_public_names_are_importable_and_listed_once() -> None:
    """Every name in gateway.sts.__all__ exists, and the list has no duplicates."""
    names = gateway.sts.__all__
    assert len(names) == len(set(names))
    missing = [name for name in names if not hasattr(gateway.sts, name)]
    assert missing == []


def test_ports_are_exported() -> None:
    """The names the ledger and saga code against are public."""
    for name in ("TokenEngine", "LocalTokenEngine", "MeterProfile", "VendingKey", "Token"):
        assert name in gateway.sts.__all__
    for name in ("next_tid", "tid_for", "MeterEmulator", "Verdict", "StsError", "UnknownKey"):
        assert name in gateway.sts.__all__
