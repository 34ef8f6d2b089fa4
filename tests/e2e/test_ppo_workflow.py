"""The classic RLHF recipe end to end on CPU: SFT -> reward model -> PPO with a critic.

Each stage is the `fleetrl train` path (real Ray, DeepSpeed, vLLM CPU) on its example config,
consuming the previous stage's output directory exactly as the README's three commands do. The
PPO stage must raise the reward model's score of greedy completions on held-out prompts (logged by
the run before step 1 and after the last step). A single in-process critic rank is checked first
against plain transformers: value alignment, starting at the reward model's scores, and updates
that move the values towards the returns.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
import torch

from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.critic import align_values, load_value_model
from fleetrl.learner.critic_config import CriticConfig
from fleetrl.learner.deepspeed_utils import free_port
from fleetrl.learner.rank import Learner
from fleetrl.run.config import load_config
from fleetrl.train import train

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_critic_rank_values_match_transformers_and_regress_on_returns(tiny_reward):
    rm_path = str(tiny_reward)
    cfg = CriticConfig(lr=1e-2, value_clip=0.5).learner_config(
        LearnerConfig(micro_batch_size=2, zero_stage=2))
    critic = Learner(cfg, rm_path, master_port=free_port(), mini_batch_size=4, objective="critic",
                     objective_cfg={"value_clip": 0.5})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 400, (4, 12), generator=g)
    attn = torch.ones(4, 12, dtype=torch.long)
    attn[1, 9:] = 0  # right padding
    attn[2, :3] = 0  # left padding
    ids[attn == 0] = 0
    loss_mask = torch.zeros(4, 12)
    loss_mask[:, 6:] = 1
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask * attn}

    values = critic.compute_values(batch)
    plain = load_value_model(rm_path, torch.float32).eval()
    with torch.no_grad():
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        head = plain(input_ids=ids, attention_mask=attn, position_ids=positions).logits[..., 0]
    assert torch.allclose(values, align_values(head, attn), atol=1e-4)
    assert values[1, 9:].abs().sum() == 0 and values[2, :4].abs().sum() == 0

    mask = batch["loss_mask"].bool()
    returns = torch.where(mask, torch.full_like(values, 2.0), torch.zeros(()))
    train_batch = {**batch, "old_values": values, "returns": returns}
    before = float(((values - returns)[mask] ** 2).mean())
    stats = critic.train(train_batch, mini_batch_size=4, epochs=6)
    after_values = critic.compute_values(batch)
    after = float(((after_values - returns)[mask] ** 2).mean())
    value_losses = [round(s["value_loss"], 3) for s in stats]
    print(f"critic: value mse {before:.3f} -> {after:.3f}; value_loss {value_losses}")
    assert set(stats[0]) >= {"value_loss", "vf_clip_frac", "values_mean", "grad_norm", "lr"}
    # First step: values == old values, so no clipping and the loss is 0.5 * MSE over the valid tokens.
    assert stats[0]["value_loss"] == pytest.approx(0.5 * before, rel=1e-4)
    assert stats[0]["vf_clip_frac"] == 0
    assert stats[0]["values_mean"] == pytest.approx(float(values[mask].mean()), abs=1e-4)
    assert after < 0.5 * before
    assert stats[-1]["vf_clip_frac"] > 0  # values moved more than value_clip from their old values


@pytest.fixture(scope="module")
def sft_and_rm(tmp_path_factory, ray_local):
    """Steps 1 and 2 of the recipe: SFT on the letters data, then a reward model from the SFT model."""
    out_dir = tmp_path_factory.mktemp("rlhf")
    out = [f"run.output_dir={out_dir}"]
    t0 = time.perf_counter()
    sft = train(load_config(EXAMPLES / "sft_tiny.yaml", out + ["run.name=sft-tiny"]),
                EXAMPLES / "sft_tiny.yaml")
    t_sft = time.perf_counter()
    rm = train(load_config(EXAMPLES / "rm_tiny.yaml",
                           out + ["run.name=rm-tiny", f"model.path={sft / 'final_model'}"]),
               EXAMPLES / "rm_tiny.yaml")
    print(f"workflow: sft {t_sft - t0:.0f}s, rm {time.perf_counter() - t_sft:.0f}s")
    assert read_jsonl(rm / "metrics.jsonl")[-1]["eval/accuracy"] > 0.6  # the RM learned the preferences
    return out_dir, sft / "final_model", rm / "final_model"


def test_sft_then_reward_model_then_ppo_raises_the_reward_models_held_out_score(sft_and_rm):
    out_dir, sft_model, rm_model = sft_and_rm
    steps = 24
    t0 = time.perf_counter()
    ppo = train(load_config(EXAMPLES / "ppo_tiny.yaml", [
        f"run.output_dir={out_dir}", "run.name=ppo", f"run.steps={steps}", f"model.path={sft_model}",
        f"reward.functions.0.model_path={rm_model}", "critic.placement=colocate",
        # Synchronous: the same seeded run each time (asynchronous runs vary with timing; they are
        # checked in test_grpo.py and test_fleet_scaling.py).
        "rl.max_staleness=0",
    ]), EXAMPLES / "ppo_tiny.yaml")
    print(f"workflow: ppo {time.perf_counter() - t0:.0f}s")

    rows = read_jsonl(ppo / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(steps + 1))  # step 0: held-out eval before training
    first, last = rows[0], rows[-1]
    for key in ("critic/value_loss", "critic/vf_clip_frac", "critic/explained_variance", "returns/mean",
                "values/mean", "advantage/mean", "advantage/std", "kl/coef", "kl/seq_mean",
                "train/policy_loss", "train/clip_frac", "train/entropy", "reward/rm", "reward/letter",
                "time/critic_values"):
        assert key in last, key
    assert all(r["kl/coef"] == pytest.approx(0.05) for r in rows[1:])  # fixed controller
    assert last["eval/prompts"] == first["eval/prompts"] == 64

    rewards = [r["reward/mean"] for r in rows[1:]]
    early, late = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    print(f"ppo: held-out RM score (greedy) {first['eval/reward/mean']:.3f} -> "
          f"{last['eval/reward/mean']:.3f}; sampled reward {early:.3f} -> {late:.3f}; "
          f"held-out letter rule {first['eval/reward/letter']:.3f} -> {last['eval/reward/letter']:.3f}")
    assert last["eval/reward/mean"] > first["eval/reward/mean"] + 0.3, (first, last)
    assert late > early + 1.0, rewards

    assert (ppo / "final_model" / "config.json").is_file()
    critic_cfg = json.loads((ppo / "final_critic" / "config.json").read_text())
    assert critic_cfg["architectures"][0].endswith("ForTokenClassification")
    assert (ppo / "checkpoints" / f"step-{steps:06d}" / "critic").is_dir()


def test_reinforce_pp_baseline_runs_the_same_recipe_without_a_critic(sft_and_rm):
    out_dir, sft_model, rm_model = sft_and_rm
    steps = 6
    run = train(load_config(EXAMPLES / "ppo_tiny.yaml", [
        "algorithm=reinforce_pp_baseline", f"run.output_dir={out_dir}", "run.name=rpp", f"run.steps={steps}",
        f"model.path={sft_model}", f"reward.functions.0.model_path={rm_model}", "data.eval_path=null",
        "reinforce_pp.kl_control=adaptive", "reinforce_pp.kl_target=0.5", "reinforce_pp.kl_horizon=64",
    ]), EXAMPLES / "ppo_tiny.yaml")
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # no held-out data, no step 0
    assert not any(k.startswith(("critic/", "eval/")) for r in rows for k in r)
    for r in rows:
        # whitened
        assert abs(r["advantage/mean"]) < 1e-4 and r["advantage/std"] == pytest.approx(1.0, abs=0.01)
    # The adaptive coefficient moves against the observed KL: up while KL > target, down while below.
    for prev, cur in itertools.pairwise(rows):
        direction = 1 if prev["kl/seq_mean"] > 0.5 else -1
        assert (cur["kl/coef"] - prev["kl/coef"]) * direction > 0, (prev, cur)
    assert not (run / "final_critic").exists()
