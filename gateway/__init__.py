"""sts-gateway: buy prepaid electricity from a phone.

USSD and SMS come in through an aggregator, money is collected and confirmed with a mobile-money
provider, and an STS (IEC 62055-41) token is vended and sent back by SMS. See
docs/architecture.md and README.md for the map.
"""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
