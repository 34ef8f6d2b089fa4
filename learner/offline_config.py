"""Config of the offline trainers (SFT, reward model, DPO/cDPO, IPO, KTO, ORPO).

Each algorithm owns a small section with its hyperparameters (the run config exposes them as
``sft:``, ``rm:``, ``dpo:``, ...); `OfflineConfig` holds what they share: batch size, epochs,
evaluation cadence, sequence length and how reference log-probs are obtained. Plain pydantic,
no torch import, so the orchestrator validates configs without loading DeepSpeed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.strict import StrictModel

OFFLINE_ALGORITHMS = ("sft", "rm", "dpo", "ipo", "kto", "orpo")
# Algorithms whose loss compares the policy with a frozen reference model.
REFERENCE_ALGORITHMS = ("dpo", "ipo", "kto")
# What each algorithm trains on: rows of this kind (KTO also accepts preference rows, split in two).
ROW_KIND = {"sft": "sft", "rm": "preference", "dpo": "preference", "ipo": "preference",
            "kto": "unpaired", "orpo": "preference"}


class OfflineConfig(StrictModel):
    """What every offline trainer shares."""

    # Examples per optimizer step over all ranks: pairs (rm, dpo, ipo, orpo), completions (kto)
    # or sequences (sft; packed rows when sft.packing). A multiple of num_ranks * micro_batch_size.
    batch_size: int = Field(64, ge=1)
    # Passes over the training data; run.steps (when set) overrides it with a number of optimizer steps.
    epochs: int = Field(1, ge=1)
    # Evaluate on the held-out split every N optimizer steps (and before the first, and after the
    # last); 0 = only before and after training.
    eval_every: int = Field(0, ge=0)
    eval_batch_size: int = Field(64, ge=1)
    # prompt + completion tokens; longer completions are cut on the right (counted), rows whose
    # prompt alone does not fit are skipped (counted).
    max_length: int = Field(1024, ge=2)
    # precompute: the reference scores every training/eval sequence once up front and is then freed
    # (less memory during training); on_the_fly: it stays loaded and scores each micro-batch.
    reference_logps: Literal["precompute", "on_the_fly"] = "precompute"


class SFTConfig(StrictModel):
    # Loss only on completion tokens (the prompt is context); false: every token counts.
    completion_only_loss: bool = True
    # Pack several examples into each row of offline.max_length tokens (attention never crosses
    # examples: positions restart per example and the model masks block-diagonally).
    packing: bool = False


class RMConfig(StrictModel):
    # Column (in the data's extra columns) holding a per-pair margin m: loss -log sigmoid(c - r - m)
    # (Llama 2's preference-strength margin). None: no margin.
    margin_key: str | None = None


class DPOConfig(StrictModel):
    beta: float = Field(0.1, gt=0)
    # > 0: conservative DPO (cDPO), the labels are flipped with this probability.
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)


class IPOConfig(StrictModel):
    # The squared loss regresses the (length-averaged) margin onto 1 / (2 * beta).
    beta: float = Field(0.1, gt=0)


class KTOConfig(StrictModel):
    beta: float = Field(0.1, gt=0)
    # lambda_D and lambda_U. None: set from the training data so that
    # lambda_D * n_desirable / (lambda_U * n_undesirable) lies in [1, 1.5] (the KTO paper's rule).
    desirable_weight: float | None = Field(None, gt=0)
    undesirable_weight: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _both_or_neither(self) -> KTOConfig:
        if (self.desirable_weight is None) != (self.undesirable_weight is None):
            raise ValueError(
                "set both kto.desirable_weight and kto.undesirable_weight, or neither (then they are "
                "chosen from the data's desirable/undesirable counts)"
            )
        return self


class ORPOConfig(StrictModel):
    # Weight of the odds-ratio term next to the chosen answer's NLL (the paper's lambda).
    beta: float = Field(0.1, gt=0)


AlgorithmConfig = SFTConfig | RMConfig | DPOConfig | IPOConfig | KTOConfig | ORPOConfig
