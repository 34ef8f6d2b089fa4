"""Offline trainers end to end on CPU: real DeepSpeed, the tiny models, the synthetic letters data.

Each trainer runs its example config (examples/<algo>_tiny.yaml, shortened where it helps) and must
raise its held-out preference accuracy above chance (SFT: lower the held-out NLL). Most runs drive
one in-process rank (the same `Learner` a Ray actor wraps); KTO runs the real `fleetrl train`
path on Ray with 2 ZeRO-3 ranks. The runs chain like a user's: SFT's final model starts RM and DPO.
The first optimizer step's gradient norm is checked against plain transformers + the pure losses,
which pins the batch building, packing, reference log-probs and micro-batch weighting.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fleetrl.algos.logprobs import token_logprobs
from fleetrl.algos.preference import dpo_loss
from fleetrl.data.offline import collate_rows
from fleetrl.learner.deepspeed_utils import free_port
from fleetrl.learner.offline import OfflineLearner
from fleetrl.offline.loop import OfflineRun
from fleetrl.run.config import load_config
from fleetrl.run.runtime import RunDir, load_tokenizer, resolve_model

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(algo: str, out: Path, *overrides: str):
    """Train examples/<algo>_tiny.yaml on one in-process rank; returns (run, metrics rows)."""
    t0 = time.perf_counter()
    cfg = load_config(EXAMPLES / f"{algo}_tiny.yaml",
                      [f"run.output_dir={out}", f"run.name={algo}", *overrides])
    model_path = resolve_model(cfg.model.path)
    run = OfflineRun(cfg, RunDir(cfg), load_tokenizer(model_path))
    learner = OfflineLearner(cfg.learner, model_path, master_port=free_port(),
                             total_steps=run.schedule.total_steps, mini_batch_size=cfg.offline.batch_size,
                             **run.learner_kwargs())
    try:
        run.run(learner)
    finally:
        del learner
        gc.collect()
    rows = [json.loads(line) for line in run.run_dir.metrics_path.read_text().splitlines()]
    print(f"{algo}: {len(rows) - 1} steps in {time.perf_counter() - t0:.1f}s; "
          f"held-out {[r.get('eval/accuracy', r.get('eval/nll')) for r in rows if 'time/eval' in r]}")
    return run, rows


def grad_norm(model: torch.nn.Module) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))


def seq_logps(model, rows) -> torch.Tensor:
    """Summed completion log-probs, in plain transformers (right padding: default positions)."""
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    lp = token_logprobs(logits, rows["input_ids"])
    return (lp * rows["loss_mask"] * rows["attention_mask"]).sum(-1)


def assert_hf_dir(path: Path) -> None:
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("offline")


@pytest.fixture(scope="module")
def sft(out):
    """SFT with packing; its final model starts the RM and DPO runs (SFT -> RM, SFT -> DPO)."""
    return run_example("sft", out, "sft.packing=true", "offline.batch_size=4", "learner.micro_batch_size=2",
                       "offline.epochs=3", "offline.eval_every=0")


def test_sft_lowers_held_out_nll_and_packs_without_cross_talk(sft):
    run, rows = sft
    first, last = rows[0]["eval/nll"], rows[-1]["eval/nll"]
    assert last < 0.7 * first, (first, last)
    assert_hf_dir(run.run_dir.path / "final_model")
    # Step 1's gradient = that of the token-mean NLL over the same sequences UNPACKED, in plain
    # transformers: packed attention stays inside each sequence and micro-batches weigh tokens exactly.
    model = AutoModelForCausalLM.from_pretrained(resolve_model(run.cfg.model.path), dtype=torch.float32)
    seqs = [s for i in run.schedule.batch(0) for s in run.units[i]]
    assert len(seqs) > len(run.schedule.batch(0))  # several sequences per packed row
    rows_hf = collate_rows(seqs, run.pad_id)
    n_tokens = (rows_hf["loss_mask"] * rows_hf["attention_mask"]).sum()
    (-seq_logps(model, rows_hf).sum() / n_tokens).backward()
    assert rows[1]["train/grad_norm"] == pytest.approx(grad_norm(model), rel=1e-4)
    assert rows[1]["train/loss"] > rows[-1]["train/loss"]


def test_dpo_from_the_sft_model_beats_chance_and_its_first_step_is_exact(sft, out):
    sft_model = sft[0].run_dir.path / "final_model"
    run, rows = run_example("dpo", out, f"model.path={sft_model}")
    assert rows[0]["eval/accuracy"] == 0.0  # policy == reference: no implicit reward yet
    assert rows[-1]["eval/accuracy"] > 0.6 and rows[-1]["eval/rewards/margins"] > 0
    assert {"train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
            "train/rewards/accuracies", "train/logps/chosen", "train/logps/rejected", "train/grad_norm",
            "train/lr", "tokens_per_s"} <= set(rows[1])
    assert_hf_dir(run.run_dir.path / "final_model")
    # Step 1 by hand: the reference is the SFT model itself, so its log-probs are the detached policy's.
    model = AutoModelForCausalLM.from_pretrained(sft_model, dtype=torch.float32)
    batch = run.batch(0)
    side = {s: {k: batch[f"{s}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask")}
            for s in ("chosen", "rejected")}
    pc, pr = seq_logps(model, side["chosen"]), seq_logps(model, side["rejected"])
    torch.testing.assert_close(batch["ref_chosen_logps"], pc.detach(), atol=2e-4, rtol=1e-5)
    losses, _, _ = dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=run.cfg.dpo.beta)
    losses.mean().backward()
    assert rows[1]["train/grad_norm"] == pytest.approx(grad_norm(model), rel=1e-4)


def test_simpo_from_the_sft_model_beats_chance_without_a_reference_and_its_first_step_is_exact(sft, out):
    """SimPO through the registry: algos/simpo.py's loss, trained by the generic pair objective."""
    from fleetrl.algos.simpo import simpo_loss

    sft_model = sft[0].run_dir.path / "final_model"
    run, rows = run_example("simpo", out, f"model.path={sft_model}")
    assert rows[-1]["eval/accuracy"] > 0.6 and rows[-1]["eval/rewards/margins"] > 0, rows[-1]
    assert rows[-1]["train/loss"] < rows[1]["train/loss"]
    assert "time/reference" in rows[0] and rows[0]["time/reference"] == 0.0  # no reference model at all
    batch = run.batch(0)
    assert "ref_chosen_logps" not in batch
    # Step 1 by hand: mean SimPO loss of the batch's pairs in plain transformers.
    model = AutoModelForCausalLM.from_pretrained(sft_model, dtype=torch.float32)
    side = {s: {k: batch[f"{s}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask")}
            for s in ("chosen", "rejected")}
    n = {s: (side[s]["loss_mask"] * side[s]["attention_mask"]).sum(-1).float() for s in side}
    sc = run.cfg.simpo
    losses, _ = simpo_loss(seq_logps(model, side["chosen"]), seq_logps(model, side["rejected"]), n["chosen"],
                           n["rejected"], beta=sc.beta, gamma_beta_ratio=sc.gamma_beta_ratio)
    losses.mean().backward()
    assert rows[1]["train/grad_norm"] == pytest.approx(grad_norm(model), rel=1e-4)


def test_reward_model_from_the_sft_model_scores_held_out_pairs(sft, out):
    from fleetrl.reward.model_scorer import RewardModelScorer

    sft_model = sft[0].run_dir.path / "final_model"
    run, rows = run_example("rm", out, f"model.path={sft_model}", "offline.epochs=2")
    assert rows[-1]["eval/accuracy"] > 0.6, rows[-1]
    final = run.run_dir.path / "final_model"
    assert_hf_dir(final)
    assert AutoModelForSequenceClassification.from_pretrained(final).config.num_labels == 1
    # The reward service loads it and ranks held-out pairs like the trainer's own evaluation did.
    scorer = RewardModelScorer(str(final), device="cpu")
    eval_file = EXAMPLES / "data/preference_eval.jsonl"
    held_out = [json.loads(line) for line in eval_file.read_text().splitlines()]
    tok = load_tokenizer(str(final))
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                       add_generation_prompt=True) for r in held_out]
    chosen = torch.tensor(scorer(prompts, [r["chosen"] for r in held_out]))
    rejected = torch.tensor(scorer(prompts, [r["rejected"] for r in held_out]))
    assert (chosen > rejected).float().mean().item() == pytest.approx(rows[-1]["eval/accuracy"], abs=0.02)


def test_ipo_on_the_fly_reference_zero0_beats_chance(out):
    _, rows = run_example("ipo", out, "offline.reference_logps=on_the_fly", "learner.zero_stage=0")
    assert rows[-1]["eval/accuracy"] > 0.6, rows[-1]
    assert rows[-1]["train/loss"] < rows[1]["train/loss"]


def test_orpo_zero3_beats_chance_and_lowers_the_chosen_nll(out):
    _, rows = run_example("orpo", out, "learner.zero_stage=3")
    assert rows[-1]["eval/accuracy"] > 0.6, rows[-1]
    assert rows[-1]["eval/orpo/nll"] < rows[0]["eval/orpo/nll"]
    assert {"train/orpo/log_odds_ratio", "train/orpo/or_loss", "train/orpo/nll"} <= set(rows[1])


def test_kto_two_ranks_on_ray_through_fleetrl_train(ray_local, out, capsys):
    """The CLI path: config -> train() -> OfflineLearnerGroup (2 ZeRO-3 ranks) -> run dir."""
    from fleetrl.train import train

    cfg = load_config(EXAMPLES / "kto_tiny.yaml", [
        f"run.output_dir={out}", "run.name=kto-ray", "run.steps=20", "offline.eval_every=10",
        "learner.num_ranks=2", "learner.zero_stage=3", "learner.micro_batch_size=4",
    ])
    t0 = time.perf_counter()
    path = train(cfg, config_path=EXAMPLES / "kto_tiny.yaml")
    print(f"kto on 2 Ray ranks: {time.perf_counter() - t0:.1f}s")
    printed = capsys.readouterr().out
    assert "kto weights lambda_D=1 lambda_U=1" in printed and "256 desirable, 256 undesirable" in printed
    # Progress: start-up with its seconds, the reference precompute, each evaluation.
    assert "fleetrl: learner ready in " in printed
    assert "fleetrl: precomputing reference log-probs of the training data: 512/512 sequences (" in printed
    assert "fleetrl: precomputing KTO's reference KL terms: 20/20 steps (" in printed
    assert "fleetrl: eval at step 0: " in printed and "fleetrl: eval at step 20: " in printed
    assert "held-out examples (" in printed
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(21))
    assert rows[-1]["eval/accuracy"] > 0.6, rows[-1]
    assert all(r["kto/desirable_weight"] == 1.0 for r in rows)
    kl = [r["train/kl"] for r in rows[1:]]
    assert all(k >= 0.0 for k in kl)  # z0 is clamped at 0
    assert_hf_dir(path / "final_model")
    assert (path / "checkpoints" / "step-000020" / "COMPLETE").is_file()
    assert AutoModelForCausalLM.from_pretrained(path / "final_model") is not None


def test_offline_ppo_beats_chance_and_its_first_step_is_the_clipped_objective(out):
    """Offline PPO on the KTO example's data: +1/-1 rewards, the reference as the old policy."""
    from fleetrl.algos.preference import offline_binary_ppo_loss

    run, rows = run_example("offline_ppo", out, "run.steps=24")
    assert rows[-1]["eval/accuracy"] > 0.6 and rows[-1]["eval/rewards/margins"] > 0, rows[-1]
    assert 0.0 < rows[-1]["train/clip_frac"] < 1.0 and rows[1]["train/clip_frac"] == 0.0
    # Step 1 by hand: old log-probs = the starting model's (precomputed), so every ratio is 1 and the
    # gradient is that of -A * ratio averaged over each example's completion tokens, then over examples.
    model = AutoModelForCausalLM.from_pretrained(resolve_model(run.cfg.model.path), dtype=torch.float32)
    batch = run.batch(0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = token_logprobs(logits, batch["input_ids"])
    mask = (batch["loss_mask"] * batch["attention_mask"]).float()
    torch.testing.assert_close(batch["old_logprobs"], (lp * mask).detach(), atol=2e-4, rtol=1e-5)
    rewards = torch.where(batch["desirable"], 1.0, -1.0)
    offline_binary_ppo_loss(lp, lp.detach(), rewards, mask).mean().backward()
    assert rows[1]["train/grad_norm"] == pytest.approx(grad_norm(model), rel=1e-4)
