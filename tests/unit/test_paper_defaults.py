"""Paper defaults per algorithm (DPO: lr 5e-7, RMSprop, batch 32; KTO: lr 5e-6, AdamW, batch 32):
used only for keys the config leaves unset, shown by `fleetrl config show`, and the learner's
optimizer choice they rely on (learner.optimizer: adamw | rmsprop)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fleetrl.cli import main
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.deepspeed_utils import client_optimizer, train_ds_config
from fleetrl.learner.offline_config import PAPER_DEFAULTS
from fleetrl.run.config import ConfigError, config_from_dict, dump_config, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def cfg_of(algo: str, *overrides: str, **sections):
    return config_from_dict({"algorithm": algo, "data": {"path": "x.jsonl"}, **sections}, overrides)


@pytest.mark.parametrize("algo,lr,opt", [("dpo", 5e-7, "rmsprop"), ("kto", 5e-6, "adamw")])
def test_unset_keys_take_the_papers_values(algo, lr, opt):
    cfg = cfg_of(algo)
    assert (cfg.learner.lr, cfg.learner.optimizer, cfg.offline.batch_size) == (lr, opt, 32)
    assert cfg.paper_defaults_applied == {"learner.lr": lr, "learner.optimizer": opt,
                                          "offline.batch_size": 32}
    assert PAPER_DEFAULTS[algo] == cfg.paper_defaults_applied


def test_explicit_values_win_even_when_equal_to_the_global_default():
    # learner.lr: 1e-6 IS the global default: written down, it still beats DPO's 5e-7.
    cfg = cfg_of("dpo", learner={"lr": 1e-6})
    assert cfg.learner.lr == 1e-6 and cfg.learner.optimizer == "rmsprop"
    assert "learner.lr" not in cfg.paper_defaults_applied
    cfg = cfg_of("dpo", "learner.optimizer=adamw", "offline.batch_size=64", "learner.lr=1e-3")
    assert (cfg.learner.lr, cfg.learner.optimizer, cfg.offline.batch_size) == (1e-3, "adamw", 64)
    assert cfg.paper_defaults_applied == {}
    # Other algorithms keep the global defaults.
    sft = cfg_of("sft")
    assert (sft.learner.lr, sft.learner.optimizer, sft.offline.batch_size) == (1e-6, "adamw", 64)
    assert sft.paper_defaults_applied == {} and not dump_config(sft).startswith("#")
    # The class-level defaults are untouched by resolution.
    assert cfg_of("sft").learner.lr == 1e-6 and LearnerConfig().lr == 1e-6


def test_the_tiny_examples_keep_their_own_lr_and_batch():
    dpo = load_config(EXAMPLES / "dpo_tiny.yaml")
    assert dpo.learner.lr == 1e-3 and dpo.offline.batch_size == 16
    assert dpo.paper_defaults_applied == {"learner.optimizer": "rmsprop"}
    kto = load_config(EXAMPLES / "kto_tiny.yaml")
    assert kto.learner.lr == 1e-3 and kto.paper_defaults_applied == {"learner.optimizer": "adamw"}


def test_config_show_prints_the_values_used_and_where_they_came_from(capsys):
    assert main(["config", "show", str(EXAMPLES / "dpo_tiny.yaml"), "learner.lr=2e-3"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first.startswith("# dpo paper defaults used") and "learner.optimizer=rmsprop" in first
    assert "learner.lr" not in first  # set by the override
    shown = yaml.safe_load(rest)
    assert shown["learner"]["lr"] == 2e-3 and shown["learner"]["optimizer"] == "rmsprop"
    assert shown["offline"]["batch_size"] == 16
    # The printed config reloads to the same run (the defaults are now written down).
    assert config_from_dict(yaml.safe_load(out)) == load_config(EXAMPLES / "dpo_tiny.yaml",
                                                                 ["learner.lr=2e-3"])


def test_clashes_with_a_paper_default_say_which_default_and_how_to_fix():
    with pytest.raises(ConfigError, match=r"offline.batch_size=32 must be a multiple .* = 3 .*32 is the dpo "
                                          r"paper default: set offline.batch_size"):
        cfg_of("dpo", "learner.micro_batch_size=3")
    with pytest.raises(ConfigError, match=r"learner.optimizer=rmsprop is the dpo paper default .* Set "
                                          r"learner.optimizer explicitly"):
        cfg_of("dpo", "learner.offload_optimizer=true")
    explicit = cfg_of("dpo", "learner.offload_optimizer=true", "learner.optimizer=adamw")
    assert explicit.learner.optimizer == "adamw"


def test_optimizer_choice_reaches_the_client_optimizer_and_deepspeed_config():
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": 0.0}]
    rms = client_optimizer(LearnerConfig(optimizer="rmsprop", lr=5e-7), params)
    assert isinstance(rms, torch.optim.RMSprop) and rms.param_groups[0]["lr"] == 5e-7
    assert rms.param_groups[0]["alpha"] == 0.99
    adam = client_optimizer(LearnerConfig(lr=5e-6, adam_betas=(0.8, 0.9)), params)
    assert isinstance(adam, torch.optim.AdamW) and adam.param_groups[0]["betas"] == (0.8, 0.9)
    # On GPU, AdamW is DeepSpeed's fused Adam; RMSprop stays a client optimizer (no "optimizer" key).
    assert "optimizer" in train_ds_config(LearnerConfig(), 1, 1, "bfloat16", on_gpu=True)
    rmsprop = LearnerConfig(optimizer="rmsprop")
    assert "optimizer" not in train_ds_config(rmsprop, 1, 1, "bfloat16", on_gpu=True)
    with pytest.raises(ValueError, match="CPU Adam"):
        LearnerConfig(optimizer="rmsprop", offload_optimizer=True)
    with pytest.raises(ValueError):
        LearnerConfig(optimizer="sgd")
