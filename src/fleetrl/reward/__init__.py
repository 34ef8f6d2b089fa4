"""fleetrl reward service: rule functions, built-ins, a reward model and HTTP scorers, summed with weights.

`RewardScorer` is the plain class (one process); `make_reward_actors` runs it as Ray actors.
"""

from fleetrl.reward.config import (
    BuiltinFunctionConfig,
    HttpFunctionConfig,
    ModelFunctionConfig,
    RewardConfig,
    RewardFunctionConfig,
    RuleFunctionConfig,
)
from fleetrl.reward.rules import RewardLoadError
from fleetrl.reward.scorer import RewardError, RewardErrorInfo, RewardHungError, RewardScorer, ScoreResult

# The Ray side loads on first use: validating a config (which imports reward.config) imports no Ray.
_LAZY = {"RewardActor", "make_reward_actors", "reward_actor_name"}


def __getattr__(name: str):
    if name in _LAZY:
        from fleetrl.reward import actor

        return getattr(actor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BuiltinFunctionConfig",
    "HttpFunctionConfig",
    "ModelFunctionConfig",
    "RewardActor",
    "RewardConfig",
    "RewardError",
    "RewardErrorInfo",
    "RewardFunctionConfig",
    "RewardHungError",
    "RewardLoadError",
    "RewardScorer",
    "RuleFunctionConfig",
    "ScoreResult",
    "make_reward_actors",
    "reward_actor_name",
]
