"""README.md stays true: its commands exist and its test command is the one CI runs."""

import contextlib
import io
import re
from itertools import product
from pathlib import Path

import pytest

from gateway.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _commands() -> list[list[str]]:
    """Every ``gateway …`` command path the README's tables name, slash alternatives expanded."""
    found: list[list[str]] = []
    for cell in re.findall(r"^\| `(gateway [^`]+)`", README, flags=re.MULTILINE):
        words: list[list[str]] = []
        for word in cell.split()[1:]:
            if word.startswith(("-", "[", "…", "<")) or word.isupper() or "." in word:
                break
            words.append(word.split("/"))
        found.extend(list(path) for path in product(*words))
    return found


COMMANDS = _commands()


def test_readme_names_commands() -> None:
    """The README's command table is found (so the test below checks something)."""
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_each_readme_command_exists(path: list[str]) -> None:
    """``gateway <command> --help`` works for every command the README lists."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage: gateway " + " ".join(path) in out.getvalue()


def test_ci_runs_the_readme_test_command() -> None:
    """``.ci/run`` ends by running exactly the test command the README gives."""
    assert "python -m pytest     # run the tests" in README
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == "python -m pytest"
