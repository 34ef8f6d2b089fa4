"""SimPO (Meng, Xia and Chen 2024): a reference-free, length-normalised margin loss on preference pairs.

The implicit reward of an answer is its AVERAGE token log-prob scaled by beta,
r(x, y) = beta / |y| * log pi(y | x), and the loss asks the chosen answer to beat the rejected one
by a target margin gamma:

    loss = -logsigmoid(beta / |y_w| * logp_w - beta / |y_l| * logp_l - gamma)

with conservative label smoothing ls as in cDPO: -(1 - ls) * logsigmoid(z) - ls * logsigmoid(-z).
No reference model is involved.

Conventions follow the authors' code (princeton-nlp/SimPO): the margin is given as
``gamma_beta_ratio`` = gamma / beta, so gamma = beta * gamma_beta_ratio; their defaults are
beta = 2.0 and gamma_beta_ratio = 0.5 (gamma = 1.0). TRL's CPO trainer (loss_type="simpo") names the
same margin ``simpo_gamma`` = gamma directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fleetrl.algos.registry import PREFERENCE_LOSSES


@PREFERENCE_LOSSES.register("simpo", needs_reference=False)
def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair SimPO losses [B] from SUMMED completion log-probs [B] and completion lengths [B].

    The reference log-probs are ignored (SimPO has none; the arguments exist because every pair loss
    takes them). Stats: rewards/chosen and rewards/rejected = beta * average log-prob (detached).
    """
    if beta <= 0:
        raise ValueError(f"simpo beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"simpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if chosen_logps.shape != rejected_logps.shape or chosen_tokens.shape != chosen_logps.shape \
            or rejected_tokens.shape != rejected_logps.shape:
        raise ValueError(
            f"simpo_loss takes [B] tensors of one shape; got chosen_logps {tuple(chosen_logps.shape)}, "
            f"rejected_logps {tuple(rejected_logps.shape)}, chosen_tokens {tuple(chosen_tokens.shape)}, "
            f"rejected_tokens {tuple(rejected_tokens.shape)}"
        )
    # An empty completion (0 tokens) has log-prob 0: divide by 1 rather than 0.
    chosen = beta * chosen_logps / chosen_tokens.clamp(min=1)
    rejected = beta * rejected_logps / rejected_tokens.clamp(min=1)
    logits = chosen - rejected - beta * gamma_beta_ratio
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, {"rewards/chosen": chosen.detach(), "rewards/rejected": rejected.detach()}
