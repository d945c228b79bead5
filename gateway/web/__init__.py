"""The aiohttp application's inbound surfaces: one module each; no business rules live here."""
