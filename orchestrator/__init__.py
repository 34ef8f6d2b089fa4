"""fleetrl orchestrator service."""
