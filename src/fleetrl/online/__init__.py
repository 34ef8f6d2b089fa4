"""The online RL loop: collect groups from the fleet, score, compute advantages, train, sync."""
