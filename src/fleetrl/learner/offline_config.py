"""Config of the offline trainers (SFT, reward model, DPO/cDPO, IPO, KTO, ORPO, SimPO, offline PPO).

Each algorithm owns a small section with its hyperparameters (the run config exposes them as
``sft:``, ``rm:``, ``dpo:``, ...); `OfflineConfig` holds what they share: batch size, epochs,
evaluation cadence, sequence length and how reference log-probs are obtained. Plain pydantic,
no torch import, so the orchestrator validates configs without loading DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from fleetrl.core.strict import StrictModel

# Hyperparameters of the papers, used when the config leaves them unset (a value written in the
# config always wins): KTO (Ethayarajh et al. 2024) and DPO (Rafailov et al. 2023). Keys are dotted
# run-config paths; `fleetrl config show` prints the resolved values and which ones came from here.
PAPER_DEFAULTS: dict[str, dict[str, object]] = {
    "dpo": {"learner.lr": 5e-7, "learner.optimizer": "rmsprop", "offline.batch_size": 32},
    "kto": {"learner.lr": 5e-6, "learner.optimizer": "adamw", "offline.batch_size": 32},
}


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


class FeedbackConfig(StrictModel):
    """How unpaired feedback is read (KTO and offline PPO share these)."""

    # Preference rows become one desirable (chosen) and one undesirable (rejected) example each;
    # true: exactly one of the two per prompt, picked at random (seeded by run.seed), as in the
    # KTO paper's one-y-per-x setting. Counts are printed and logged (data/train/...).
    one_y_per_x: bool = False
    # Column with a numeric score / rating per completion (rows: prompt, completion, <score_key>).
    # Set: score >= score_threshold is desirable, below it undesirable (a label column is ignored).
    score_key: str | None = None
    score_threshold: float | None = None
    # Per-example weight multiplying its loss: "none" = 1; "distance" = |score - threshold|,
    # scaled so the training examples' weights average 1 (a score at the threshold weighs 0).
    score_weighting: Literal["none", "distance"] = "none"

    @model_validator(mode="after")
    def _score_settings(self) -> FeedbackConfig:
        section = "kto" if isinstance(self, KTOConfig) else "offline_ppo"
        if self.score_key is not None and self.score_threshold is None:
            raise ValueError(
                f"{section}.score_key is '{self.score_key}' but {section}.score_threshold is unset: set the "
                "score at and above which a completion is desirable (e.g. 3.5 on a 1-5 rating scale)"
            )
        if self.score_key is None and (self.score_threshold is not None or self.score_weighting != "none"):
            raise ValueError(
                f"{section}.score_threshold / {section}.score_weighting need {section}.score_key (the column "
                "holding each completion's score); set it or remove them"
            )
        return self


class KTOConfig(FeedbackConfig):
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


class SimPOConfig(StrictModel):
    """SimPO (algos/simpo.py): reference-free margin loss on length-averaged log-probs. The authors'
    conventions and defaults: beta scales the average log-prob into a reward, the target margin is
    gamma = beta * gamma_beta_ratio (TRL's CPO trainer calls gamma itself `simpo_gamma`)."""

    beta: float = Field(2.0, gt=0)
    gamma_beta_ratio: float = Field(0.5, ge=0)
    # > 0: the labels are flipped with this probability (as in conservative DPO).
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)


class OfflinePPOConfig(FeedbackConfig):
    """PPO's clipped objective on fixed feedback: reward +1 for a desirable completion, -1 for an
    undesirable one, on every completion token; the "old" policy is the reference (scored once),
    so the clip keeps each token's probability ratio to the starting model in [1 - clip, 1 + clip]."""

    clip: float = Field(0.2, gt=0, lt=1)


AlgorithmConfig = (SFTConfig | RMConfig | DPOConfig | IPOConfig | KTOConfig | ORPOConfig | SimPOConfig
                   | OfflinePPOConfig)


@dataclass(frozen=True)
class OfflineAlgorithm:
    """What the config knows of an offline algorithm (its trainer is the learner objective of the same
    name, fleetrl.learner.offline): its config section, the rows it trains on, whether it compares the
    policy with a frozen reference, whether it learns from unpaired (desirable / undesirable) feedback."""

    config: type[StrictModel]
    rows: str  # "sft" | "preference" | "unpaired" (KTO and offline PPO also take preference and scored rows)
    reference: bool = False
    unpaired: bool = False


# The offline algorithms, by name: the run config's `algorithm` and its section (`dpo:` ...).
# A new one adds a row here, its section in RunConfig and its learner objective (or pair loss).
OFFLINE_TABLE: dict[str, OfflineAlgorithm] = {
    "sft": OfflineAlgorithm(SFTConfig, "sft"),
    "rm": OfflineAlgorithm(RMConfig, "preference"),
    "dpo": OfflineAlgorithm(DPOConfig, "preference", reference=True),
    "ipo": OfflineAlgorithm(IPOConfig, "preference", reference=True),
    "kto": OfflineAlgorithm(KTOConfig, "unpaired", reference=True, unpaired=True),
    "orpo": OfflineAlgorithm(ORPOConfig, "preference"),
    "simpo": OfflineAlgorithm(SimPOConfig, "preference"),
    # Offline PPO's reference is its "old" policy, scored once.
    "offline_ppo": OfflineAlgorithm(OfflinePPOConfig, "unpaired", reference=True, unpaired=True),
}
OFFLINE_ALGORITHMS = tuple(OFFLINE_TABLE)
# Algorithms whose loss compares the policy with a frozen reference model.
REFERENCE_ALGORITHMS = tuple(name for name, a in OFFLINE_TABLE.items() if a.reference)
# Algorithms that learn from single completions marked desirable / undesirable (or scored).
UNPAIRED_ALGORITHMS = tuple(name for name, a in OFFLINE_TABLE.items() if a.unpaired)
# What each algorithm trains on: rows of this kind.
ROW_KIND = {name: a.rows for name, a in OFFLINE_TABLE.items()}


def algorithm_config(algorithm: str, algo_cfg: object = None) -> StrictModel:
    """The validated config of `algorithm` (from a dict, the model itself, or None for defaults)."""
    if algorithm not in OFFLINE_TABLE:
        raise ValueError(f"unknown offline algorithm {algorithm!r}; allowed: {', '.join(OFFLINE_ALGORITHMS)}")
    cls = OFFLINE_TABLE[algorithm].config
    if isinstance(algo_cfg, cls):
        return algo_cfg
    if isinstance(algo_cfg, StrictModel):
        algo_cfg = algo_cfg.model_dump()
    return cls.model_validate(algo_cfg or {})
