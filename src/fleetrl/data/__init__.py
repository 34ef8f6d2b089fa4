"""Data: reading and validating rows (rows), encoding offline examples (offline)."""
