"""Online DPO's pieces: the best-vs-worst pairing (hand-computed), its refusals, the pair batch with
weight-0 padding, and the pair objective ignoring that padding."""

from __future__ import annotations

import pytest
import torch

from fleetrl.algos import ADVANTAGE_ESTIMATORS, ONLINE_ALGORITHMS
from fleetrl.algos.online_dpo import best_worst_pairs
from fleetrl.learner.accumulate import optimizer_step
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.forward import micro_batches
from fleetrl.learner.objective import LocalModels
from fleetrl.learner.rank import objective_class
from fleetrl.online.batch import Sample
from fleetrl.online.pairs import pair_batch
from fleetrl.run.config import ConfigError, load_config
from tests.unit.test_learner_objectives import PlainEngine
from tests.unit.test_offline_ppo import tiny_lm

EXAMPLE = "examples/online_dpo_tiny.yaml"


def test_best_worst_pairs_by_hand():
    # group 0: best 0.9 (index 1), worst 0.1 (index 2); group 1: all 0.5, a tie;
    # group 2: best 1.0 first at index 6 (7 equals it), worst 0.0 first at index 8 (9 equals it).
    rewards = [0.3, 0.9, 0.1, 0.5, 0.5, 0.5, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="not divisible"):
        best_worst_pairs(rewards, 3)
    chosen, rejected, ties = best_worst_pairs(rewards[:9] + [0.2, 0.4, 0.6], 4)
    # groups of 4: [0.3 0.9 0.1 0.5] -> (1, 2); [0.5 0.5 1.0 1.0] -> (6, 4); [0.0 0.2 0.4 0.6] -> (11, 8)
    assert (chosen, rejected, ties) == ([1, 6, 11], [2, 4, 8], 0)
    chosen, rejected, ties = best_worst_pairs([0.3, 0.9, 0.5, 0.5, 1.0, 0.0], 2)
    assert (chosen, rejected, ties) == ([1, 4], [0, 5], 1)


def test_best_worst_pairs_refuses_groups_of_one():
    with pytest.raises(ValueError, match="group_size >= 2"):
        best_worst_pairs([1.0, 0.0], 1)


def test_best_worst_signs_mark_chosen_and_rejected():
    signs = ADVANTAGE_ESTIMATORS.get("best_worst")(torch.tensor([0.3, 0.9, 0.5, 0.5]), 2)
    assert signs.tolist() == [-1.0, 1.0, 0.0, 0.0]


def test_online_dpo_is_registered_and_config_refusals_are_clear():
    algo = ONLINE_ALGORITHMS.get("online_dpo")
    assert algo.objective == "pairs" and algo.min_group_size == 2
    cfg = load_config(EXAMPLE)
    assert cfg.online_dpo.loss == "dpo" and cfg.mini_batch_size == cfg.rl.prompts_per_step
    assert cfg.optimizer_steps_per_step == 1
    with pytest.raises(ConfigError, match=r"online_dpo needs rl.group_size >= 2 \(each prompt's pair is its best"):
        load_config(EXAMPLE, ["rl.group_size=1"])
    with pytest.raises(ConfigError, match="unknown preference loss 'dpoo'.*did you mean 'dpo'"):
        load_config(EXAMPLE, ["online_dpo.loss=dpoo"])
    with pytest.raises(ConfigError, match="rl.mini_batch_size does not apply to online_dpo"):
        load_config(EXAMPLE, ["rl.mini_batch_size=64"])
    with pytest.raises(ConfigError, match="multiple of learner.num_ranks \\* learner.micro_batch_size"):
        load_config(EXAMPLE, ["learner.micro_batch_size=6", "rl.prompts_per_step=8"])
    with pytest.raises(ConfigError, match="learner.reference is false"):
        load_config(EXAMPLE, ["learner.reference=false"])
    assert load_config(EXAMPLE, ["learner.reference=false", "online_dpo.loss=simpo"]).online_dpo.loss == "simpo"


def _sample(prompt: list[int], completion: list[int], reward: float, version: int = 0) -> Sample:
    return Sample(prompt_index=0, prompt_text="", prompt_ids=prompt, completion_ids=completion,
                  logprobs=[0.0] * len(completion), finish_reason="stop", weight_version=version, reward=reward)


def test_pair_batch_pads_with_weight_zero_and_counts_ties():
    samples = [_sample([5, 6], [7], 0.0), _sample([5, 6], [8, 9], 1.0),  # a pair: chosen 1, rejected 0
               _sample([3], [4], 0.5), _sample([3], [4, 4], 0.5)]  # a tie
    batch, metrics = pair_batch(samples, 2, pad_id=0, width=4)
    assert metrics == {"online_dpo/pairs": 1.0, "online_dpo/skipped_ties": 1.0, "online_dpo/chosen_reward": 1.0,
                       "online_dpo/rejected_reward": 0.0, "online_dpo/reward_gap": 1.0}
    assert batch["weight"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert batch["chosen_input_ids"][0].tolist() == [5, 6, 8, 9]
    assert batch["chosen_loss_mask"][0].tolist() == [0, 0, 1, 1]
    assert batch["rejected_input_ids"][0].tolist() == [5, 6, 7]
    assert all(v.shape[0] == 4 for v in batch.values())
    none, metrics = pair_batch(samples[2:], 2, pad_id=0, width=4)
    assert none is None and metrics == {"online_dpo/pairs": 0.0, "online_dpo/skipped_ties": 1.0}


def test_pair_objective_ignores_weight_zero_rows():
    """The loss and statistics of 2 real pairs + 2 weight-0 copies equal those of the 2 pairs alone."""
    samples = [_sample([5, 6], [7, 3], 0.0), _sample([5, 6], [8, 9, 1], 1.0),
               _sample([3], [4, 2], 0.9), _sample([3], [11], 0.1)]
    padded, _ = pair_batch(samples, 2, pad_id=0, width=4)
    plain = {k: v[:2] for k, v in padded.items() if k != "weight"}
    outs, grads = [], []
    for b in (padded, plain):
        policy, ref = tiny_lm(0), tiny_lm(1)
        obj = objective_class("dpo")(LocalModels(policy, reference_model=ref), LearnerConfig(), {"beta": 0.1},
                                     name="dpo")
        outs.append(optimizer_step(PlainEngine(policy, grad_accum=2), micro_batches(b, 1 if b is plain else 2), obj))
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert outs[0][key] == pytest.approx(outs[1][key], rel=1e-5), key
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_given_reference_model_is_checked_and_refused_when_unused(tmp_path, tiny_policy, tiny_policy_seed1):
    """online_dpo.reference_model_path: refused for a reference-free loss and for other algorithms;
    at check time a path that is no model, or a model with another tokenizer, is refused by name."""
    import shutil

    from transformers import AutoTokenizer

    from fleetrl.run.check import CheckError, check_run

    with pytest.raises(ConfigError, match="online_dpo.reference_model_path is set, but online_dpo.loss=simpo uses "
                                          "no reference model"):
        load_config(EXAMPLE, ["online_dpo.loss=simpo", "online_dpo.reference_model_path=tiny"])
    with pytest.raises(ConfigError, match="online_dpo.reference_model_path is for online_dpo; grpo does not read it"):
        load_config("examples/grpo_tiny.yaml", ["online_dpo.reference_model_path=tiny"])

    base = [f"model.path={tiny_policy}", f"run.output_dir={tmp_path / 'runs'}"]
    report = check_run(load_config(EXAMPLE, base + [f"online_dpo.reference_model_path={tiny_policy_seed1}"]),
                       EXAMPLE, cluster=False)
    assert any(n.startswith("online_dpo.reference_model_path: ") and "same tokenizer as the policy" in n
               for n in report.notes), report.notes
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckError, match=r"online_dpo.reference_model_path: online_dpo.reference_model_path="
                                         r"'.*no-such-model': no such directory"):
        check_run(load_config(EXAMPLE, base + [f"online_dpo.reference_model_path={missing}"]), EXAMPLE,
                  cluster=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckError, match=r"reference_model_path='.*empty' is not a model directory"):
        check_run(load_config(EXAMPLE, base + [f"online_dpo.reference_model_path={tmp_path / 'empty'}"]), EXAMPLE,
                  cluster=False)
    other = tmp_path / "other"
    shutil.copytree(tiny_policy, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<not-the-policys>"])
    tok.save_pretrained(other)
    with pytest.raises(CheckError, match=r"online_dpo.reference_model_path=.*other has a different tokenizer from "
                                         r"the policy's .*its vocabulary differs"):
        check_run(load_config(EXAMPLE, base + [f"online_dpo.reference_model_path={other}"]), EXAMPLE, cluster=False)


def test_the_learner_scores_pairs_with_the_given_reference_model(tiny_policy, tiny_policy_seed1):
    """Engine(reference_path=...) loads that model as the frozen reference: the reference log-probs are the
    given model's (a plain forward of it), not the policy's; without it the reference is the policy's copy."""
    import subprocess
    import sys

    script = f"""
import torch
from transformers import AutoModelForCausalLM
from fleetrl.algos.logprobs import token_logprobs
from fleetrl.learner.deepspeed_utils import free_port
from fleetrl.learner.offline_config import DPOConfig
from fleetrl.learner.rank import Learner
cfg = {{"num_ranks": 1, "num_cpus_per_rank": 1, "zero_stage": 2, "micro_batch_size": 2}}
learner = Learner(cfg, {str(tiny_policy)!r}, 0, 1, "127.0.0.1", free_port(), None, 2, objective="dpo",
                  objective_cfg=DPOConfig(), reference_path={str(tiny_policy_seed1)!r})
assert learner.info()["reference"] == {str(tiny_policy_seed1)!r}, learner.info()
ids = torch.tensor([[5, 9, 17, 30, 41, 8], [7, 7, 12, 3, 0, 0]])
batch = {{"input_ids": ids, "attention_mask": (torch.arange(6) < torch.tensor([[6], [4]])).long()}}
ref = learner.compute_logprobs(batch, "reference")
pol = learner.compute_logprobs(batch, "policy")
given = AutoModelForCausalLM.from_pretrained({str(tiny_policy_seed1)!r}, torch_dtype=torch.float32).eval()
with torch.no_grad():
    want = token_logprobs(given(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids)
mask = batch["attention_mask"].bool()
mask[:, 0] = False  # the first token has no context: 0 in both
assert torch.allclose(ref[mask], want[mask], atol=1e-4), (ref, want)
assert not torch.allclose(pol[mask], want[mask], atol=1e-2), "the policy is not the given reference"
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
