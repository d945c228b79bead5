"""PostgreSQL migrations, numbered as the SQLite ones (``0001_initial.sql`` …)."""
