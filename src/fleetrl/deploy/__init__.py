"""fleetrl deploy service."""
