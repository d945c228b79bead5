"""Fakes and helpers shared by the test packages (one fake clock for the whole suite)."""
