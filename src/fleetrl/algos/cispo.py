"""CISPO (MiniMax-M1, 2025): clip the importance weight, not the update. Registers POLICY_LOSSES
"cispo" and the online algorithm "cispo".

Conventions as in fleetrl.algos.ppo (the shared policy-loss signature and stats). Per token,
with r_t = exp(logp_t - old_logp_t):

    loss_t = -sg(clip(r_t, 1 - clip_low, 1 + clip_high)) * A_t * logp_t

aggregated with ``agg`` (the paper: token-mean over the batch). A REINFORCE-style objective: the
gradient of every token is w_t * A_t * grad logp_t with the truncated weight w_t held constant, so
no token is dropped the way PPO's clip drops tokens whose ratio left the range (the rare "fork"
tokens it is meant to keep learning from). The paper sets no lower bound (a large clip_low) and
tunes only clip_high; clip_low = 1 here means a lower bound of 0, i.e. none. There is no dual
clip. clip_frac counts tokens whose weight was truncated.
"""

from __future__ import annotations

import torch

from fleetrl.algos.ppo import policy_inputs, ratio_stats
from fleetrl.algos.reduce import aggregate
from fleetrl.algos.registry import POLICY_LOSSES, OnlineAlgorithm, register_online_algorithm

# No lower bound on the weight (1 - 1 = 0); the upper bound caps it at 1 + 3 = 4.
CISPO_CLIP_LOW = 1.0
CISPO_CLIP_HIGH = 3.0


@POLICY_LOSSES.register("cispo", dual_clip=False)
def cispo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = CISPO_CLIP_LOW,
    clip_high: float = CISPO_CLIP_HIGH,
    dual_clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: a truncated, detached importance weight on a REINFORCE-style log-prob objective."""
    if dual_clip is not None:
        raise ValueError(f"cispo has no dual clip (its weight is already bounded); got "
                         f"dual_clip={dual_clip}: set learner.loss.dual_clip: null")
    valid, log_ratio, adv = policy_inputs(logp, old_logp, advantages, mask)
    ratio = torch.exp(log_ratio).detach()
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # Padding's logp is zeroed so neither its value nor its gradient can reach the loss.
    lp = torch.where(valid, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    loss = aggregate(-adv * weight * lp, mask, agg)
    return loss, ratio_stats(logp, old_logp, ratio, mask, weight != ratio)


register_online_algorithm(OnlineAlgorithm(
    "cispo", advantage="grpo", policy_loss="cispo",
    defaults={"learner.loss.clip_low": CISPO_CLIP_LOW, "learner.loss.clip_high": CISPO_CLIP_HIGH},
    summary="CISPO (MiniMax-M1 2025): GRPO advantages, truncated detached IS weight on every token"))
