import io
import json
import re
from pathlib import Path

import structlog

from gateway.demo import run_demo
from gateway.demo_data import demo_master_key
from gateway.ledger import open_ledger
from gateway.ledger.keys import open_vending_key
from gateway.logging import configure_logging


async def test_logs_of_whole_purchases_carry_no_token_or_key(tmp_path: Path) -> None:
    """Three purchases logged through the production (JSON) setup leak no token and no key.

    Every log line is JSON; tokens appear only as their last four digits.
    """
    logs = io.StringIO()
    configure_logging(json=True, level="debug", stream=logs)
    try:
        report = await run_demo(io.StringIO(), data_dir=tmp_path)
    finally:
        structlog.reset_defaults()
    text = logs.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert any(line["event"] == "token_vended" for line in lines)
    master = demo_master_key(tmp_path)
    async with open_ledger(f"sqlite:///{tmp_path / 'gateway.db'}") as ledger:
        vending_keys = [open_vending_key(k, master).key for k in await ledger.vending_keys()]
    secrets_ = [master.hex(), *(key.hex() for key in vending_keys), "sim-api-key"]
    for secret in secrets_:
        assert secret not in text.lower()
    for result in report.results:
        token = result.token
        assert token not in text
        grouped = "-".join(token[i : i + 4] for i in range(0, 20, 4))
        assert grouped not in text
        assert token[-4:] in text  # the masked form keeps the last four digits for support
    # No 20-digit run survives anywhere, grouped or not.
    assert not re.search(r"(?<!\d)(?:\d{4}[- ]?){4}\d{4}(?!\d)", text)
