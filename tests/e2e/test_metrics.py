import asyncio
import io
import re

import aiohttp

from gateway.demo import Demo, serving


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, flags=re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


async def test_a_purchase_moves_the_metrics() -> None:
    """After one USSD purchase /metrics shows its confirmation, its vend and its state."""
    async with serving() as runtime:
        demo = Demo(runtime, io.StringIO())
        await demo.ussd("+254712345678", "04000000010", "100")
        async with aiohttp.ClientSession() as http:
            for _ in range(50):  # the delivery report may trail the SMS by a moment
                async with http.get(runtime.base_url + "/metrics") as response:
                    text = await response.text()
                if _sample(text, 'gateway_purchases{state="delivered"}') == 1:
                    break
                await asyncio.sleep(0.05)
    assert _sample(text, 'gateway_purchases{state="delivered"}') == 1
    assert _sample(text, 'gateway_purchases{state="awaiting_payment"}') == 0
    assert _sample(text, "gateway_payment_confirmation_seconds_count") == 1
    assert _sample(text, "gateway_vend_seconds_count") == 1
    assert _sample(text, "gateway_outbox_backlog") == 0
    assert _sample(text, "gateway_ussd_hop_seconds_count") == 5
