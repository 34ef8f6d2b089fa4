"""Leaf utilities shared by every fleetrl service (imports nothing else of fleetrl).

The weight wire format lives here so that the learner (sender) and the rollout
workers (receivers) use one definition without importing each other.
"""
