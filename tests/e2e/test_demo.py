import io
from pathlib import Path

from gateway.demo import run_demo


async def test_demo_three_scenarios_credit_the_meters(tmp_path: Path) -> None:
    """The demo buys by USSD, SMS and paybill; each meter accepts its token and gains credit.

    The expected kWh is computed from the demo tariff (KES 25.00/kWh + 16 % VAT, rounded down to
    0.1 kWh), not read back from the gateway.
    """
    out = io.StringIO()
    report = await run_demo(out, data_dir=tmp_path)
    results = {r.name: r for r in report.results}
    # KES amount → energy net of VAT → tenths of a kWh, rounded down.
    for name, amount_minor in (("ussd", 10_000), ("sms", 20_000), ("c2b", 15_000)):
        tenths = (amount_minor * 10_000 // 11_600) * 10 // 2500
        assert results[name].credit_kwh == f"{tenths / 10:.1f}", name
        assert results[name].token in results[name].sms_text.replace("-", "")
    text = out.getvalue()
    assert "All scenarios passed" in text
    assert "accepted=False" in text  # the unknown meter was refused at validation
