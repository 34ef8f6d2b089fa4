"""`fleetrl check`: a corpus of bad inputs, each run through the CLI function in-process.

Every case must end with exit code 2 and one message naming the place (the override, file:line, the
data file and line, the rule file, the setting), with no traceback and no Ray started.
"""

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from fleetrl.cli import main
from fleetrl.run.check import (
    CheckError,
    check_config,
    check_model,
    holds_run,
    requested_resources,
    resource_shortfall,
)
from fleetrl.run.config import load_config

RULES = textwrap.dedent('''\
    def accuracy_reward(completions, solution, **kwargs):
        return [float(c == s) for c, s in zip(completions, solution)]

    def fleet_style(prompts, completions, answer):
        return [1.0 for _ in completions]

    def trl_missing(completions, solutoin, **kwargs):
        return [0.0 for _ in completions]

    def one_arg(prompts):
        return [1.0]

    NOT_A_FUNCTION = 3
    ''')

BASE = {
    "algorithm": "grpo",
    "run": {"output_dir": "runs", "name": "r"},
    "model": {"path": "tiny"},
    "data": {"path": "data.jsonl"},
    "reward": {"functions": [{"name": "acc", "kind": "rule", "path": "rewards.py:accuracy_reward"}]},
    "rl": {"group_size": 2, "prompts_per_step": 2},
    "learner": {"micro_batch_size": 1},
}
ROWS = "".join(f'{{"prompt": "What is {i}+1?", "solution": "{i + 1}"}}\n' for i in range(4))
CHAT_ROWS = "".join(f'{{"prompt": [{{"role": "user", "content": "{i}+1?"}}], "solution": "{i + 1}"}}\n'
                    for i in range(4))


def write_case(root: Path, config: dict | str | None = None, files: dict | None = None) -> Path:
    (root / "runs").mkdir(exist_ok=True)
    for name, text in {"data.jsonl": ROWS, "chat.jsonl": CHAT_ROWS, "rewards.py": RULES, **(files or {})}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    cfg = root / "base.yaml"
    if not isinstance(config, str):
        config = dict(config or BASE)
        if config.get("run", {}).get("output_dir") == "runs":  # run.output_dir is relative to the CWD
            config["run"] = {**config["run"], "output_dir": str(root / "runs")}
    cfg.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return cfg


def with_(**sections) -> dict:
    """BASE with whole sections replaced (a value of None removes the section)."""
    out = {k: v for k, v in BASE.items() if k not in sections}
    out.update({k: v for k, v in sections.items() if v is not None})
    return out


def run_check(tmp_path, capsys, config=None, files=None, overrides=()):
    cfg = write_case(tmp_path, config, files)
    rc = main(["check", str(cfg), *overrides])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """No network here: every hub lookup must answer from the cache at once."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(autouse=True)
def _ray_must_not_start(monkeypatch):
    """A check never starts Ray. The test session may already hold a Ray (the e2e tests' one), so
    "Ray is not initialized" cannot tell: starting one here fails the test instead."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("the checks tried to start or join Ray (ray.init)")

    monkeypatch.setattr(ray, "init", refuse)


def test_a_good_config_with_a_trl_reward_passes(tmp_path, capsys):
    rc, out, err = run_check(tmp_path, capsys)
    assert rc == 0, err
    assert "ready to train" in out
    assert "rule rewards.py:accuracy_reward (TRL-style) reads ['solution']" in out
    assert "4 rows" in out


def test_conversational_data_hub_style_directory_and_uri_output_pass(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text(CHAT_ROWS)
    config = with_(data={"path": str(tmp_path / "ds"), "format": "hub"}, run={"output_dir": "s3://bucket/runs"})
    rc, out, err = run_check(tmp_path, capsys, config)
    assert rc == 0, err
    assert "s3://bucket/runs is a URI" in out


CASES = [
    # --- overrides and config files -------------------------------------------------------------
    ("override-misspelt-section", None, {}, ["lerner.lr=1"],
     [r"override 'lerner.lr=1': unknown key 'lerner' \(did you mean 'learner'\?\)"]),
    ("override-misspelt-kind", None, {}, ["reward.functions.0.kind=rules"],
     [r"override 'reward.functions.0.kind=rules'.*'rules'.*\(did you mean 'rule'\?\)"]),
    ("override-misspelt-key", None, {}, ["learner.lrr=1"], [r"override 'learner.lrr=1'.*did you mean 'lr'"]),
    ("override-misspelt-algorithm", None, {}, ["algorithm=grp"], [r"override 'algorithm=grp'.*did you mean 'grpo'"]),
    ("override-out-of-range", None, {}, ["rl.group_size=0"], [r"override 'rl.group_size=0': 'rl.group_size'"]),
    ("override-cross-key-rule", None, {}, ["rl.mini_batch_size=3"],
     [r"override 'rl.mini_batch_size=3': rl.mini_batch_size=3 must divide the samples per step"]),
    ("file-cross-key-rule", with_(rl={"group_size": 2, "prompts_per_step": 2, "mini_batch_size": 3}), {}, [],
     [r"base.yaml: rl.mini_batch_size=3 must divide the samples per step"]),
    ("override-not-key-value", None, {}, ["learner.lr"], [r"override 'learner.lr' is not KEY=VALUE"]),
    ("override-into-a-value", None, {}, ["rl.group_size.x=1"], [r"rl.group_size is a value, not a section"]),
    ("override-list-index", None, {}, ["reward.functions.3.weight=1"],
     [r"reward.functions is a list of 1 entries; name one by its index 0..0"]),
    ("override-bad-yaml-value", None, {}, ["learner.lr=[1"], [r"the value is not valid YAML"]),
    ("override-builtin-name", None, {}, ["reward.functions=[{name: m, kind: builtin, builtin: math_answr}]"],
     [r"'reward.functions.0.builtin'.*\(got 'math_answr'\) \(did you mean 'math_answer'\?\)"]),
    ("override-builtin-option", None, {}, ["reward.functions=[{name: m, kind: builtin, builtin: math_answer, "
                                           "kwargs: {key: x}}]"],
     [r"builtin math_answer has no option\(s\) \['key'\]; its kwargs are \['answer_key'\]"]),
    ("override-rule-path-shape", None, {}, ["reward.functions.0.path=rewards.py"],
     [r"override 'reward.functions.0.path=rewards.py'.*expected 'path/to/file.py:function_name'"]),
    ("override-empty-functions", None, {}, ["reward.functions=[]"], [r"add at least one entry to reward.functions"]),
    ("override-timeout", None, {}, ["reward.timeout_s=-1"], [r"timeout_s must be a number of seconds above 0"]),
    ("file-misspelt-section", with_(lerner={"lr": 1}), {}, [],
     [r"base.yaml:\d+: unknown key 'lerner' \(did you mean 'learner'\?\)"]),
    ("file-misspelt-nested-key", with_(rl={"group_size": 2, "prompts_per_step": 2, "prompts_per_stp": 2}), {}, [],
     [r"base.yaml:\d+: unknown key 'rl.prompts_per_stp' \(did you mean 'prompts_per_step'\?\)"]),
    ("file-bad-yaml", "rl: [1,\n", {}, [], [r"base.yaml: not valid YAML"]),
    ("file-top-level-list", "- 1\n- 2\n", {}, [], [r"the top level must be a mapping"]),
    ("file-no-data", with_(data=None), {}, [], [r"'data' is required"]),
    ("file-missing", "MISSING", {}, [], [r"config file not found"]),
    # --- data -----------------------------------------------------------------------------------
    ("data-missing-file", None, {}, ["data.path=nothere.jsonl"], [r"data: data file not found: nothere.jsonl"]),
    ("data-invalid-json", None, {"data.jsonl": ROWS + "{oops\n"}, [], [r"data.jsonl:5: invalid JSON"]),
    ("data-no-prompt", None, {"data.jsonl": ROWS + '{"question": "x", "solution": "1"}\n'}, [],
     [r"data.jsonl:5: field 'prompt' is missing \(row has keys: question, solution\).*data.prompt_key"]),
    ("data-empty-prompt", None, {"data.jsonl": '{"prompt": " ", "solution": "1"}\n'}, [],
     [r"data.jsonl:1: field 'prompt' is an empty string"]),
    ("data-message-without-role", None, {"data.jsonl": '{"prompt": [{"content": "hi"}], "solution": "1"}\n'}, [],
     [r"data.jsonl:1: field 'prompt', message at index 0 has no 'role'"]),
    ("data-empty-file", None, {"data.jsonl": "\n\n"}, [], [r"no rows found"]),
    ("data-unknown-suffix", None, {"data.txt": ROWS}, ["data.path=" + "{tmp}/data.txt"],
     [r"cannot tell the data format from the suffix '.txt'"]),
    ("data-hub-name-offline", None, {}, ["data.path=nobody/no-such-dataset"],
     [r"data.path 'nobody/no-such-dataset': dataset not found .*HF_HUB_OFFLINE is set"]),
    ("data-bad-split", None, {}, ["data.path=json", "data.data_files={tmp}/data.jsonl", "data.split=test"],
     [r"data.path 'json': .*split.*check data.split"]),
    ("data-eval-fraction", None, {}, ["data.eval_fraction=0.9"],
     [r"data.eval_fraction=0.9 of 4 rows leaves no training"]),
    ("data-messages-no-template", None, {}, ["data.path={tmp}/chat.jsonl", "data.apply_chat_template=false"],
     [r"chat.jsonl:1: field 'prompt' is a message list but data.apply_chat_template is false"]),
    ("data-prompts-too-long", None, {}, ["rl.max_prompt_tokens=1"],
     [r"every prompt is longer than rl.max_prompt_tokens=1 tokens"]),
    ("data-wrong-kind", None, {}, ["data.kind=preference"],
     [r"data.kind is 'preference' but this trainer needs 'prompt'"]),
    # --- reward files ---------------------------------------------------------------------------
    ("reward-file-missing", None, {}, ["reward.functions.0.path=nope.py:f"],
     [r"rule path 'nope.py:f': file 'nope.py' not found"]),
    ("reward-function-missing", None, {}, ["reward.functions.0.path=rewards.py:acc"],
     [r"rewards.py has no function 'acc' \(functions defined there: \['accuracy_reward'"]),
    ("reward-syntax-error", None, {"bad.py": "x = 1\ndef f(:\n"}, ["reward.functions.0.path=bad.py:f"],
     [r"syntax error in .*bad.py line 2"]),
    ("reward-import-error", None, {"imp.py": "import no_such_module_fleetrl\n"}, ["reward.functions.0.path=imp.py:f"],
     [r"importing .*imp.py raised ModuleNotFoundError line 1"]),
    ("reward-trl-column-missing", None, {}, ["reward.functions.0.path=rewards.py:trl_missing"],
     [r"rewards.py:7 reads data column\(s\) \['solutoin'\] \(did you mean 'solution'\?\)"]),
    ("reward-named-column-missing", None, {}, ["reward.functions.0.path=rewards.py:fleet_style"],
     [r"rewards.py:4 reads data column\(s\) \['answer'\]"]),
    ("reward-builtin-column-missing", None, {}, ["reward.functions=[{name: m, kind: builtin, builtin: math_answer}]"],
     [r"builtin math_answer reads data column\(s\) \['answer'\].*set the builtin's kwargs key"]),
    ("reward-bad-signature", None, {}, ["reward.functions.0.path=rewards.py:one_arg"],
     [r"must take \(prompts, completions, \*\*columns\), or TRL's \(completions, \*\*kwargs\)"]),
    ("reward-not-a-function", None, {}, ["reward.functions.0.path=rewards.py:NOT_A_FUNCTION"],
     [r"'NOT_A_FUNCTION' in .*rewards.py is a int, not a function"]),
    ("reward-model-missing", None, {}, ["reward.functions=[{name: rm, kind: model, model_path: /no/such/rm}]"],
     [r"reward.functions\[rm\].model_path='/no/such/rm': no such directory"]),
    # --- models and paths -----------------------------------------------------------------------
    ("model-missing-dir", None, {}, ["model.path=/no/such/model"], [r"model.path='/no/such/model': no such directory"]),
    ("model-not-a-model-dir", None, {"empty/readme.txt": "x"}, ["model.path={tmp}/empty"],
     [r"is not a model directory \(no config.json in it\)"]),
    ("model-hub-id-offline", None, {}, ["model.path=nobody/no-such-model"],
     [r"model.path='nobody/no-such-model' is not in the local hub cache and HF_HUB_OFFLINE is set"]),
    ("model-tokenizer-missing", None, {}, ["model.tokenizer=/no/such/tokenizer"],
     [r"model.tokenizer='/no/such/tokenizer': no such directory"]),
    ("output-holds-a-run", None, {"runs/r/metrics.jsonl": "{}\n"}, [],
     [r"run directory .*runs/r already holds a run; set run.resume=true"]),
    ("output-is-a-file", None, {"afile": "x"}, ["run.output_dir={tmp}/afile"], [r"afile is a file, not a directory"]),
    # --- environments (multi-turn) ---------------------------------------------------------------
    ("env-file-missing", None, {}, ["rollout.environment=no_env.py:Env"],
     [r"rollout.environment: rollout.environment 'no_env.py:Env': file not found"]),
    ("env-class-missing", None, {"env.py": "class Env:\n    pass\n"}, ["rollout.environment=env.py:Envv"],
     [r"rollout.environment: .*'env.py:Envv'"]),
    ("env-without-step", None, {"env.py": "class Env:\n    pass\n"}, ["rollout.environment=env.py:Env"],
     [r"rollout.environment: .*Env has no step\(text\) method"]),
    ("env-kwargs-rejected", None, {"env.py": "from fleetrl.env import Environment\n"
                                             "class Env(Environment):\n    def __init__(self, turns):\n        pass\n"
                                             "    def reset(self, row):\n        return 'hi'\n"
                                             "    def step(self, text):\n        return None\n"},
     ["rollout.environment=env.py:Env", "rollout.episode.env_kwargs={\"turnz\": 2}"],
     [r"rollout.environment: .*env_kwargs=\{'turnz': 2\}: building it raised TypeError"]),
]


@pytest.mark.parametrize("name,config,files,overrides,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_message(tmp_path, capsys, name, config, files, overrides, expected):
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    if config == "MISSING":
        rc = main(["check", str(tmp_path / "missing.yaml")])
        out, err = capsys.readouterr()
    else:
        rc, out, err = run_check(tmp_path, capsys, config, files, overrides)
    assert rc == 2, (out, err)
    for pattern in expected:
        assert re.search(pattern, err), (pattern, err)
    assert "Traceback" not in err and "(top level)" not in err and "Value error" not in err
    assert err.startswith("fleetrl: ")
    assert not (tmp_path / "runs" / "r").exists() or name == "output-holds-a-run"  # nothing left behind


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40


def test_several_problems_are_reported_together(tmp_path):
    cfg = write_case(tmp_path)
    with pytest.raises(CheckError) as e:
        check_config(cfg, ["model.path=/no/model", "data.path=none.jsonl"])
    assert str(e.value).startswith("2 problems found before starting anything")
    assert "model: model.path='/no/model'" in str(e.value) and "data: data file not found" in str(e.value)


def test_hub_model_not_cached_and_unreachable_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def probe(repo):
        raise ConnectionError("Name or service not known\nmore lines")

    with pytest.raises(ValueError) as e:
        check_model("nobody/no-such-model", "model.path", probe=probe)
    assert "\n" not in str(e.value)
    assert ("the hub did not answer (ConnectionError: Name or service not known); with no network, "
            "set HF_HUB_OFFLINE=1") in str(e.value)


def test_a_failed_start_leaves_no_directory_that_demands_resume(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("x")
    (run_dir / "train.log").write_text("started\n")
    assert not holds_run(run_dir)
    from fleetrl.run.runtime import RunDir

    cfg = load_config(write_case(tmp_path))
    assert RunDir(cfg).path == run_dir  # the retry takes the directory back, no run.resume needed
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert holds_run(run_dir)
    with pytest.raises(FileExistsError, match="set run.resume=true"):
        RunDir(cfg)


def test_train_checks_before_any_run_directory_and_stops_the_ray_it_started(tmp_path, monkeypatch):
    """`fleetrl train` starts a local Ray beside the checks (overlapping start-up); a failed check
    stops it again and creates no run directory."""
    import ray

    import fleetrl.run.runtime
    from fleetrl.train import train

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `fleetrl train` process
    monkeypatch.setattr(fleetrl.run.runtime, "connect_ray", lambda cfg: calls.append("connect"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    cfg_path = write_case(tmp_path)
    cfg = load_config(cfg_path, ["data.path=none.jsonl"])
    with pytest.raises(CheckError, match="data file not found"):
        train(cfg, config_path=cfg_path)
    assert calls == ["connect", "shutdown"]
    assert not (tmp_path / "runs" / "r").exists()
    # A Ray that cannot start does not hide the checks' own message.
    monkeypatch.setattr(fleetrl.run.runtime, "connect_ray", lambda cfg: 1 / 0)
    with pytest.raises(CheckError, match="data file not found"):
        train(cfg, config_path=cfg_path)


def test_resources_against_the_cluster():
    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml",
                      ["rollout.num_workers=4", "learner.num_ranks=2"])
    want = requested_resources(cfg, cluster_has_gpus=True)
    # 4 workers x 1 GPU (tensor_parallel_size 1) + 2 ranks x 1 GPU; CPUs: 4 + 2 + 1 reward actor.
    assert want == {"CPU": 7.0, "GPU": 6.0}
    assert resource_shortfall(want, {"CPU": 16.0, "GPU": 4.0}) == ["GPU: the run asks for 6, the cluster has 4"]
    assert resource_shortfall(requested_resources(cfg, cluster_has_gpus=False), {"CPU": 8.0}) == []


def test_joining_a_cluster_too_small_for_the_config(tmp_path, capsys, monkeypatch):
    import ray

    import fleetrl.run.runtime

    monkeypatch.setattr(fleetrl.run.runtime, "connect_ray", lambda cfg: None)  # no cluster here: its answer
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    rc, out, err = run_check(tmp_path, capsys, overrides=["ray.address=ray://head:10001", "rollout.num_workers=2"])
    assert rc == 2
    assert "cluster: cluster ray://head:10001 is too small for this config (CPU: the run asks for 4, the " \
           "cluster has 2)" in err
    assert main(["check", str(tmp_path / "base.yaml"), "ray.address=ray://head:10001", "--no-cluster"]) == 0
