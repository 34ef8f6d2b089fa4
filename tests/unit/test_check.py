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
    check_output_reach,
    holds_run,
    placement_by_node,
    requested_resources,
    resource_shortfall,
    service_demands,
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
    "ray": {"num_cpus": 4},  # 3 actors of 1 CPU each; set, so the local-resources check passes on any machine
}
PAIRS = "".join(f'{{"prompt": "{i}+1?", "chosen": "{i + 1}", "rejected": "{i + 2}"}}\n' for i in range(4))
SCORED = "".join(f'{{"prompt": "{i}+1?", "completion": "{i + 1}", "stars": {i + 1}}}\n' for i in range(4))
DPO = {"algorithm": "dpo", "run": {"output_dir": "runs", "name": "r"}, "model": {"path": "tiny"},
       "data": {"path": "pairs.jsonl"}, "offline": {"batch_size": 2}, "learner": {"micro_batch_size": 1},
       "ray": {"num_cpus": 2}}
KTO = {**DPO, "algorithm": "kto", "data": {"path": "scored.jsonl"}, "learner": {"micro_batch_size": 2},
       "kto": {"score_key": "stars", "score_threshold": 2.5}}
ENV = ("from fleetrl.env import Environment\n"
       "class Env(Environment):\n    async def step(self, text):\n        return None\n")
ROWS = "".join(f'{{"prompt": "What is {i}+1?", "solution": "{i + 1}"}}\n' for i in range(4))
CHAT_ROWS = "".join(f'{{"prompt": [{{"role": "user", "content": "{i}+1?"}}], "solution": "{i + 1}"}}\n'
                    for i in range(4))


def write_case(root: Path, config: dict | str | None = None, files: dict | None = None) -> Path:
    (root / "runs").mkdir(exist_ok=True)
    for name, text in {"data.jsonl": ROWS, "chat.jsonl": CHAT_ROWS, "rewards.py": RULES, "pairs.jsonl": PAIRS,
                       "scored.jsonl": SCORED, **(files or {})}.items():
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
    # --- nonsense: settings that make the algorithm degenerate ------------------------------------
    ("algo-group-of-one", None, {}, ["rl.group_size=1"],
     [r"override 'rl.group_size=1': grpo needs rl.group_size >= 2 \(its advantage is the reward minus the group's "
      r"mean, which is 0 for a group of one"]),
    ("algo-group-of-one-drgrpo", None, {}, ["algorithm=drgrpo", "rl.group_size=1"],
     [r"drgrpo needs rl.group_size >= 2"]),
    ("algo-greedy-sampling", None, {}, ["rollout.sampling.temperature=0"],
     [r"override 'rollout.sampling.temperature=0': rollout.sampling.temperature=0 is greedy decoding, but grpo "
      r"learns from sampled completions.*Set rollout.sampling.temperature > 0"]),
    ("algo-greedy-top-k", None, {}, ["rollout.sampling.top_k=1"], [r"rollout.sampling.top_k=1 is greedy decoding"]),
    ("algo-lr-nan", None, {}, ["learner.lr=.nan"], [r"override 'learner.lr=.nan': 'learner.lr': .*finite number"]),
    ("algo-lr-inf", None, {}, ["learner.lr=.inf"], [r"override 'learner.lr=.inf': 'learner.lr': .*finite number"]),
    ("algo-lr-inf-in-file", with_(learner={"micro_batch_size": 1, "lr": float("inf")}), {}, [],
     [r"base.yaml:\d+: 'learner.lr': .*finite number"]),
    ("bound-staleness-above-the-run", None, {}, ["rl.max_staleness=50", "run.steps=3"],
     [r"rl.max_staleness=50 is above the run's length \(run.steps=3\), so it bounds nothing"]),
    # --- resources a local Ray cannot give ------------------------------------------------------
    ("local-too-many-cpus", None, {}, ["rollout.num_cpus_per_worker=1000"],
     [r"cluster: a local Ray \(ray.num_cpus=4, .*\) cannot give this config what it asks \(CPU: the run asks "
      r"for 1002, the cluster has 4\): set ray.num_cpus: 1002"]),
    ("local-gpus", None, {}, ["learner.num_gpus_per_rank=4"],
     [r"a local Ray .*GPU: the run asks for 4, the cluster has 0.*lower learner.num_gpus_per_rank"]),
    ("local-custom-resource", None, {}, ["rollout.resources={trn1: 1}"],
     [r"trn1: the run asks for 1, the cluster has 0.*custom resources .* exist only on cluster nodes"]),
    # --- data that makes the objective meaningless ----------------------------------------------
    ("data-unknown-role", None, {"chat.jsonl": '{"prompt": [{"role": "usr", "content": "1+1?"}], "solution": "2"}\n'},
     ["data.path={tmp}/chat.jsonl"],
     [r"chat.jsonl:1: field 'prompt', message at index 0 has role 'usr', which chat templates do not know "
      r"\(did you mean 'user'\?\); roles are system, developer, user, assistant, tool"]),
    ("data-sharegpt-role", None,
     {"chat.jsonl": '{"prompt": [{"role": "human", "content": "1+1?"}], "solution": "2"}\n'},
     ["data.path={tmp}/chat.jsonl"], [r"chat.jsonl:1: .*role 'human'.*ShareGPT-style data: map it to 'user'"]),
    ("data-identical-chosen-rejected", DPO,
     {"pairs.jsonl": PAIRS + '{"prompt": "q", "chosen": "same", "rejected": "same"}\n'}, [],
     [r"pairs.jsonl:5: fields 'chosen' and 'rejected' are identical, so the pair prefers nothing"]),
    ("data-role-in-preference-messages", DPO,
     {"pairs.jsonl": '{"prompt": "q", "chosen": [{"role": "Assistant", "content": "a"}], '
                     '"rejected": [{"role": "assistant", "content": "b"}]}\n'}, [],
     [r"pairs.jsonl:1: field 'chosen', message at index 0 has role 'Assistant'.*roles are lower case: 'assistant'"]),
    ("data-non-finite-score", KTO, {"scored.jsonl": SCORED + '{"prompt": "q", "completion": "c", "stars": NaN}\n'}, [],
     [r"data: .*scored.jsonl:5: kto.score_key is 'stars' but the row's 'stars' is nan; every row needs a finite "
      r"number there"]),
    ("data-infinite-score", KTO, {"scored.jsonl": SCORED + '{"prompt": "q", "completion": "c", "stars": Infinity}\n'},
     [], [r"scored.jsonl:5: kto.score_key is 'stars' but the row's 'stars' is inf"]),
    # --- environments and tools -----------------------------------------------------------------
    ("env-not-an-environment", None, {"env.py": "class Env:\n    def step(self, text):\n        return None\n"},
     ["rollout.environment=env.py:Env"],
     [r"rollout.environment: .*Env is not a fleetrl.env.Environment: subclass it"]),
    ("env-not-a-class", None, {"env.py": "Env = 3\n"}, ["rollout.environment=env.py:Env"],
     [r"rollout.environment: .*Env in env.py is a int, not a class"]),
    ("tool-sandbox-zero-deadline", None, {}, ["rollout.environment=fleetrl.env.tools:ToolEnv",
                                              "rollout.episode.env_kwargs={timeout_s: 0}"],
     [r"rollout.environment: .*rollout.episode.env_kwargs.timeout_s: Input should be greater than 0 \(got 0\)"]),
    ("tool-sandbox-negative-memory", None, {}, ["rollout.environment=fleetrl.env.tools:ToolEnv",
                                                "rollout.episode.env_kwargs={memory_mb: -1}"],
     [r"rollout.episode.env_kwargs.memory_mb: Input should be greater than or equal to 32 \(got -1\)"]),
    # --- storage and optional dependencies -------------------------------------------------------
    ("output-uri-without-bucket", None, {}, ["run.output_dir=s3:///runs"],
     [r"override 'run.output_dir=s3:///runs': .*names no bucket: write s3://BUCKET/prefix"]),
    ("output-uri-empty", None, {}, ["run.output_dir=s3://"], [r"run.output_dir='s3://' names no bucket"]),
    ("output-unknown-storage", None, {}, ["run.output_dir=nosuchfs://bucket/runs"],
     [r"dependencies: run.output_dir='nosuchfs://bucket/runs': fsspec knows no storage 'nosuchfs://'"]),
    ("dependency-wandb-missing", None, {}, ["run.wandb={project: p}"],
     [r"dependencies: run.wandb is set but the wandb package is not installed: pip install 'fleetrl\[wandb\]'"]),
    # --- LoRA the model cannot take ---------------------------------------------------------------
    ("lora-missing-target", None, {}, ["learner.lora={target_modules: [nope_proj]}"],
     [r"learner.lora: learner.lora.target_modules=\['nope_proj'\] does not fit the model.*linear layers are "
      r"named \['down_proj', 'gate_proj', 'k_proj'"]),
    ("lora-embedding-online", None, {}, ["learner.lora={target_modules: [q_proj, embed_tokens]}"],
     [r"learner.lora: .*embed_tokens.* is trained but a weight sync cannot carry it"]),
    # --- run names (paths) ------------------------------------------------------------------------
    ("run-name-absolute", None, {}, ["run.name=/etc"], [r"run.name='/etc' must be one plain directory name"]),
    ("run-name-dotdot", None, {}, ["run.name=.."], [r"run.name='..' must be one plain directory name"]),
    ("run-name-separator", None, {}, ["run.name=a/../../b"], [r"run.name='a/../../b' must be one plain"]),
    ("run-name-backslash", None, {}, ["run.name=a\\b"], [r"run.name='a\\\\b' must be one plain"]),
]


def test_wandb_present_passes_its_dependency_check(monkeypatch):
    import importlib.util

    from fleetrl.run.check import _check_dependencies

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml", ["run.wandb={project: p}"])
    assert _check_dependencies(cfg) is None


def test_an_offline_config_with_good_pairs_and_scores_passes(tmp_path, capsys):
    rc, out, err = run_check(tmp_path, capsys, DPO)
    assert rc == 0, err
    rc, out, err = run_check(tmp_path, capsys, KTO)
    assert rc == 0, err


def test_a_ray_this_process_runs_is_measured_not_the_config(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    rc, out, err = run_check(tmp_path, capsys, None, {}, ["rollout.num_cpus_per_worker=1000", "ray.num_cpus=2000"])
    assert rc == 2
    assert re.search(r"the Ray this process already runs .*CPU: the run asks for 1002, the cluster has 3", err), err


@pytest.mark.parametrize("name,config,files,overrides,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_message(tmp_path, capsys, monkeypatch, name, config, files, overrides,
                                          expected):
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    if name.startswith("local-"):
        # These describe the local Ray a run would start; in the full suite this process already
        # runs the session's shared Ray, which check (rightly) measures instead.
        import ray

        monkeypatch.setattr(ray, "is_initialized", lambda: False)
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


def test_placement_by_node_names_where_each_service_can_go_and_which_cannot():
    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml",
                      ["rollout.num_workers=2", "rollout.resources={rollout: 1}", "learner.num_ranks=2",
                       "learner.resources_per_rank={train: 1}", "reward.resources={judge: 1}"])
    demands = service_demands(cfg, cluster_has_gpus=False)
    assert demands["rollout worker"][:2] == (2, {"CPU": 1.0, "rollout": 1.0})
    assert demands["learner rank"][:2] == (2, {"CPU": 1.0, "train": 1.0})
    nodes = [
        {"Alive": True, "NodeID": "head0000", "NodeManagerAddress": "127.0.0.1", "Resources": {"CPU": 1.0}},
        {"Alive": True, "NodeID": "roll0000", "NodeManagerAddress": "127.0.0.2",
         "Resources": {"CPU": 4.0, "rollout": 2.0, "node:127.0.0.2": 1.0}},
        {"Alive": True, "NodeID": "train000", "NodeManagerAddress": "127.0.0.3",
         "Resources": {"CPU": 2.0, "train": 1.0}},
        {"Alive": False, "NodeID": "dead0000", "NodeManagerAddress": "127.0.0.4",
         "Resources": {"CPU": 8.0, "judge": 1.0}},
    ]
    lines, problems = placement_by_node(demands, nodes)
    assert "2 rollout worker(s) (each CPU 1, rollout 1) can go on: 127.0.0.2 [roll0000] (CPU 4, rollout 2) x2" in lines
    assert "2 learner rank(s) (each CPU 1, train 1) can go on: 127.0.0.3 [train000] (CPU 2, train 1) x1" in lines
    # The only node with `judge` is dead: the reward actor could never be placed.
    (problem,) = problems
    assert problem.startswith("no node can hold a reward actor (one asks for CPU 1, judge 1); the nodes have: "
                              "127.0.0.1 [head0000] (CPU 1); 127.0.0.2")
    assert problem.endswith("or change reward.num_cpus / num_gpus / resources")
    # The only train node is draining: it takes no new rank, and the report says why it is left out.
    lines, problems = placement_by_node(demands, nodes, draining={"train000"})
    assert lines[0] == "draining, so left out: 127.0.0.3 [train000] (CPU 2, train 1)"
    assert any(p.startswith("no node can hold a learner rank (one asks for CPU 1, train 1)") for p in problems)


def test_a_local_output_dir_is_refused_when_ranks_may_run_on_other_nodes():
    example = Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml"
    nodes = [
        {"Alive": True, "NodeID": "head0000", "NodeManagerAddress": "127.0.0.1", "Resources": {"CPU": 2.0}},
        {"Alive": True, "NodeID": "train000", "NodeManagerAddress": "127.0.0.3",
         "Resources": {"CPU": 2.0, "train": 1.0}},
        {"Alive": False, "NodeID": "dead0000", "NodeManagerAddress": "127.0.0.4", "Resources": {"CPU": 8.0}},
    ]

    def reach(*overrides, driver="head0000", on=nodes):
        cfg = load_config(example, list(overrides))
        return check_output_reach(cfg, service_demands(cfg, cluster_has_gpus=False), on, driver)

    msg = reach("learner.resources_per_rank={train: 1}")
    assert msg.startswith("run.output_dir=runs is a local path, but learner ranks may run on other nodes "
                          "(127.0.0.3 [train000] (CPU 2, train 1)): the checkpoints and final_model/"), msg
    assert msg.endswith("Use storage every node reaches: run.output_dir=s3://BUCKET/prefix (or another object "
                        "store, with run.storage_options), or, if it is a shared filesystem mounted at the same "
                        "path on every node, set run.output_dir_shared=true"), msg
    # Plain CPU ranks fit the head and the train node: still refused (Ray may put them on either).
    assert "127.0.0.3 [train000]" in reach() and "head0000" not in reach()
    # What is fine: object storage, a declared shared mount, ranks only on the driver's node, one node.
    assert reach("learner.resources_per_rank={train: 1}", "run.output_dir=s3://bucket/runs") is None
    assert reach("learner.resources_per_rank={train: 1}", "run.output_dir_shared=true") is None
    assert reach("learner.resources_per_rank={train: 1}", driver="train000") is None
    assert reach(on=nodes[:1]) is None and reach(on=[nodes[0], nodes[2]]) is None  # the other one is dead


def test_joining_a_cluster_too_small_for_the_config(tmp_path, capsys, monkeypatch):
    import ray

    import fleetrl.run.runtime

    monkeypatch.setattr(fleetrl.run.runtime, "connect_ray", lambda cfg: None)  # no cluster here: its answer
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1",
                                                "Resources": {"CPU": 2.0, "memory": 1e9}}])
    rc, out, err = run_check(tmp_path, capsys, overrides=["ray.address=ray://head:10001", "rollout.num_workers=2"])
    assert rc == 2
    assert "cluster: cluster ray://head:10001 is too small for this config (CPU: the run asks for 4, the " \
           "cluster has 2)" in err
    assert main(["check", str(tmp_path / "base.yaml"), "ray.address=ray://head:10001", "--no-cluster"]) == 0


def test_a_python_tool_without_isolation_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch):
    """The driver's check runs the tool's sandbox probe: no bubblewrap, one message, exit code 2."""
    import fleetrl.env.sandbox as sandbox

    monkeypatch.setattr(sandbox, "BWRAP", "fleetrl-no-such-bwrap")
    monkeypatch.setattr(sandbox, "_probed", {})
    tool_env = ["rollout.environment=fleetrl.env.tools:ToolEnv"]
    rc, out, err = run_check(tmp_path, capsys, overrides=tool_env)
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"rollout.environment: bubblewrap \('fleetrl-no-such-bwrap'\) is not installed on this machine, "
                     r"so the python tool cannot isolate model-written code and refuses to run it: install it "
                     r"\(Debian/Ubuntu: apt-get install -y bubblewrap", err), err
    # The explicit opt-in passes, and the report says loudly what it means.
    rc, out, err = run_check(tmp_path, capsys, overrides=[*tool_env, "rollout.episode.env_kwargs={isolation: none}"])
    assert rc == 0, err
    assert "python tool: isolation: none -- model-written code runs UNISOLATED (explicit opt-in)" in out
    # A key ToolEnv does not have names itself.
    rc, out, err = run_check(tmp_path, capsys, overrides=[*tool_env, "rollout.episode.env_kwargs={timeout: 5}"])
    assert rc == 2 and "rollout.episode.env_kwargs.timeout: unknown key for ToolEnv; allowed: [" in err


def test_check_refuses_a_tool_environment_whose_chat_template_hides_the_tools(tmp_path, capsys):
    from transformers import AutoTokenizer

    from fleetrl.testing.tiny import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    tok.chat_template = "{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] + '\n' }}{%- endfor -%}"
    tok.save_pretrained(tmp_path / "no_tools_tokenizer")
    rc, out, err = run_check(tmp_path, capsys, overrides=["rollout.environment=fleetrl.env.tools:ToolEnv",
                                                         f"model.tokenizer={tmp_path / 'no_tools_tokenizer'}"])
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"rollout.environment: the chat template of .*no_tools_tokenizer does not render `tools`", err)


def test_a_working_sandbox_is_reported_by_check(tmp_path, capsys):
    rc, out, err = run_check(tmp_path, capsys, overrides=["rollout.environment=fleetrl.env.tools:ToolEnv"])
    assert rc == 0, err
    assert "python tool: bubblewrap sandbox works" in out

