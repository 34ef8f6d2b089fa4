"""KL between the policy and a reference from sampled tokens, and the KL coefficient's controllers.

Conventions
- Per-token tensors are ``[B, T]`` log-probs of the sampled tokens. Estimators are not masked:
  reduce them with the mask afterwards (fleetrl.algos.reduce).
- Log-ratios go through ``exp`` only after clamping to +-LOG_RATIO_CLAMP, so nothing overflows.
"""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3")
# exp() of a log-ratio beyond this overflows fp32 quickly; ratios of e^20 mean the sample is useless anyway.
LOG_RATIO_CLAMP = 20.0


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy (Schulman's k1/k2/k3).

    k1 = logp - ref (unbiased, can be negative); k2 = 0.5 * (logp - ref)^2;
    k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased and >= 0); its log-ratio is clamped to
    +-LOG_RATIO_CLAMP so exp never overflows.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        log_ratio = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; allowed values: {', '.join(KL_KINDS)}")


class AdaptiveKLController:
    """Proportional controller (Ziegler et al. 2019) steering the observed KL towards `target`.

    value <- value * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"AdaptiveKLController target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
