"""STS (IEC 62055-41) token engine: pure and synchronous, imports nothing else of the project."""
