"""fleetrl learner service."""
