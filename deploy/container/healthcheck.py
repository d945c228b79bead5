# ruff: noqa: INP001 - a standalone script copied into the image, not a package module
"""Container liveness probe: exit 0 when the gateway answers ``GET /healthz`` with 200, else 1.

The slim Python image has no curl; this uses only the standard library. It asks the instance on
loopback, on ``GATEWAY_PORT`` (8080 when unset), within ``HEALTHCHECK_TIMEOUT_S`` seconds (2).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping


def probe_url(env: Mapping[str, str]) -> str:
    """The URL to probe: loopback on the configured port."""
    port = env.get("GATEWAY_PORT", "").strip() or "8080"
    return f"http://127.0.0.1:{int(port)}/healthz"


def check(url: str, timeout_s: float) -> bool:
    """Whether ``url`` answers 200 within ``timeout_s`` seconds (any error means no)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - fixed http URL
            return bool(response.status == 200)
    except (OSError, ValueError):  # URLError and HTTPError are OSErrors
        return False


def main() -> int:
    """Probe once; the exit status is what the container runtime reads."""
    try:
        url = probe_url(os.environ)
        timeout_s = float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "2"))
    except ValueError as exc:
        sys.stderr.write(f"healthcheck: bad setting: {exc}\n")
        return 1
    if check(url, timeout_s):
        return 0
    sys.stderr.write(f"healthcheck: {url} did not answer 200\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
