"""LoRA post-training: `learner.lora` and the PEFT wrapping of the trained model.

With `learner.lora` set, `Engine` wraps the policy (or the reward model) in a PEFT LoRA model:
the base weights are frozen, so only the adapter's A/B matrices get gradients and optimizer state,
and the reference is the same model with its adapter disabled (no second copy). The weight sync
sends only the adapter tensors, under the names `adapter_tensors` gives them (Hugging Face module
names + `.lora_A.weight` / `.lora_B.weight`, the names of PEFT's saved format); the receiver merges
them into base weights it keeps (`fleetrl.core.weight_wire.merge_lora`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from fleetrl.core.strict import StrictModel

# Objective.model_kind -> PEFT task type (SEQ_CLS / TOKEN_CLS keep the new head trainable).
_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "score": "SEQ_CLS", "value": "TOKEN_CLS"}


class LoraConfig(StrictModel):
    """`learner.lora`: train a LoRA adapter instead of every weight (null = full fine-tuning)."""

    r: int = Field(16, ge=1)  # rank of the update B @ A
    alpha: float = Field(32.0, gt=0)  # the update is scaled by alpha / r
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "all-linear": every linear layer of the transformer blocks (not the output head), else module
    # names as PEFT matches them (e.g. [q_proj, v_proj]).
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or not all(isinstance(m, str) and m.strip() for m in v)):
            raise ValueError("learner.lora.target_modules must be 'all-linear' or a non-empty list of module "
                             "names such as [q_proj, k_proj, v_proj, o_proj]")
        return v

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, model_kind: str = "causal_lm") -> torch.nn.Module:
    """`model` wrapped in a PEFT LoRA model: base weights frozen, adapter weights trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if model_kind not in _TASK_TYPES:
        raise ValueError(f"learner.lora: no LoRA task for model kind {model_kind!r}")
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, task_type=_TASK_TYPES[model_kind])
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ValueError(f"learner.lora.target_modules={cfg.target_modules!r} does not fit the model: {e} "
                         f"The model's linear layers are named {linear}") from None


def wire_name(peft_name: str) -> str | None:
    """PEFT parameter name -> the adapter's name on the wire and on disk; None for non-LoRA params."""
    if ".lora_A." not in peft_name and ".lora_B." not in peft_name:
        return None
    name = peft_name.removeprefix("base_model.model.")
    for m in ("lora_A", "lora_B"):
        name = name.replace(f".{m}.default.", f".{m}.")
    return name


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapter's A/B parameters by wire name, in the model's (layer by layer) order.

    A trained parameter that is not a linear layer's A/B (an embedding's LoRA, a module PEFT trains
    whole) is an error: it would not reach the fleet, which would then sample from another model.
    """
    out = {}
    for name, p in model.named_parameters():
        wname = wire_name(name)
        if wname is not None:
            out[wname] = p
        elif p.requires_grad:
            raise ValueError(
                f"learner.lora: {name} is trained but a weight sync cannot carry it (only the A/B matrices "
                "of linear layers travel to the fleet, and vLLM serves only those): keep "
                "learner.lora.target_modules to linear layers such as q_proj/v_proj/down_proj")
    if not out:
        raise ValueError("the model has no LoRA parameters: is learner.lora set?")
    return out


class AdapterDisabled:
    """The PEFT model called with its adapter switched off and in eval mode: the base model,
    i.e. the reference, without a second copy in memory."""

    def __init__(self, call: Any, peft_model: torch.nn.Module):
        self.call, self.peft_model = call, peft_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        was_training = self.peft_model.training
        self.peft_model.eval()
        try:
            with self.peft_model.disable_adapter(), torch.no_grad():
                return self.call(*args, **kwargs)
        finally:
            self.peft_model.train(was_training)


def export_merged(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge a saved adapter (final_model/ of a LoRA run) into its base model; write an HF model.

    The base model is the one named in adapter_config.json (`base_model_name_or_path`).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{cfg_file} does not exist: {adapter_dir} is not a LoRA adapter (a run without learner.lora "
            "already writes a full model to final_model/, loadable as it is)")
    meta = json.loads(cfg_file.read_text())
    base_path = meta.get("base_model_name_or_path")
    if not base_path or not Path(base_path).exists():
        raise FileNotFoundError(
            f"{cfg_file}: base_model_name_or_path={base_path!r} is not a directory here: copy the base model "
            "there or edit that field to point at it")
    loader = AutoModelForSequenceClassification if meta.get("task_type") == "SEQ_CLS" else AutoModelForCausalLM
    kwargs = {"num_labels": 1} if loader is AutoModelForSequenceClassification else {}
    base = loader.from_pretrained(base_path, **kwargs)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(adapter_dir) if (adapter_dir / "tokenizer_config.json").exists()
                                  else base_path).save_pretrained(out)
    return out
