"""Unpaired feedback for KTO and offline PPO: preference rows -> both answers or one per prompt
(one-y-per-x, seeded, counted), scored rows -> desirable / undesirable by a threshold with optional
distance weights, and how the driver reports and ships them to the learner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fleetrl.data.offline import (
    Encoder,
    EncodeStats,
    Labeled,
    collate_labeled,
    one_y_per_x_choices,
    score_is_desirable,
    score_weights,
)
from fleetrl.data.rows import DataError, PreferenceRow, SFTRow, UnpairedRow
from fleetrl.learner.offline_config import KTOConfig
from fleetrl.offline.loop import OfflineRun
from fleetrl.run.config import ConfigError, config_from_dict
from fleetrl.run.runtime import RunDir
from fleetrl.testing.tasks import preference_task, write_jsonl
from tests.unit.test_offline_run import CharTokenizer, FakeLearner


def pref_rows(n: int) -> list[PreferenceRow]:
    return [PreferenceRow(prompt=f"p{i}:", chosen=f" good{i}", rejected=f" bad{i}", extra={},
                          source=f"f:{i + 1}")
            for i in range(n)]


def decode(seq) -> str:
    return "".join(chr(t) for t in seq.completion)


def encoder(algo: str = "kto", seed: int = 0, **feedback) -> Encoder:
    return Encoder(algo, CharTokenizer(), 64, feedback=KTOConfig(**feedback), seed=seed)


def test_one_y_per_x_choices_are_seeded_fair_coins():
    a, b = one_y_per_x_choices(400, seed=3), one_y_per_x_choices(400, seed=3)
    assert a == b and a != one_y_per_x_choices(400, seed=4)
    assert 160 < sum(a) < 240  # about half keep the chosen answer
    assert one_y_per_x_choices(10, seed=3) == a[:10]  # a prefix of the data gets a prefix of the picks


@pytest.mark.parametrize("algo", ["kto", "offline_ppo"])
def test_preference_rows_give_both_answers_by_default_or_one_per_prompt(algo):
    rows = pref_rows(50)
    both, stats = encoder(algo).encode(rows)
    assert len(both) == 100 and (stats.desirable, stats.undesirable) == (50, 50)
    assert stats.one_y_per_x_dropped is None
    assert "data/train/one_y_per_x_dropped" not in stats.as_metrics("data/train")

    one, stats = encoder(algo, seed=7, one_y_per_x=True).encode(rows)
    picks = one_y_per_x_choices(50, seed=7)
    assert len(one) == 50 and stats.examples == 50 and stats.one_y_per_x_dropped == 50
    assert (stats.desirable, stats.undesirable) == (sum(picks), 50 - sum(picks))
    for i, (ex, keep_chosen) in enumerate(zip(one, picks)):  # one example per row, in row order
        assert ex.desirable == keep_chosen
        assert decode(ex.seq) == (f" good{i}#" if keep_chosen else f" bad{i}#")  # "#": the eos
    assert stats.as_metrics("data/train")["data/train/desirable"] == sum(picks)
    # Same seed, same picks; another seed, other picks.
    assert encoder(algo, seed=7, one_y_per_x=True).encode(rows)[0] == one
    assert encoder(algo, seed=8, one_y_per_x=True).encode(rows)[0] != one


def test_one_y_per_x_leaves_labelled_rows_alone():
    rows = [UnpairedRow(prompt="p:", completion=" x", label=bool(i % 2), extra={}, source=f"f:{i}")
            for i in range(6)]
    out, stats = encoder(one_y_per_x=True).encode(rows)
    assert [e.desirable for e in out] == [False, True] * 3 and stats.one_y_per_x_dropped == 0


def scored(scores, key="score") -> list[SFTRow]:
    return [SFTRow(prompt=f"p{i}:", completion=f" y{i}", extra={key: s}, source=f"f:{i + 1}")
            for i, s in enumerate(scores)]


def test_scores_become_labels_at_the_threshold_and_weights_by_distance():
    assert score_is_desirable(3.0, 3.0) and score_is_desirable(4, 3.0) and not score_is_desirable(2.99, 3.0)
    # |score - 3| = 2, 1, 1, 2 -> mean 1.5 -> weights 4/3, 2/3, 2/3, 4/3 (they average 1).
    assert score_weights([1, 2, 4, 5], 3.0, "distance") == pytest.approx([4 / 3, 2 / 3, 2 / 3, 4 / 3])
    assert score_weights([1, 2, 4, 5], 3.0, "none") == [1.0] * 4
    with pytest.raises(DataError, match="every score equals the threshold"):
        score_weights([3, 3], 3.0, "distance")

    out, stats = encoder(score_key="score", score_threshold=3.0).encode(scored([1, 2, 3, 5.5, "4"]))
    assert [e.desirable for e in out] == [False, False, True, True, True]  # numbers as strings are read too
    assert [e.score for e in out] == [1.0, 2.0, 3.0, 5.5, 4.0] and all(e.weight == 1.0 for e in out)
    assert (stats.desirable, stats.undesirable) == (3, 2)

    out, _ = encoder(score_key="rating", score_threshold=3.0, score_weighting="distance").encode(
        scored([1, 2, 3, 5], key="rating"))
    assert [e.weight for e in out] == pytest.approx([2 / 1.25, 1 / 1.25, 0.0, 2 / 1.25])
    # An unpaired row's own boolean label is ignored once a score column is named.
    row = UnpairedRow(prompt="p:", completion=" y", label=True, extra={"score": 0.1}, source="f:1")
    assert encoder(score_key="score", score_threshold=0.5).encode([row])[0][0].desirable is False


def test_weights_reach_the_batch_only_when_some_differ_from_one():
    seq = Encoder("kto", CharTokenizer(), 64).seq("p:", " y", EncodeStats())
    plain = collate_labeled([Labeled(seq, True), Labeled(seq, False)], 0)
    assert "weight" not in plain
    weighted = collate_labeled([Labeled(seq, True, 1.5), Labeled(seq, False, 0.5)], 0)
    torch.testing.assert_close(weighted["weight"], torch.tensor([1.5, 0.5]))


def test_scored_rows_name_the_row_and_key_when_the_score_is_bad():
    with pytest.raises(DataError, match=r"f:2: kto.score_key is 'score' but the row's 'score' is None"):
        encoder(score_key="score", score_threshold=1.0).encode(scored([1.0, None]))
    with pytest.raises(DataError, match="f:1: .*'score' is 'high'"):
        encoder(score_key="score", score_threshold=1.0).encode(scored(["high"]))
    with pytest.raises(DataError, match="scored rows .* but this row is a preference row"):
        encoder(score_key="score", score_threshold=1.0).encode(pref_rows(1))
    with pytest.raises(ValueError, match="score_threshold is unset"):
        KTOConfig(score_key="score")
    with pytest.raises(ValueError, match="need kto.score_key"):
        KTOConfig(score_weighting="distance")
    with pytest.raises(ConfigError, match="offline_ppo.score_threshold is unset"):
        config_from_dict({"algorithm": "offline_ppo", "data": {"path": "x.jsonl"},
                          "offline_ppo": {"score_key": "stars"}})


def run_dir_cfg(tmp_path, algo: str, section: dict, data: str, steps: int = 2, **extra):
    return config_from_dict({
        "algorithm": algo,
        "run": {"output_dir": str(tmp_path / "runs"), "name": algo, "steps": steps, "seed": 5},
        "data": {"path": data, **extra}, "offline": {"batch_size": 8, "max_length": 64},
        "learner": {"micro_batch_size": 4, "lr": 1e-3}, algo: section,
    })


def test_driver_reads_scored_rows_reports_them_and_sends_weights(tmp_path, capsys):
    # A numeric "label"-free file: prompt, completion, score (1-5 stars), as users export ratings.
    rows = [{"prompt": f"Rate {i}:", "completion": " " + "ab"[i % 2] * (i % 5 + 1), "stars": 1 + i % 5}
            for i in range(24)]
    write_jsonl(rows, tmp_path / "scored.jsonl")
    kto = {"score_key": "stars", "score_threshold": 3.5, "score_weighting": "distance"}
    cfg = run_dir_cfg(tmp_path, "kto", kto, str(tmp_path / "scored.jsonl"), eval_fraction=0.25)
    run = OfflineRun(cfg, RunDir(cfg), CharTokenizer())
    n_good = sum(e.desirable for e in run.train)
    assert all(e.desirable == (e.score >= 3.5) for e in run.train + run.eval)
    assert sum(e.weight for e in run.train) / len(run.train) == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert f"{n_good} desirable, {len(run.train) - n_good} undesirable" in out and "'stars' >= 3.5" in out
    fake = FakeLearner("kto")
    run.run(fake)
    assert all("weight" in b for b in fake.batches)
    first = json.loads(run.run_dir.metrics_path.read_text().splitlines()[0])
    assert first["data/train/desirable"] == n_good and "eval/accuracy" in first


def test_driver_one_y_per_x_is_seeded_by_run_seed_and_logged(tmp_path, capsys):
    write_jsonl(preference_task(40, seed=1), tmp_path / "pairs.jsonl")
    cfg = run_dir_cfg(tmp_path, "kto", {"one_y_per_x": True}, str(tmp_path / "pairs.jsonl"))
    run = OfflineRun(cfg, RunDir(cfg), CharTokenizer())
    picks = one_y_per_x_choices(40, seed=5)
    assert [e.desirable for e in run.train] == picks
    assert "one_y_per_x kept one completion of each of 40 preference rows (seed 5)" in capsys.readouterr().out
    run.run(FakeLearner("kto"))
    first = json.loads(run.run_dir.metrics_path.read_text().splitlines()[0])
    assert first["data/train/one_y_per_x_dropped"] == 40 and first["data/train/examples"] == 40
    assert first["data/train/desirable"] == sum(picks)


def test_scored_example_data_is_what_its_generator_writes_and_the_examples_load(tmp_path):
    from examples.make_scored_data import FILES, main
    from fleetrl.run.config import load_config

    root = Path(__file__).resolve().parents[2] / "examples"
    main(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (root / "data" / name).read_bytes(), name
    rows = [json.loads(line) for line in (root / "data" / "scored_train.jsonl").read_text().splitlines()]
    assert {r["stars"] for r in rows} == {1, 2, 3, 4, 5} and "label" not in rows[0]
    scored_cfg = load_config(root / "kto_scored_tiny.yaml")
    assert scored_cfg.kto.score_key == "stars" and Path(scored_cfg.data.eval_path).is_file()
    ppo_cfg = load_config(root / "offline_ppo_tiny.yaml")
    assert ppo_cfg.algorithm == "offline_ppo" and Path(ppo_cfg.data.path).is_file()
    assert Path(ppo_cfg.eval_data.path).is_file()
