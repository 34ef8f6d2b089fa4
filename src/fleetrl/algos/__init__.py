"""Pure algorithms: advantages, KL, policy/value/preference losses, reward shaping.

Torch only: no Ray, no DeepSpeed, no vLLM, no I/O. Importing the package imports every module
in it, so each algorithm file's registrations (``registry.py``) are in place.
"""

import importlib
import pkgutil

from fleetrl.algos.registry import (
    ADVANTAGE_ESTIMATORS,
    ONLINE_ALGORITHMS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    OnlineAlgorithm,
    Registry,
    check_online_algorithms,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
check_online_algorithms()

__all__ = ["ADVANTAGE_ESTIMATORS", "ONLINE_ALGORITHMS", "POLICY_LOSSES", "PREFERENCE_LOSSES",
           "OnlineAlgorithm", "Registry"]
