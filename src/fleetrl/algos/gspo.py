"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the importance ratio and its clip
at the level of whole sequences. Registers POLICY_LOSSES "gspo" and the online algorithm "gspo".

Conventions as in fleetrl.algos.ppo (the shared policy-loss signature and stats). For sequence i
with |y_i| valid tokens:

    s_i       = exp( (1/|y_i|) * sum_t (logp_t - old_logp_t) )     length-normalised sequence ratio
    s_{i,t}   = sg(s_i) * exp(logp_t - sg(logp_t))                 GSPO-token: equal to s_i in value,
                                                                   gradient s_i * grad logp_t
    loss_{i,t} = max(-A_{i,t} s_{i,t}, -A_{i,t} clip(s_{i,t}, 1 - clip_low, 1 + clip_high))

aggregated with ``agg``. With one advantage per sequence and agg "seq-mean-token-mean" (the
algorithm's default) this is exactly GSPO's sequence objective: each sequence's tokens average to
-A_i * s_i, whose gradient is -A_i * s_i * mean_t grad logp_t, and a sequence whose ratio left the
clip range contributes no gradient at all. The paper's clip range is tiny (3e-4 / 4e-4) because a
length-normalised ratio moves far less than a token's. dual_clip (> 1) caps -A_i * s_i at
-dual_clip * A_i for A_i < 0, at the sequence level too. Stats count tokens (a clipped sequence's
tokens are all clipped); ratio_* describe the sequence ratios seen by each token.
"""

from __future__ import annotations

import torch

from fleetrl.algos.ppo import clipped_surrogate, policy_inputs, ratio_stats
from fleetrl.algos.reduce import aggregate, safe_div
from fleetrl.algos.registry import POLICY_LOSSES, OnlineAlgorithm, register_online_algorithm

# The paper's clip range for the sequence ratio (Zheng et al. 2025, section 5.1).
GSPO_CLIP_LOW = 3e-4
GSPO_CLIP_HIGH = 4e-4


@POLICY_LOSSES.register("gspo")
def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = GSPO_CLIP_LOW,
    clip_high: float = GSPO_CLIP_HIGH,
    dual_clip: float | None = None,
    agg: str = "seq-mean-token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO's clipped objective with a sequence-level ratio, in the token-level stop-gradient form."""
    valid, log_ratio, adv = policy_inputs(logp, old_logp, advantages, mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Mean log-ratio over each sequence's valid tokens (0 for a row with none).
    seq_log_ratio = safe_div(log_ratio.sum(dim=-1), valid.sum(dim=-1).to(logp.dtype))
    # Padding's logp is zeroed first: logp - logp.detach() would be NaN there if logp were.
    lp = torch.where(valid, logp, zero)
    log_s = torch.where(valid, lp - lp.detach() + seq_log_ratio.detach().unsqueeze(-1), zero)
    ratio = torch.exp(log_s)
    # PPO's clipped surrogate on the sequence ratio: a sequence is clipped (or capped) as a whole.
    loss_mat, clipped, dual_taken = clipped_surrogate(ratio, adv, clip_low, clip_high, dual_clip)
    return aggregate(loss_mat, mask, agg), ratio_stats(logp, old_logp, ratio, mask, clipped, dual_taken)


register_online_algorithm(OnlineAlgorithm(
    "gspo", advantage="grpo", policy_loss="gspo",
    defaults={"learner.loss.clip_low": GSPO_CLIP_LOW, "learner.loss.clip_high": GSPO_CLIP_HIGH,
              "learner.loss.agg": "seq-mean-token-mean"},
    summary="GSPO (Zheng et al. 2025): GRPO advantages, sequence-level length-normalised ratio and clip"))
