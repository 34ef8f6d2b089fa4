"""The built-in tiny models and synthetic tasks (tests, demo, benchmarks)."""
