"""Every example and recipe config loads and validates as `fleetrl config show` does, without starting
anything; the recipes' data preparation and reward fit together on a real GSM8K-shaped row."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from fleetrl.cli import main
from fleetrl.reward.builtins import make_builtin
from fleetrl.run.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "examples/recipes").glob("*.yaml"))
RECIPES = sorted((ROOT / "examples/recipes").glob("*.yaml"))


def test_there_are_recipes_for_the_real_models():
    names = {p.name for p in RECIPES}
    assert {"grpo_gsm8k_qwen0.5b_2gpu.yaml", "grpo_gsm8k_qwen7b_8gpu.yaml",
            "dpo_ultrafeedback_qwen0.5b_2gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_validates_and_shows(path, capsys):
    cfg = load_config(path)
    assert cfg.algorithm
    assert main(["config", "show", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["algorithm"] == cfg.algorithm


def test_recipe_placement_adds_up_to_the_gpus_in_its_name():
    for path in RECIPES:
        cfg = load_config(path)
        gpus = int(path.stem.rsplit("_", 1)[1].removesuffix("gpu"))
        rollout = cfg.rollout.num_workers * cfg.rollout.tensor_parallel_size if cfg.algorithm == "grpo" else 0
        assert rollout + cfg.learner.num_ranks == gpus, path.name
        assert "Qwen/Qwen2.5-" in cfg.model.path


def _prepare_module():
    spec = importlib.util.spec_from_file_location("recipes_prepare_data", ROOT / "examples/recipes/prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_gsm8k_rows_are_scored_by_the_recipe_reward(tmp_path):
    prep = _prepare_module()
    record = {"question": "Tom has 3 apples and buys 4 more. How many?",
              "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}
    row = prep.gsm8k_row(record)
    assert row["prompt"].startswith("Tom has 3 apples") and "#### " in row["prompt"]
    recipe = load_config(ROOT / "examples/recipes/grpo_gsm8k_qwen0.5b_2gpu.yaml")
    fn = recipe.reward.functions[0]
    reward = make_builtin(fn.builtin, fn.kwargs)
    good, bad = "3 + 4 = 7\n#### 7", "3 + 4 = 8\n#### 8"
    assert reward([row["prompt"]] * 2, [good, bad], answer=[row["answer"]] * 2) == [1.0, 0.0]
    # The recipe reads the written rows as prompt data with the answer column kept.
    (tmp_path / "gsm8k_train.jsonl").write_text(json.dumps(row) + "\n")
    cfg = load_config(ROOT / "examples/recipes/grpo_gsm8k_qwen0.5b_2gpu.yaml",
                      [f"data.path={tmp_path / 'gsm8k_train.jsonl'}", "data.eval_path=null"])
    from fleetrl.data.rows import load_rows

    rows = load_rows(cfg.data, kind="prompt")
    assert rows[0].extra["answer"] == record["answer"]


def test_ultrafeedback_rows_keep_the_conversations():
    prep = _prepare_module()
    chosen = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]
    rejected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]
    assert prep.ultrafeedback_row({"chosen": chosen, "rejected": rejected, "score_chosen": 8.0}) == {
        "chosen": chosen, "rejected": rejected}


def _key_exists(dotted: str) -> bool:
    """Whether a dotted fleetrl key (list indexes as N, `*` for any child) names a field of RunConfig."""
    from fleetrl.run.config import RunConfig

    models = [RunConfig]
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if part in ("N", "*"):
            if part == "*":
                return i == len(parts) - 1
            continue
        found = [m.model_fields[part].annotation for m in models if part in m.model_fields]
        if not found:
            return False
        models = [m for ann in found for m in _models_in(ann)]
        if i < len(parts) - 1 and not models and parts[i + 1] != "*":
            return False
    return True


def _models_in(annotation) -> list:
    import typing

    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def test_every_fleetrl_key_on_the_coming_from_page_exists():
    import re

    from fleetrl.run.config import RunConfig

    text = (ROOT / "docs/coming-from.md").read_text()
    keys = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or set(cells[0]) <= {"-", " "}:
            continue
        for token in re.findall(r"`([^`]+)`", cells[1]):
            key = token.split(":")[0].strip()
            if "." in key and key.split(".")[0] in RunConfig.model_fields and " " not in key:
                keys.add(key)
    assert len(keys) > 60  # the tables were parsed
    missing = sorted(k for k in keys if not _key_exists(k))
    assert not missing, f"docs/coming-from.md names keys fleetrl does not have: {missing}"
    assert not _key_exists("learner.no_such_key") and not _key_exists("rl.group_size.x")
