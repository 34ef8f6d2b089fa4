"""Reward model scorer: a Hugging Face sequence-classification model with one output.

The text scored is `prompt + completion` (render chat templates before, in the prompt), tokenized
without added special tokens beyond what the tokenizer adds by default, cut to `max_length` tokens
from `truncation_side`, padded on the right, and read at the last non-pad token (how
`*ForSequenceClassification` pools). With `normalize`, scores are standardized by a running mean and
standard deviation (Welford) over every score this scorer has produced, this batch included; each
reward actor keeps its own statistics, saved and restored with `state_dict()`/`load_state_dict()`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fleetrl.reward.rules import RewardLoadError


class RunningMeanStd:
    """Running mean and population variance of a stream of numbers (Welford / Chan batch merge)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def update(self, values: Sequence[float]) -> None:
        n = len(values)
        if n == 0:
            return
        batch_mean = sum(values) / n
        batch_m2 = sum((v - batch_mean) ** 2 for v in values)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def normalize(self, values: Sequence[float], eps: float = 1e-8) -> list[float]:
        return [(v - self.mean) / (self.std + eps) for v in values]

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RewardLoadError(
            "reward model device is 'cuda' but torch sees no GPU here (under Ray, reserve one with "
            "reward.num_gpus); use device: auto or cpu"
        )
    return device


class RewardModelScorer:
    """Scores prompt+completion texts with a reward model; call it like a rule function."""

    def __init__(
        self,
        model_path: str,
        max_length: int = 1024,
        batch_size: int = 16,
        normalize: bool = False,
        device: str = "auto",
        truncation_side: str = "left",
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.max_length, self.batch_size, self.normalize = max_length, batch_size, normalize
        self.device = _pick_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise RewardLoadError(f"could not load the reward model from {model_path!r}: {e}") from e
        num_labels = self.model.config.num_labels
        if num_labels != 1:
            raise RewardLoadError(
                f"reward model {model_path!r} has {num_labels} outputs (num_labels); a reward model needs "
                "exactly one (save it with num_labels=1)"
            )
        tok = self.tokenizer
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise RewardLoadError(f"the tokenizer of {model_path!r} has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        # The model pools at the last token that is not its pad id, so both must agree.
        self.model.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"  # positions then match unpadded inputs
        tok.truncation_side = truncation_side
        self.model.to(self.device).eval()
        self.stats = RunningMeanStd()

    def raw_scores(self, texts: Sequence[str]) -> list[float]:
        """Model outputs for `texts`, in batches of batch_size, without normalization."""
        import torch

        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                chunk = list(texts[start : start + self.batch_size])
                enc = self.tokenizer(
                    chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                out.extend(logits[:, 0].float().cpu().tolist())
        return out

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: list) -> list[float]:
        scores = self.raw_scores([p + c for p, c in zip(prompts, completions, strict=True)])
        if not self.normalize:
            return scores
        # Non-finite outputs are reported by the caller; keep them out of the statistics.
        self.stats.update([s for s in scores if math.isfinite(s)])
        return self.stats.normalize(scores)

    def state_dict(self) -> dict:
        return {"stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state["stats"])
