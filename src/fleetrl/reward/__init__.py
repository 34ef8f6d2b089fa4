"""fleetrl reward service: rule functions, built-ins, a reward model and HTTP scorers, summed with weights.

`RewardScorer` is the plain class (one process); `make_reward_actors` runs it as Ray actors.
"""

from fleetrl.reward.actor import RewardActor, make_reward_actors, reward_actor_name
from fleetrl.reward.config import (
    BuiltinFunctionConfig,
    HttpFunctionConfig,
    ModelFunctionConfig,
    RewardConfig,
    RewardFunctionConfig,
    RuleFunctionConfig,
)
from fleetrl.reward.rules import RewardLoadError
from fleetrl.reward.scorer import RewardError, RewardErrorInfo, RewardScorer, ScoreResult

__all__ = [
    "BuiltinFunctionConfig",
    "HttpFunctionConfig",
    "ModelFunctionConfig",
    "RewardActor",
    "RewardConfig",
    "RewardError",
    "RewardErrorInfo",
    "RewardFunctionConfig",
    "RewardLoadError",
    "RewardScorer",
    "RuleFunctionConfig",
    "ScoreResult",
    "make_reward_actors",
    "reward_actor_name",
]
