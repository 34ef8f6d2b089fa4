"""A run: its config tree (config) and its runtime (run directory, Ray connection, model paths)."""
