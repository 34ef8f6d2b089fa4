"""fleetrl rollout service."""
