"""Numbered schema migrations, one directory per backend, applied in order at open."""
