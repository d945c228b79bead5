"""The code cites documents that exist in the repository, and sections those documents have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREES = ("gateway", "flows", "tests", "bench", "deploy")
SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sql", ".service", ".example", ".jinja2"}

# The research notes kept outside the repository: the code cites their copies in docs/ instead.
OUTSIDE = re.compile(r"(?<![\w/])(?:DESIGN|PROTOCOLS|SPEC|VECTORS)\.md")
CITED_DOC = re.compile(r"docs/[\w./-]+\.md")
# "docs/protocols.md §2.2, §2.4" or "``docs/sts.md`` §3.1": the sections named after a document.
CITED_SECTIONS = re.compile(r"(docs/[\w./-]+\.md)`{0,2}((?:[ ,and]*§\d+(?:\.\d+)?(?:-§?\d+)?)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)?)[. ]", re.MULTILINE)


def _sources() -> list[Path]:
    return [
        path
        for tree in TREES
        for path in sorted((ROOT / tree).rglob("*"))
        if path.is_file() and path.suffix in SUFFIXES and ".venv" not in path.parts
    ]


def test_no_citation_of_documents_outside_the_repository() -> None:
    """``DESIGN.md``, ``PROTOCOLS.md``, ``SPEC.md``, ``VECTORS.md``: cited by their docs/ copies."""
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _sources()
        if path.name != "test_citations.py"
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert found == []


def test_every_cited_document_and_section_exists() -> None:
    """Each ``docs/….md`` the code names exists, and each ``§n`` after it is one of its headings."""
    missing: list[str] = []
    headings: dict[str, set[str]] = {}
    for path in _sources():
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            missing.extend(
                f"{where}: {doc}" for doc in CITED_DOC.findall(line) if not (ROOT / doc).is_file()
            )
            for doc, sections in CITED_SECTIONS.findall(line):
                if not (ROOT / doc).is_file():
                    continue
                if doc not in headings:
                    headings[doc] = set(HEADING.findall((ROOT / doc).read_text()))
                missing.extend(
                    f"{where}: {doc} §{section}"
                    for section in SECTION.findall(sections)
                    if section not in headings[doc] and section.split(".")[0] not in headings[doc]
                )
    assert missing == []
