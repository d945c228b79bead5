"""The vendor API over real HTTP on loopback: signing, meter confirm, quote, the idempotent vend."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from gateway.ledger import KeyRotation, MeterNumber, MeterStatus, PurchaseState
from gateway.ledger.vendor import VendorStatus
from gateway.sts import MeterEmulator, Verdict
from gateway.vendor import signing
from gateway.vendor.service import register_vendor
from gateway.vendor_client import VendorClient
from tests.vending.vending_support import VENDING_KEY, profile_of
from tests.vendor.vendor_support import VendorWorld, unix

PROBLEM = "application/problem+json"


async def balance(world: VendorWorld) -> int:
    """Shop's float now."""
    return (await world.vendors.get_vendor("shop")).balance_minor


# -- authentication ------------------------------------------------------------------------------


async def test_a_signed_meter_confirm_shows_the_masked_meter(world: VendorWorld) -> None:
    """The meter as a vendor sees it: masked name, limits, sellable; nothing written."""
    async with world.client() as client:
        reply = await client.confirm_meter(world.drns[0])
    assert reply.status == 200
    meter = reply.json()
    assert meter["name"] == "W****** K****"
    assert meter["can_sell"] is True
    assert (meter["min_amount_minor"], meter["max_amount_minor"]) == (1000, 3_500_000)
    assert meter["key_change_pending"] is False


async def test_unknown_meter_is_a_problem(world: VendorWorld) -> None:
    """An unknown meter: 404 ``unknown_meter`` as problem+json."""
    async with world.client() as client:
        reply = await client.confirm_meter("01234567890")
    assert reply.status == 404
    assert reply.headers["Content-Type"].startswith(PROBLEM)
    assert reply.problem == "unknown_meter"


async def test_unsigned_wrong_and_tampered_requests_are_refused(world: VendorWorld) -> None:
    """No headers, a wrong secret, a body that is not the one signed: 401 signature_invalid."""
    target = f"/vendor/v1/meters/{world.drns[0]}"
    async with (
        world.client() as client,
        world.client(secret="vsk_wrong") as wrong,
    ):
        assert client._session is not None
        async with client._session.get(world.url + target) as bare:
            assert bare.status == 401
            assert (await bare.json())["code"] == "signature_invalid"
        assert (await wrong.confirm_meter(world.drns[0])).problem == "signature_invalid"
        body = VendorClient.sale_body(world.drns[0], 5000)
        headers = signing.signed_headers(
            key_id=world.key_id,
            secret=world.secret,
            method="POST",
            target="/vendor/v1/quotes",
            body=body,
            timestamp=int(world.clock.now.timestamp()),
            terminal="till-1",
        )
        async with client._session.post(
            world.url + "/vendor/v1/quotes",
            data=body.replace(b"5000", b"9000"),
            headers=headers,
        ) as tampered:
            assert tampered.status == 401
            assert (await tampered.json())["code"] == "signature_invalid"


async def test_skew_and_replayed_nonces_are_refused(world: VendorWorld) -> None:
    """A timestamp 301 s off: timestamp_skew; a nonce sent twice: replayed_request."""
    async with world.client() as client:
        now = world.clock.now.timestamp()
        client._clock = lambda: now + 301
        assert (await client.confirm_meter(world.drns[0])).problem == "timestamp_skew"
        client._clock = lambda: now - 299
        target = f"/vendor/v1/meters/{world.drns[0]}"
        first = await client.request("GET", target, nonce="nonce-0123456789abcdef")
        again = await client.request("GET", target, nonce="nonce-0123456789abcdef")
    assert first.status == 200
    assert again.status == 401
    assert again.problem == "replayed_request"


async def test_revoked_keys_suspended_vendors_and_unknown_terminals(world: VendorWorld) -> None:
    """A revoked key: 401; a suspended vendor: 403; a terminal not registered: 403."""
    async with world.client(terminal="till-9") as stranger:
        assert (await stranger.confirm_meter(world.drns[0])).problem == "unknown_terminal"
    await world.vendors.set_vendor_status("shop", VendorStatus.SUSPENDED, actor="ops")
    async with world.client() as client:
        assert (await client.confirm_meter(world.drns[0])).problem == "vendor_suspended"
    await world.vendors.set_vendor_status("shop", VendorStatus.ACTIVE, actor="ops")
    rotated = await world.service.add_key("shop", scopes=frozenset({"meters"}), actor="ops")
    await world.vendors.revoke_vendor_key(world.key_id, actor="ops")
    async with world.client() as old:
        assert (await old.confirm_meter(world.drns[0])).problem == "signature_invalid"
    async with VendorClient(
        world.url, rotated.key_id, rotated.secret, clock=unix(world.clock)
    ) as new:
        assert (await new.confirm_meter(world.drns[0])).status == 200
        # Scoped: this key may confirm meters, not sell.
        assert (await new.quote(world.drns[0], 5000)).problem == "scope_denied"


async def test_rate_limits_answer_429_with_retry_after(world: VendorWorld) -> None:
    """Past the terminal's 60 a minute: 429 rate_limited with Retry-After; time refills."""
    async with world.client() as client:
        replies = [await client.confirm_meter(world.drns[0]) for _ in range(61)]
        assert [r.status for r in replies[:60]] == [200] * 60
        assert replies[60].status == 429
        assert replies[60].problem == "rate_limited"
        assert int(replies[60].headers["Retry-After"]) >= 1
        # Another terminal has its own bucket.
        async with world.client(terminal="till-2") as other:
            assert (await other.confirm_meter(world.drns[0])).status == 200
        world.clock.advance(2)
        assert (await client.confirm_meter(world.drns[0])).status == 200


# -- quote and vend ------------------------------------------------------------------------------


async def test_a_quote_moves_no_money(world: VendorWorld) -> None:
    """Units, energy, tax, fixed charges, commission and the float debit; the float unchanged."""
    async with world.client() as client:
        reply = await client.quote(world.drns[0], 11_600)
    quote = reply.json()
    assert reply.status == 200
    assert quote["units"] == "4.0"
    assert (
        quote["energy_minor"] + quote["tax_minor"] + quote["fixed_charges_minor"]
        + quote["debt_minor"]
    ) == 11_600  # fmt: skip
    assert quote["commission_minor"] == 232  # 2 %
    assert quote["float_debit_minor"] == 11_600 - 232
    assert await balance(world) == 100_000


async def test_vend_once_per_key_byte_for_byte(world: VendorWorld) -> None:
    """The same key: the same bytes, one vend, one debit; another body: 422."""
    async with world.client() as client:
        first = await client.vend(world.drns[0], 11_600, idempotency_key="sale-1")
        again = await client.vend(world.drns[0], 11_600, idempotency_key="sale-1")
        other = await client.vend(world.drns[0], 20_000, idempotency_key="sale-1")
        by_key = await client.last_response(idempotency_key="sale-1")
        sold = first.json()
        by_id = await client.last_response(vend_id=sold["vend_id"])
        copy = await client.reprint(sold["vend_id"])
        never = await client.last_response(idempotency_key="sale-never-sent")
    assert first.status == 201
    assert [t["kind"] for t in sold["tokens"]] == ["credit"]
    assert len(sold["tokens"][0]["token"]) == 20
    assert again.status == 201
    assert again.body == first.body
    assert other.status == 422
    assert other.problem == "idempotency_key_reused"
    assert by_key.body == first.body
    assert by_id.body == first.body
    assert copy.json()["copy"] is True
    assert copy.json()["tokens"] == sold["tokens"]
    assert never.status == 404
    assert await balance(world) == 100_000 - (11_600 - 232)
    assert (await world.ledger.get_purchase(sold["vend_id"])).state is PurchaseState.VENDED


async def test_refusals_move_nothing(world: VendorWorld) -> None:
    """Blocked meter, amount out of range, float too short: problems, float and TIDs unchanged."""
    blocked = await world.ledger.get_meter(world.drns[1])
    await world.ledger.put_meter(dataclasses.replace(blocked, status=MeterStatus.BLOCKED))
    async with world.client() as client:
        assert (await client.vend(world.drns[1], 5000, idempotency_key="b1")).problem == (
            "meter_blocked"
        )
        assert (await client.quote(world.drns[0], 500)).problem == "amount_out_of_range"
        short = await client.vend(world.drns[0], 200_000, idempotency_key="big")
        again = await client.vend(world.drns[0], 200_000, idempotency_key="big")
        bad = await client.request("POST", "/vendor/v1/vends", b"{not json", headers={
            "Idempotency-Key": "x"})  # fmt: skip
        no_key = await client.request(
            "POST", "/vendor/v1/vends", VendorClient.sale_body(world.drns[0], 5000)
        )
    assert short.status == 402
    assert short.problem == "insufficient_float"
    assert short.json()["available_minor"] == 100_000
    assert again.body == short.body
    assert bad.problem == "invalid_request"
    assert no_key.problem == "idempotency_key_required"
    assert await balance(world) == 100_000
    assert (await world.ledger.get_meter(world.drns[0])).last_tid is None


async def test_a_slow_engine_answers_202_then_the_vend(world: VendorWorld) -> None:
    """Past engine_wait_s: 202 with the status URL; the same key meanwhile: 409; then the vend."""
    world.engine.delay_s = 3.0
    async with world.client() as client, world.client(terminal="till-2") as other:
        pending = await client.vend(world.drns[0], 11_600, idempotency_key="slow-1")
        busy = await other.vend(world.drns[0], 11_600, idempotency_key="slow-1")
        assert pending.status == 202
        status_url = pending.json()["status_url"]
        assert status_url.startswith("/vendor/v1/vends/")
        assert busy.status == 409
        assert busy.problem == "request_in_progress"
        for _ in range(50):
            done = await client.request("GET", status_url)
            if done.status != 202:
                break
            await asyncio.sleep(0.1)
        again = await client.vend(world.drns[0], 11_600, idempotency_key="slow-1")
    assert done.status == 201
    assert again.body == done.body
    assert await balance(world) == 100_000 - (11_600 - 232)


async def test_reversal_only_without_a_token(world: VendorWorld) -> None:
    """A vended sale: 409 token_already_issued, the float untouched."""
    async with world.client() as client:
        sold = (await client.vend(world.drns[0], 11_600, idempotency_key="r1")).json()
        reversed_ = await client.reversal(sold["vend_id"])
        unknown = await client.reversal("PNOSUCHSALE00")
    assert reversed_.status == 409
    assert reversed_.problem == "token_already_issued"
    assert unknown.status == 404
    assert await balance(world) == 100_000 - (11_600 - 232)


async def test_concurrent_duplicates_vend_once(both: VendorWorld) -> None:
    """Twenty concurrent sends of one key (two terminals): one vend, one debit, same bytes."""
    async with both.client() as one, both.client(terminal="till-2") as two:
        replies = await asyncio.gather(
            *(
                (one if i % 2 else two).vend(both.drns[0], 11_600, idempotency_key="dup")
                for i in range(20)
            )
        )
        final = await one.last_response(idempotency_key="dup")
    assert {r.status for r in replies} <= {201, 409}
    assert all(r.body == final.body for r in replies if r.status == 201)
    assert await balance(both) == 100_000 - (11_600 - 232)


async def test_statement_has_balances_and_no_tokens(world: VendorWorld) -> None:
    """The day's statement (JSON Lines and CSV): opening, the sale, closing; no full token."""
    async with world.client() as client:
        sold = (await client.vend(world.drns[0], 11_600, idempotency_key="s1")).json()
        day = world.clock.now.date().isoformat()
        lines = await client.statement(day)
        table = await client.statement(day, form="csv")
    token = sold["tokens"][0]["token"]
    records = [json.loads(line) for line in lines.body.decode().splitlines()]
    assert records[0] == {
        "record": "opening", "vendor_id": "shop", "day": day, "currency": "KES",
        "balance_minor": 0,
    }  # fmt: skip
    assert records[-1] == {"record": "closing", "balance_minor": 100_000 - 11_368}
    assert [r["kind"] for r in records if r["record"] == "movement"] == ["top_up", "debit"]
    assert token not in lines.body.decode()
    assert token not in table.body.decode()
    assert table.headers["Content-Type"].startswith("text/csv")
    assert table.body.decode().splitlines()[-1].startswith("closing,")


@pytest.mark.parametrize("day", ["2026-13-01", "yesterday"])
async def test_a_malformed_day_is_a_problem(world: VendorWorld, day: str) -> None:
    """A day that is not YYYY-MM-DD: 400 invalid_request."""
    async with world.client() as client:
        assert (await client.statement(day)).problem == "invalid_request"


async def test_a_pending_key_change_comes_first_and_the_meter_takes_it(world: VendorWorld) -> None:
    """Confirm says so; the vend's tokens: the key change, then the credit; the meter accepts."""
    drn = world.drns[2]
    record = await world.ledger.get_meter(drn)
    rotation = KeyRotation(sgc="123457", from_krn=1, to_krn=2, to_base_date=2014)
    await world.ledger.plan_key_rotation(rotation, meters=[MeterNumber(drn)], actor="test")
    meter = MeterEmulator.for_profile(profile_of(record), VENDING_KEY)
    async with world.client() as client:
        assert (await client.confirm_meter(drn)).json()["key_change_pending"] is True
        body = b'{"accept_key_change":false,"amount_minor":11600,"meter":"%s"}' % drn.encode()
        refused = await client.request(
            "POST", "/vendor/v1/vends", body, headers={"Idempotency-Key": "kc-0"}
        )
        assert refused.problem == "key_change_required"
        assert await balance(world) == 100_000
        sold = (await client.vend(drn, 11_600, idempotency_key="kc-1")).json()
        copy = (await client.reprint(sold["vend_id"])).json()
        assert (await client.confirm_meter(drn)).json()["key_change_pending"] is False
    kinds = [t["kind"] for t in sold["tokens"]]
    assert kinds == ["key_change", "key_change", "credit"]
    assert copy["tokens"] == sold["tokens"]  # a reprint is the same set, never new tokens
    verdicts = [meter.enter(t["token"]).verdict for t in sold["tokens"]]
    assert verdicts == [Verdict.KEY_CHANGE_PENDING, Verdict.ACCEPTED, Verdict.ACCEPTED]
    assert meter.attributes.krn == 2
    assert meter.credit.get(0, 0) == sold["units_tenths_kwh"]


async def test_reversing_a_refused_sale_refunds_nothing(world: VendorWorld) -> None:
    """A sale the float could not pay has no token: its reversal is 200 with nothing refunded."""
    async with world.client() as client:
        await client.vend(world.drns[0], 200_000, idempotency_key="short")
        request = await world.vendors.get_vendor_request("shop", idempotency_key="short")
        assert request is not None
        assert request.purchase_id is not None
        reversed_ = await client.reversal(request.purchase_id)
    assert reversed_.status == 200
    assert reversed_.json() == {
        "vend_id": request.purchase_id, "status": "reversed", "refunded_minor": 0,
    }  # fmt: skip
    assert await balance(world) == 100_000


async def test_the_ip_allowlist_admits_only_its_networks(world: VendorWorld) -> None:
    """A vendor allowed from 10.0.0.0/8 is refused on loopback; one allowed from 127/8 is not."""
    for vendor_id, network, expected in (
        ("far", "10.0.0.0/8", "ip_not_allowed"),
        ("near", "127.0.0.0/8", None),
    ):
        made = await register_vendor(
            world.vendors, vendor_id, name=vendor_id, currency="KES", ip_allowlist=(network,),
            actor="test", master_key=world.master_key,
        )  # fmt: skip
        async with VendorClient(
            world.url, made.key.key_id, made.key.secret, clock=unix(world.clock)
        ) as client:
            reply = await client.confirm_meter(world.drns[0])
            # Behind the (loopback) proxy the vendor's address is the forwarded one.
            forwarded = await client.request(
                "GET",
                f"/vendor/v1/meters/{world.drns[0]}",
                headers={"X-Forwarded-For": "10.20.30.40"},
            )
        assert reply.problem == expected, vendor_id
        assert forwarded.problem == (None if vendor_id == "far" else "ip_not_allowed")
