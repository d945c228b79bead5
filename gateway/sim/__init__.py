"""Faithful simulators of the providers on loopback, for the demo and tests; never in production."""
