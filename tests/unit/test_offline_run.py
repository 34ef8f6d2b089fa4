"""The offline driver (`OfflineRun`) against a fake learner: reference precompute and its alignment
with the training batches, KTO weight rule wiring, evaluation cadence, metrics, checkpoints, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fleetrl.core.storage import Storage, commit_rank_files, scratch_dir
from fleetrl.data.rows import DataError
from fleetrl.learner.offline import kto_mismatched_rows
from fleetrl.offline.loop import OfflineRun
from fleetrl.run.config import config_from_dict
from fleetrl.run.runtime import RunDir
from fleetrl.testing.tasks import preference_task, sft_task, unpaired_task, write_jsonl


class CharTokenizer:
    eos_token = "#"
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def fake_logps(rows: dict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A deterministic stand-in for a model: the log-prob is a function of the completion tokens."""
    m = (rows["loss_mask"] * rows["attention_mask"]).float()
    return {"logps": -scale * (rows["input_ids"].float() * m).sum(-1) / 1000, "tokens": m.sum(-1)}


class FakeLearner:
    """Same methods as OfflineLearnerGroup; the policy drifts from the reference as it trains."""

    def __init__(self, algorithm: str):
        self.algorithm = algorithm
        self.steps = 0
        self.released = False
        self.batches: list[dict] = []
        self.log: list[str] = []
        self.num_ranks = 1

    def sequence_logps(self, rows, which):
        self.log.append(f"logps:{which}")
        if which == "reference":
            assert not self.released, "the reference was used after release_reference"
            return fake_logps(rows)
        # Completions that are runs of one letter gain, the others lose.
        out = fake_logps(rows)
        ids = rows["input_ids"] * rows["loss_mask"]
        runs = torch.tensor([len(set(r[r > 0].tolist()) - {ord(" "), ord("#")}) == 1 for r in ids])
        out["logps"] = out["logps"] + self.steps * torch.where(runs, 0.1, -0.1)
        return out

    def sequence_scores(self, rows):
        return fake_logps({**rows, "loss_mask": rows["attention_mask"]})["logps"]

    def kl_reference_logps(self, batch):
        self.log.append("kl_reference")
        rows = kto_mismatched_rows(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        return fake_logps(rows)["logps"]

    def train_step(self, batch):
        self.log.append("train")
        self.batches.append(batch)
        self.steps += 1
        key = "chosen_attention_mask" if "chosen_attention_mask" in batch else "attention_mask"
        return {"loss": 1.0 / self.steps, "grad_norm": 0.5, "lr": 1e-3, "num_tokens": float(batch[key].sum())}

    def release_reference(self):
        self.log.append("release")
        self.released = True

    def save_checkpoint(self, path, state, storage_options=None):
        # One rank's part of the durable protocol: write locally, then commit files + manifest.
        scratch = scratch_dir(Storage(), path, 0)
        (Path(scratch) / "state.json").write_text(json.dumps({**state, "fake_steps": self.steps}))
        commit_rank_files(Storage(), scratch, path, 0)

    def load_checkpoint(self, path, storage_options=None):
        state = json.loads((Path(path) / "state.json").read_text())
        self.steps = state["fake_steps"]
        return state

    def save_hf(self, path, storage_options=None):
        scratch = scratch_dir(Storage(), path, 0)
        (Path(scratch) / "config.json").write_text("{}")
        commit_rank_files(Storage(), scratch, path, 0)


def make_run(tmp_path, algorithm, data_rows, eval_rows=None, **sections):
    write_jsonl(data_rows, tmp_path / "train.jsonl")
    data = {"path": str(tmp_path / "train.jsonl")}
    if eval_rows is not None:
        write_jsonl(eval_rows, tmp_path / "eval.jsonl")
        data["eval_path"] = str(tmp_path / "eval.jsonl")
    tree = {"algorithm": algorithm, "data": data, "run": {"output_dir": str(tmp_path / "runs"), "name": "r"},
            "learner": {"micro_batch_size": 2}, "offline": {"batch_size": 4, "max_length": 64}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    cfg = config_from_dict(tree)
    return OfflineRun(cfg, RunDir(cfg), CharTokenizer())


def metrics(run: OfflineRun) -> list[dict]:
    return [json.loads(line) for line in run.run_dir.metrics_path.read_text().splitlines()]


def test_dpo_precompute_scores_everything_once_then_trains_on_aligned_reference(tmp_path):
    run = make_run(tmp_path, "dpo", preference_task(12), preference_task(4, seed=1),
                   offline={"epochs": 2, "eval_every": 3})
    learner = FakeLearner("dpo")
    out = run.run(learner)
    assert run.schedule.total_steps == 6
    # All reference scoring happens before the first optimizer step, then the reference is freed.
    first_train = learner.log.index("train")
    assert learner.log.index("release") < first_train
    assert "logps:reference" not in learner.log[first_train:]
    for batch in learner.batches:
        for side in ("chosen", "rejected"):
            rows = {k: batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask")}
            torch.testing.assert_close(batch[f"ref_{side}_logps"], fake_logps(rows)["logps"])
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(7))
    assert rows[0]["eval/accuracy"] == 0.0 and rows[0]["data/train/examples"] == 12
    evals = [r["step"] for r in rows if "eval/accuracy" in r]
    assert evals == [0, 3, 6]
    last = rows[-1]
    assert last["eval/rewards/chosen"] != 0.0  # the policy moved away from the reference
    assert last["eval/rewards/margins"] == pytest.approx(
        last["eval/rewards/chosen"] - last["eval/rewards/rejected"])
    assert rows[1]["train/loss"] == 1.0 and rows[1]["tokens_per_s"] > 0 and rows[2]["epoch"] == 0
    assert rows[4]["epoch"] == 1
    assert (out / "final_model" / "config.json").is_file()
    assert (out / "checkpoints" / "step-000006" / "COMPLETE").is_file()


def test_on_the_fly_keeps_the_reference_and_sends_no_reference_values(tmp_path):
    run = make_run(tmp_path, "ipo", preference_task(8), preference_task(4, seed=1),
                   offline={"reference_logps": "on_the_fly"})
    learner = FakeLearner("ipo")
    run.run(learner)
    assert "release" not in learner.log
    assert learner.log.count("logps:reference") == 1  # the eval pairs' reference, once
    assert all(not any(k.startswith("ref_") for k in b) for b in learner.batches)


def test_kto_weights_follow_the_rule_are_logged_and_reach_the_learner(tmp_path, capsys):
    task = unpaired_task(16)
    rows = [r for r in task if r["label"]][:6] + [r for r in task if not r["label"]][:2]
    run = make_run(tmp_path, "kto", rows)
    assert run.weights == (1.0, 2.0)  # 6 desirable : 2 undesirable -> ratio 1.5 after lambda_U = 2
    out = capsys.readouterr().out
    assert "lambda_D=1 lambda_U=2" in out and "6 desirable, 2 undesirable" in out
    kw = run.learner_kwargs()
    assert kw["algo_cfg"]["desirable_weight"] == 1.0 and kw["algo_cfg"]["undesirable_weight"] == 2.0
    learner = FakeLearner("kto")
    run.run(learner)
    assert all(r["kto/undesirable_weight"] == 2.0 for r in metrics(run))
    # Precomputed KL reference values belong to the exact batch they are sent with.
    for batch in learner.batches:
        kl = kto_mismatched_rows(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        torch.testing.assert_close(batch["ref_kl_logps"], fake_logps(kl)["logps"])
        torch.testing.assert_close(batch["ref_logps"], fake_logps(batch)["logps"])


def test_kto_weights_from_the_config_win_and_preference_rows_are_split(tmp_path, capsys):
    run = make_run(tmp_path, "kto", preference_task(4),
                   kto={"desirable_weight": 3.0, "undesirable_weight": 0.5})
    assert run.weights == (3.0, 0.5) and len(run.train) == 8
    assert "from the config" in capsys.readouterr().out


def test_kto_unpaired_eval_reports_cross_pair_accuracy(tmp_path):
    run = make_run(tmp_path, "kto", unpaired_task(8), unpaired_task(6, seed=1), offline={"epochs": 3})
    run.run(FakeLearner("kto"))
    first, last = metrics(run)[0], metrics(run)[-1]
    assert first["eval/accuracy"] == 0.0  # policy == reference: no example outscores another
    assert 0.0 < last["eval/accuracy"] <= 1.0
    assert last["eval/rewards/margins"] == pytest.approx(
        last["eval/rewards/chosen"] - last["eval/rewards/rejected"])


def test_sft_packing_trains_on_packed_rows_and_eval_nll_is_per_token(tmp_path):
    run = make_run(tmp_path, "sft", sft_task(16), sft_task(4, seed=1), sft={"packing": True},
                   offline={"batch_size": 2, "max_length": 200})
    assert len(run.units) < len(run.train)  # several sequences per packed row
    learner = FakeLearner("sft")
    run.run(learner)
    assert "position_ids" in learner.batches[0]
    first = metrics(run)[0]
    lp = fake_logps(run._chunks(run.eval).__next__())
    assert first["eval/nll"] == pytest.approx(float(-lp["logps"].sum() / lp["tokens"].sum()))


def test_rm_eval_uses_scores(tmp_path):
    run = make_run(tmp_path, "rm", preference_task(8), preference_task(4, seed=1))
    assert run.cfg.model.path == "tiny-reward"
    run.run(FakeLearner("rm"))
    assert "eval/scores/accuracies" in metrics(run)[0]


def test_resume_continues_from_the_last_complete_checkpoint(tmp_path):
    run = make_run(tmp_path, "dpo", preference_task(16), run={"save_every": 2})
    run.run(FakeLearner("dpo"))
    ckpts = run.run_dir.path / "checkpoints"
    (ckpts / "step-000004" / "COMPLETE").unlink()  # as if the run died while writing step 4
    shutil.rmtree(run.run_dir.path / "final_model")
    tree = run.cfg.model_dump(mode="json")
    tree["run"]["resume"] = True
    cfg = config_from_dict(tree)
    again = OfflineRun(cfg, RunDir(cfg), CharTokenizer())
    learner = FakeLearner("dpo")
    again.run(learner)
    assert learner.log.count("train") == 2  # steps 3 and 4 only
    assert [r["step"] for r in metrics(again)] == [0, 1, 2, 3, 4]


def test_data_problems_are_data_errors(tmp_path):
    for sub in "abc":
        (tmp_path / sub).mkdir()
    with pytest.raises(DataError, match="dpo trains on preference rows"):
        make_run(tmp_path / "a", "dpo", sft_task(8))
    with pytest.raises(DataError, match=r"eval.jsonl:1: field 'chosen' is missing"):
        make_run(tmp_path / "b", "dpo", preference_task(8), sft_task(4))
    with pytest.raises(DataError, match="no training example is left"):
        make_run(tmp_path / "c", "sft", sft_task(4), offline={"max_length": 4})
