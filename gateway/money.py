"""Money: moved to :mod:`gateway.values.money`, re-exported here for the code that imports it so."""

from gateway.values.money import Money, currency_exponent

__all__ = ["Money", "currency_exponent"]
