"""On-policy distillation (OPD; Agarwal et al. 2024, GKD; "On-Policy Distillation", 2025).

The student samples, a frozen teacher (the ``teacher:`` service) gives the log-prob of every
sampled token, and each token's advantage is minus the per-token reverse-KL estimate
log pi_student(y_t) - log pi_teacher(y_t): tokens the teacher finds likelier than the student are
pushed up. Optionally ``opd.reward_weight`` * the task reward's GRPO group advantage is added to
every token of the sample. The policy loss (PPO clip, with learner.loss.importance_sampling under
async) is the ordinary one.
"""

from __future__ import annotations

import torch

from fleetrl.algos.registry import ADVANTAGE_ESTIMATORS, OnlineAlgorithm, register_online_algorithm


@ADVANTAGE_ESTIMATORS.register("reverse_kl", per_token=False, teacher=True, min_group_size=1)
@torch.no_grad()
def opd_advantages(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                   group_advantages: torch.Tensor | None = None,
                   reward_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B, T], reverse_kl [B, T]): reverse_kl = student_logp - teacher_logp on the
    sampled tokens (``mask``), advantage = -reverse_kl + reward_weight * group_advantages[b]; both
    0 off the mask. Log-probs are of the sampled tokens, [B, T]; group_advantages [B] or None."""
    if student_logp.shape != teacher_logp.shape or student_logp.shape != mask.shape:
        raise ValueError(f"student {tuple(student_logp.shape)}, teacher {tuple(teacher_logp.shape)} and mask "
                         f"{tuple(mask.shape)} log-probs must have one shape")
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float32)
    rkl = torch.where(mask, student_logp.float() - teacher_logp.float(), zero)
    adv = -rkl
    if reward_weight:
        if group_advantages is None:
            raise ValueError("reward_weight is set but no group advantages were given")
        adv = adv + torch.where(mask, reward_weight * group_advantages.float()[:, None], zero)
    return adv, rkl


register_online_algorithm(OnlineAlgorithm(
    "opd", advantage="reverse_kl", section="opd", defaults={"learner.loss.kl_coef": 0.0},
    summary="On-policy distillation: per-token reverse KL to a frozen teacher on the student's samples"))
