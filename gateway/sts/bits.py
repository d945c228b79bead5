"""Bit-field layouts written as data, and the one pack/unpack pair that reads them.

A :class:`Layout` lists its fields most-significant first, in the order IEC 62055-41 draws them
(docs/sts.md §2-§3), so a table in the standard and a layout here read the same way::

    CREDIT = Layout(
        "credit",
        Field("subclass", 4),
        Field("rnd", 4),
        Field("tid", 24),
        Field("amount", 16),
        Field("_crc", 16),
    )

:func:`pack` refuses a value that does not fit its field (``InvalidField`` naming the field), so
no caller can silently truncate a TID or an amount.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.sts.errors import InvalidField


@dataclass(frozen=True, slots=True)
class Field:
    """One named field of ``width`` bits."""

    name: str
    width: int

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"field {self.name!r} must be at least one bit wide")


@dataclass(frozen=True, slots=True)
class _Slot:
    name: str
    shift: int
    mask: int


@dataclass(frozen=True, slots=True, init=False)
class Layout:
    """An ordered set of fields, most significant first, covering ``width`` bits in total.

    Fields whose name starts with ``_`` are not carried by the caller: padding, or a value the
    caller computes afterwards (the token CRC). :func:`pack` writes zeros there and
    :func:`unpack` leaves them out of its result.
    """

    name: str
    fields: tuple[Field, ...]
    width: int
    _slots: tuple[_Slot, ...] = field(repr=False, compare=False)
    _packing: tuple[tuple[str, int, int], ...] = field(repr=False, compare=False)

    def __init__(self, name: str, *fields: Field) -> None:
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"layout {name!r} repeats a field name: {names}")
        width = sum(f.width for f in fields)
        slots: list[_Slot] = []
        shift = width
        for f in fields:
            shift -= f.width
            slots.append(_Slot(f.name, shift, (1 << f.width) - 1))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "fields", tuple(fields))
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "_slots", tuple(slots))
        packing = tuple((s.name, s.shift, s.mask) for s in slots if not s.name.startswith("_"))
        object.__setattr__(self, "_packing", packing)

    def names(self) -> tuple[str, ...]:
        """The names of the non-padding fields, most significant first."""
        return tuple(f.name for f in self.fields if not f.name.startswith("_"))

    def offset(self, name: str) -> int:
        """The bit position of the least-significant bit of field ``name`` (bit 0 = LSB)."""
        for slot in self._slots:
            if slot.name == name:
                return slot.shift
        raise KeyError(name)


def pack(layout: Layout, values: Mapping[str, int]) -> int:
    """Combine ``values`` (one per non-padding field of ``layout``) into one integer.

    Raises:
        InvalidField: a value is negative or wider than its field.
        KeyError: a field has no value.
    """
    word = 0
    for name, shift, mask in layout._packing:  # noqa: SLF001 - the layout's own table
        value = values[name]
        if not 0 <= value <= mask:
            raise InvalidField(name, value, f"must fit in {mask.bit_length()} bits (0..{mask})")
        word |= value << shift
    return word


def unpack(layout: Layout, word: int) -> dict[str, int]:
    """Split ``word`` into the non-padding fields of ``layout``.

    Raises:
        InvalidField: ``word`` is negative or wider than the layout.
    """
    if word < 0 or word >> layout.width:
        raise InvalidField(layout.name, word, f"must fit in {layout.width} bits")
    return {
        name: (word >> shift) & mask
        for name, shift, mask in layout._packing  # noqa: SLF001 - the layout's own table
    }
