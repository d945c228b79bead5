"""Identifiers shared by the layers: a purchase's handle and a meter's number."""

from __future__ import annotations

from typing import NewType

PurchaseId = NewType("PurchaseId", str)
"""Our handle for one purchase: ``P`` and 12 base-32 characters, short enough for an SMS."""

MeterNumber = NewType("MeterNumber", str)
"""A meter's decoder reference number (DRN), 11 or 13 digits as printed on the meter."""

__all__ = ["MeterNumber", "PurchaseId"]
