"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback").

Each step the current policy samples rl.group_size completions per prompt, the reward service
scores them, and each prompt gives one preference pair: chosen = its highest-reward completion,
rejected = its lowest (the first of equals, in sampling order). A group whose best reward equals its
worst is a tie: it gives no pair and is counted (``online_dpo/skipped_ties``). The pairs train
through the learner's pair objective with any registered pair loss (``online_dpo.loss``: dpo, ipo,
simpo, orpo, ...; its hyperparameters from that loss's own section, e.g. ``dpo.beta``); the
reference is the starting policy (learner.reference).
"""

from __future__ import annotations

import torch

from fleetrl.algos.advantages import grouped
from fleetrl.algos.registry import ADVANTAGE_ESTIMATORS, OnlineAlgorithm, register_online_algorithm


@torch.no_grad()
def best_worst_pairs(rewards: torch.Tensor | list[float], group_size: int) -> tuple[list[int], list[int], int]:
    """Indices (into the flat, group-contiguous rewards) of each group's chosen (highest reward) and
    rejected (lowest reward) sample, groups in order, and how many groups were ties (best == worst:
    skipped). Among equal rewards the first sampled wins. Raises for group_size < 2."""
    if group_size < 2:
        raise ValueError(f"best_worst_pairs needs group_size >= 2 (got {group_size}): a pair is two "
                         "different samples of one prompt")
    r = grouped(torch.as_tensor(rewards, dtype=torch.float64), group_size)
    chosen, rejected, ties = [], [], 0
    for g, row in enumerate(r):
        best, worst = int(torch.argmax(row)), int(torch.argmin(row))
        if row[best] == row[worst]:
            ties += 1
            continue
        chosen.append(g * group_size + best)
        rejected.append(g * group_size + worst)
    return chosen, rejected, ties


@ADVANTAGE_ESTIMATORS.register("best_worst", per_token=False, min_group_size=2,
                               min_group_reason="each prompt's pair is its best and its worst sample")
@torch.no_grad()
def best_worst_signs(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """+1 on each group's chosen sample, -1 on its rejected one, 0 elsewhere and on ties: which
    samples online DPO trains on, as a per-sample signal (what the metrics and samples.jsonl show)."""
    out = torch.zeros(len(rewards), dtype=torch.float32)
    chosen, rejected, _ = best_worst_pairs(rewards, group_size)
    out[chosen], out[rejected] = 1.0, -1.0
    return out


register_online_algorithm(OnlineAlgorithm(
    "online_dpo", advantage="best_worst", objective="pairs", section="online_dpo",
    summary="Online DPO (Guo et al. 2024): best vs worst of each group, any pair loss"))
