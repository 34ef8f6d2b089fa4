"""fleetrl: post-train language models with RL and preference optimization on a Ray cluster."""

__version__ = "0.1.0"
