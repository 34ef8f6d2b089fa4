"""Config of the teacher (`TeacherConfig`): a frozen model that scores the student's tokens (opd).

Importing this module does not import torch or Ray.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fleetrl.core.strict import StrictModel


class TeacherConfig(StrictModel):
    """A frozen, forward-only model given by path, run as its own Ray actors (learner/teacher.py)."""

    model_path: str  # a local directory, a Hugging Face id, or `tiny` (the built-in tiny model)
    num_actors: int = Field(1, ge=1, description="actors; a batch's rows are split over them")
    num_cpus_per_actor: float = Field(1.0, ge=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    micro_batch_size: int = Field(16, ge=1, description="rows per forward")
    call_timeout_s: float = Field(600.0, gt=0, description="deadline of one scoring call (all actors)")
    ready_timeout_s: float = Field(900.0, gt=0, description="deadline for the model to load")


class OPDConfig(StrictModel):
    """On-policy distillation (algorithm: opd): per-token reverse KL to the teacher on the student's samples."""

    # > 0: add reward_weight * the task reward's GRPO group advantage to every token (needs
    # rl.group_size >= 2 and reward.functions); 0 = pure distillation.
    reward_weight: float = Field(0.0, ge=0)
