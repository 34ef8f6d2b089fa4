"""The fleetrl command line: help, config show, make-tiny-model, clear refusals."""

import subprocess
import sys
from pathlib import Path

import pytest

from fleetrl.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "grpo_tiny.yaml"


def test_every_subcommand_has_help(capsys):
    for argv in (["--help"], ["train", "--help"], ["config", "show", "--help"],
                 ["make-tiny-model", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: fleetrl" in out
    assert {"train", "config", "make-tiny-model"} <= set(build_parser()._subparsers._group_actions[0].choices)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "fleetrl.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "train" in out and "make-tiny-model" in out


def test_config_show_prints_resolved_config(capsys):
    assert main(["config", "show", str(EXAMPLE), "learner.lr=1e-5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 1.0e-05" in out and "algorithm: grpo" in out
    assert "zero_stage:" in out  # defaults are printed too


def test_config_error_is_one_clear_line_and_exit_2(capsys):
    assert main(["config", "show", str(EXAMPLE), "learner.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'learner.nope'" in err and "Traceback" not in err


def test_unknown_algorithm_lists_the_allowed_ones(capsys, tmp_path):
    cfg = tmp_path / "a2c.yaml"
    cfg.write_text(f"algorithm: a2c\ndata:\n  path: {ROOT / 'examples/data/letters_train.jsonl'}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "'algorithm'" in err and "a2c" in err and "Traceback" not in err
    for name in ("grpo", "ppo", "reinforce_pp_baseline", "dpo", "sft"):
        assert f"'{name}'" in err, (name, err)


def test_make_tiny_model(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    assert "causal LM" in capsys.readouterr().out
