"""Online DPO's training batch: each group's best vs worst sample as a preference pair.

Pure (no Ray): the loop (online/loop.py) gives it a step's scored samples, groups contiguous, and
trains what it returns with the learner's pair objective (learner/offline.py PairObjective). The
pairs are padded to ``width`` (rl.prompts_per_step, the learner's fixed mini-batch) with weight-0
copies, which add no loss and no statistics. Each pair keeps its samples' weight versions: the
collector's staleness bound (rl.max_staleness) already dropped groups that lagged too far.
"""

from __future__ import annotations

import torch

from fleetrl.algos.online_dpo import best_worst_pairs
from fleetrl.online.batch import Sample, pad_samples

_ROW_KEYS = ("input_ids", "attention_mask", "loss_mask")


def pair_batch(samples: list[Sample], group_size: int, pad_id: int,
               width: int) -> tuple[dict[str, torch.Tensor] | None, dict[str, float]]:
    """(the pair batch or None when every group tied, the step's online_dpo/* metrics)."""
    rewards = [float(s.reward) for s in samples]  # type: ignore[arg-type]
    chosen, rejected, ties = best_worst_pairs(rewards, group_size)
    n = len(chosen)
    if n > width:
        raise ValueError(f"{n} pairs but the learner trains at most {width} per step (rl.prompts_per_step)")
    metrics: dict[str, float] = {"online_dpo/pairs": float(n), "online_dpo/skipped_ties": float(ties)}
    if n == 0:
        return None, metrics
    metrics["online_dpo/chosen_reward"] = sum(rewards[i] for i in chosen) / n
    metrics["online_dpo/rejected_reward"] = sum(rewards[i] for i in rejected) / n
    metrics["online_dpo/reward_gap"] = metrics["online_dpo/chosen_reward"] - metrics["online_dpo/rejected_reward"]
    pad = [chosen[-1]] * (width - n), [rejected[-1]] * (width - n)
    batch: dict[str, torch.Tensor] = {}
    for side, idx, extra in (("chosen", chosen, pad[0]), ("rejected", rejected, pad[1])):
        rows = pad_samples([samples[i] for i in idx + extra], pad_id=pad_id)
        batch.update({f"{side}_{k}": rows[k] for k in _ROW_KEYS})
    batch["weight"] = torch.cat([torch.ones(n), torch.zeros(width - n)])
    return batch, metrics
