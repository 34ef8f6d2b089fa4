"""fleetrl reward service."""
