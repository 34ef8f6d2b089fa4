"""Multi-turn episodes: the environment interface users implement, its limits, and the token
bookkeeping that keeps an episode exactly as the fleet sampled it (see docs/architecture.md).

Plain classes and coroutines; no Ray, no vLLM. ``fleetrl.rollout`` drives them with its engine.
"""

from fleetrl.env.base import Environment, StepResult
from fleetrl.env.config import EpisodeConfig
from fleetrl.env.episode import ChatDelta, Episode
from fleetrl.env.loader import EnvLoadError, load_environment, resolve_environment
from fleetrl.env.runner import EnvError, TurnOutput, run_episode

__all__ = [
    "ChatDelta", "EnvError", "EnvLoadError", "Environment", "Episode", "EpisodeConfig", "StepResult",
    "TurnOutput", "load_environment", "resolve_environment", "run_episode",
]
