"""Config loading: YAML + dotted overrides, and error messages that say where and what."""

from pathlib import Path

import pytest
import yaml

from fleetrl.run.config import ConfigError, config_from_dict, dump_config, load_config, parse_override

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


MINIMAL = (
    "algorithm: grpo\ndata:\n  path: prompts.jsonl\n"
    "reward:\n  functions:\n    - {name: l, kind: builtin, builtin: letter_fraction}\n"
)


def test_example_loads_and_data_path_is_relative_to_the_file():
    cfg = load_config(EXAMPLE)
    assert cfg.algorithm == "grpo"
    assert Path(cfg.data.path) == EXAMPLE.parent / "data" / "letters_train.jsonl"
    assert Path(cfg.data.path).is_file()


def test_overrides_are_applied_and_parsed_as_yaml(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL),
                      ["learner.lr=1e-6", "rollout.num_workers=4", "run.name=r", "run.resume=true"])
    assert cfg.learner.lr == pytest.approx(1e-6)
    assert cfg.rollout.num_workers == 4
    assert cfg.run.resume is True


def test_env_vars_take_numbers_and_bools_as_strings(tmp_path):
    # The reported failure: `fleetrl train examples/grpo_tiny.yaml rollout.env_vars.X=1` said
    # "Input should be a valid string (got 1)". Overrides keep numbers as written; bools are "1"/"0".
    cfg = load_config(EXAMPLE, ["rollout.env_vars.VLLM_ENABLE_V1_MULTIPROCESSING=1", "rollout.env_vars.A=1e3",
                                "rollout.env_vars.B=010", "rollout.env_vars.C=0.50", "rollout.env_vars.D=true",
                                "rollout.env_vars.E=off", "rollout.env_vars.F=0-1", "rollout.env_vars.G='7'"])
    expected = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "A": "1e3", "B": "010", "C": "0.50", "D": "1", "E": "0",
                "F": "0-1", "G": "7"}
    assert {k: cfg.rollout.env_vars[k] for k in expected} == expected
    # In a file, YAML has already read the number: it becomes its text.
    cfg = load_config(write(tmp_path, MINIMAL + "rollout:\n  env_vars: {N: 2, R: 0.5, T: true, S: x}\n"))
    assert cfg.rollout.env_vars == {"N": "2", "R": "0.5", "T": "1", "S": "x"}
    # A whole mapping as an override goes through the same conversion; numbers elsewhere stay numbers.
    cfg = load_config(EXAMPLE, ["rollout.env_vars={N: 4, F: false}", "rollout.seed=3"])
    assert cfg.rollout.env_vars == {"N": "4", "F": "0"} and cfg.rollout.seed == 3
    with pytest.raises(ConfigError, match=r"override 'rollout.env_vars.X=\[1\]': 'rollout.env_vars.X': "
                                          r"Input should be a valid string"):
        load_config(EXAMPLE, ["rollout.env_vars.X=[1]"])


def test_unknown_key_in_file_names_file_key_and_allowed_keys(tmp_path):
    p = write(tmp_path, MINIMAL + "learner:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "learner.lrr" in msg and "unknown key" in msg
    assert "lr" in msg.split("Allowed keys here:")[1]


def test_unknown_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL), ["rollout.num_wrkers=2"])
    assert "override 'rollout.num_wrkers=2'" in str(e.value)
    assert "num_workers" in str(e.value)


def test_bad_value_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL), ["learner.zero_stage=7"])
    assert "learner.zero_stage" in str(e.value) and "7" in str(e.value)


def test_unknown_algorithm_lists_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL.replace("grpo", "grpoo")))
    assert "algorithm" in str(e.value) and "'grpo'" in str(e.value) and "'dpo'" in str(e.value)


def test_missing_required_section(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "algorithm: grpo\n"))
    assert "'data' is required" in str(e.value)


@pytest.mark.parametrize("text", ["learner.lr", "=3", "a.b=[1,"])
def test_malformed_override(text):
    with pytest.raises(ConfigError) as e:
        parse_override(text)
    assert repr(text) in str(e.value)


def test_override_into_a_value_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="learner.lr is a value, not a section"):
        load_config(write(tmp_path, MINIMAL), ["learner.lr=0.1", "learner.lr.x=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "algorithm: [grpo\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_batch_shape_rules_explain_themselves():
    base = {"algorithm": "grpo", "data": {"path": "x.jsonl"},
            "reward": {"functions": [{"name": "l", "kind": "builtin", "builtin": "letter_fraction"}]}}
    with pytest.raises(ConfigError, match="add at least one entry to reward.functions"):
        config_from_dict({**base, "reward": {}})
    with pytest.raises(ConfigError, match="must divide the samples per step"):
        config_from_dict({**base, "rl": {"group_size": 4, "prompts_per_step": 3, "mini_batch_size": 5}})
    with pytest.raises(ConfigError, match="multiple of learner.micro_batch_size"):
        config_from_dict({**base, "rl": {"group_size": 4, "prompts_per_step": 2},
                          "learner": {"micro_batch_size": 3}})
    with pytest.raises(ConfigError, match="rloo needs rl.group_size >= 2"):
        config_from_dict({**base, "algorithm": "rloo", "rl": {"group_size": 1},
                          "learner": {"micro_batch_size": 1}})


def test_dump_round_trips(tmp_path):
    cfg = load_config(EXAMPLE, ["run.steps=3"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


# ---------------------------------------------------------------------------------------------
# Offline algorithms (sft, rm, dpo, ipo, kto, orpo)

OFFLINE_EXAMPLES = ("sft", "rm", "dpo", "ipo", "kto", "orpo")


@pytest.mark.parametrize("algo", OFFLINE_EXAMPLES)
def test_offline_examples_load_with_their_data(algo):
    cfg = load_config(EXAMPLE.parent / f"{algo}_tiny.yaml")
    assert cfg.algorithm == algo
    assert Path(cfg.data.path).is_file()
    held_out = cfg.eval_data.path if cfg.eval_data is not None else cfg.data.eval_path
    assert Path(held_out).is_file()
    assert cfg.run.steps is None  # offline.epochs decides
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_run_steps_defaults_to_100_for_online_only(tmp_path):
    assert load_config(write(tmp_path, MINIMAL)).run.steps == 100
    assert config_from_dict({"algorithm": "dpo", "data": {"path": "x.jsonl"}}).run.steps is None
    with_steps = {"algorithm": "dpo", "data": {"path": "x.jsonl"}, "run": {"steps": 7}}
    assert config_from_dict(with_steps).run.steps == 7


def test_offline_sections_reject_unknown_keys_and_bad_values(tmp_path):
    base = "algorithm: dpo\ndata:\n  path: x.jsonl\n"
    with pytest.raises(ConfigError, match=r"unknown key 'dpo.bta'.*beta, label_smoothing"):
        load_config(write(tmp_path, base + "dpo:\n  bta: 0.1\n"))
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        load_config(write(tmp_path, base), ["dpo.label_smoothing=0.5"])
    with pytest.raises(ConfigError, match="offline.reference_logps"):
        load_config(write(tmp_path, base), ["offline.reference_logps=sometimes"])
    with pytest.raises(ConfigError, match="set both kto.desirable_weight and kto.undesirable_weight"):
        load_config(write(tmp_path, base.replace("dpo", "kto")), ["kto.desirable_weight=2"])


def test_offline_batch_rules_explain_themselves():
    base = {"algorithm": "dpo", "data": {"path": "x.jsonl"}}
    with pytest.raises(ConfigError, match=r"offline.batch_size=6 must be a multiple of .* 2 \* 2 = 4"):
        config_from_dict({**base, "offline": {"batch_size": 6},
                          "learner": {"num_ranks": 2, "micro_batch_size": 2}})
    # KTO: a micro-batch of 1 would pair an example with its own completion.
    with pytest.raises(ConfigError, match=r"kto needs learner.micro_batch_size >= 2 \(got 1\)"):
        config_from_dict({**base, "algorithm": "kto", "offline": {"batch_size": 4},
                          "learner": {"micro_batch_size": 1}})
    assert config_from_dict({**base, "algorithm": "dpo", "offline": {"batch_size": 4},
                             "learner": {"micro_batch_size": 1}}).learner.micro_batch_size == 1
    with pytest.raises(ConfigError, match="dpo compares the policy with a frozen reference model"):
        config_from_dict({**base, "learner": {"reference": False, "loss": {"kl_coef": 0}}})
    assert not config_from_dict({**base, "algorithm": "orpo",
                                 "learner": {"reference": False, "loss": {"kl_coef": 0}}}).learner.reference
    with pytest.raises(ConfigError, match="offline.eval_every=5 needs held-out data"):
        config_from_dict({**base, "offline": {"eval_every": 5}})
    ok = config_from_dict({**base, "data": {"path": "x.jsonl", "eval_fraction": 0.1},
                           "offline": {"eval_every": 5}})
    assert ok.offline.eval_every == 5


def test_rm_defaults_to_the_tiny_reward_model_unless_a_model_is_named():
    base = {"algorithm": "rm", "data": {"path": "x.jsonl"}}
    assert config_from_dict(base).model.path == "tiny-reward"
    named = {**base, "model": {"path": "runs/sft/final_model"}}
    assert config_from_dict(named).model.path == "runs/sft/final_model"
    assert config_from_dict({**base, "algorithm": "dpo"}).model.path == "tiny"
