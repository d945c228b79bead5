"""Customer text in every language we speak, one catalogue per language.

The catalogues are structurally identical: the same keys, and in each message the same
``{placeholders}``; ``tests/flows/test_messages.py`` proves it and renders every screen in every
language within the USSD limit. Text is plain ASCII: telcos mangle anything else on USSD, and a
single non-GSM-7 character turns an SMS into UCS-2 (70 characters per segment).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from flows.messages import en, fr, sw
from flows.ports import Language

CATALOGUES: Final[Mapping[Language, Mapping[str, str]]] = MappingProxyType(
    {
        Language.EN: MappingProxyType(en.MESSAGES),
        Language.SW: MappingProxyType(sw.MESSAGES),
        Language.FR: MappingProxyType(fr.MESSAGES),
    }
)


def text(language: Language, key: str, /, **values: object) -> str:
    """The message ``key`` in ``language`` with ``values`` filled in.

    Raises:
        KeyError: no such message (a programming error: the catalogue test catches it).
    """
    template = CATALOGUES[language][key]
    return template.format(**values) if values else template


__all__ = ["CATALOGUES", "text"]
