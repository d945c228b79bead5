import subprocess
import sys

import pytest

from gateway.cli import main


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """Running ``gateway`` with no command prints usage and exits non-zero."""
    assert main([]) == 2
    assert "usage: gateway" in capsys.readouterr().err


def test_module_entry_point_reports_version() -> None:
    """``python -m gateway --version`` names the command and its version."""
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("gateway ")
