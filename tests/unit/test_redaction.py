"""Secrets never reach what fleetrl prints or saves (issue 11): `fleetrl config show`, the run
directory's config.yaml and the W&B run config show them as <redacted>; the running config keeps them."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml

from fleetrl import cli
from fleetrl.run.config import REDACTED, dump_config, load_config, redacted_config

REPO = Path(__file__).resolve().parents[2]
SECRETS = ("Bearer sk-live-123", "hf_abcdef", "wandb-key-xyz", "ds-comet-key", "pa55word", "vllm-hf-token")


def _config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((REPO / "examples/grpo_tiny.yaml").read_text())
    cfg["data"]["path"] = str(REPO / "examples/data/letters_train.jsonl")
    cfg["reward"]["functions"].append({
        "name": "judge", "kind": "http", "url": "https://bot:pa55word@judge.example.com/score?api_key=abc&x=1",
        "headers": {"Authorization": "Bearer sk-live-123", "X-Team": "rl"},
    })
    cfg.setdefault("rollout", {})["env_vars"] = {"HF_TOKEN": "hf_abcdef", "VLLM_CPU_KVCACHE_SPACE": "1",
                                                 "TOKENIZERS_PARALLELISM": "false"}
    cfg["rollout"]["engine_kwargs"] = {"hf_token": "vllm-hf-token"}
    cfg.setdefault("learner", {})["deepspeed_config"] = {"comet": {"enabled": True, "api_key": "ds-comet-key"}}
    cfg["run"]["wandb"] = {"project": "p", "api_key": "wandb-key-xyz"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_redacted_config_hides_every_secret_and_keeps_the_rest(tmp_path):
    cfg = load_config(_config(tmp_path))
    tree = redacted_config(cfg)
    text = yaml.safe_dump(tree)
    for secret in (*SECRETS, "api_key=abc"):
        assert secret not in text, secret
    judge = next(f for f in tree["reward"]["functions"] if f["name"] == "judge")
    assert judge["headers"] == {"Authorization": REDACTED, "X-Team": REDACTED}
    assert judge["url"] == f"https://bot:{REDACTED}@judge.example.com/score?api_key={REDACTED}&x=1"
    env = tree["rollout"]["env_vars"]
    assert env == {"HF_TOKEN": REDACTED, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    assert tree["rollout"]["engine_kwargs"] == {"hf_token": REDACTED}
    assert tree["learner"]["deepspeed_config"]["comet"] == {"enabled": True, "api_key": REDACTED}
    assert tree["run"]["wandb"] == {"project": "p", "api_key": REDACTED}
    # Schema fields whose names merely look secret are not touched (data.prompt_key, rl.max_prompt_tokens).
    assert tree["data"]["prompt_key"] == cfg.data.prompt_key
    assert tree["rl"]["max_prompt_tokens"] == cfg.rl.max_prompt_tokens
    # The running config keeps the real values.
    judge_cfg = next(f for f in cfg.reward.functions if f.name == "judge")
    assert judge_cfg.headers["Authorization"] == "Bearer sk-live-123"
    assert cfg.rollout.env_vars["HF_TOKEN"] == "hf_abcdef" and cfg.run.wandb["api_key"] == "wandb-key-xyz"


def test_config_show_is_redacted(tmp_path, capsys):
    assert cli.main(["config", "show", str(_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert REDACTED in out and out.startswith("# secrets are shown as")
    for secret in SECRETS:
        assert secret not in out, secret


def test_run_dir_config_yaml_and_wandb_config_are_redacted(tmp_path, monkeypatch):
    from fleetrl.run.runtime import RunDir

    cfg = load_config(_config(tmp_path), [f"run.output_dir={tmp_path / 'runs'}", "run.name=r"])
    run_dir = RunDir(cfg)
    saved = (run_dir.path / "config.yaml").read_text()
    assert REDACTED in saved
    for secret in SECRETS:
        assert secret not in saved, secret

    calls = {}

    class Settings:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class Run:
        def finish(self):
            pass

    def init(**kw):
        calls.update(kw)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Settings=Settings))
    writer = run_dir.metrics_writer(cfg, append=False)
    writer.close()
    assert "api_key" not in calls and calls["settings"].api_key == "wandb-key-xyz"  # used, not logged
    assert calls["project"] == "p" and calls["name"] == "r"
    logged = yaml.safe_dump(calls["config"])
    for secret in SECRETS:
        assert secret not in logged, secret


def test_unredacted_dump_is_still_available(tmp_path):
    cfg = load_config(_config(tmp_path))
    assert "hf_abcdef" in dump_config(cfg, redact=False)


def test_a_saved_config_with_hidden_secrets_is_refused_by_name(tmp_path):
    from fleetrl.run.config import ConfigError, load_config

    path = tmp_path / "saved.yaml"
    path.write_text(
        "algorithm: grpo\n"
        "data: {path: prompts.jsonl}\n"
        "reward:\n"
        "  functions:\n"
        "    - {name: judge, kind: http, url: 'http://127.0.0.1:9/score', headers: {Authorization: '<redacted>'}}\n"
    )
    with pytest.raises(ConfigError, match=r"reward\.functions\.0\.headers\.Authorization is '<redacted>'"):
        load_config(path)


# ---------------------------------------------------------------- secrets by reference (${env:NAME})


def test_env_references_resolve_where_used_and_name_a_missing_variable():
    from fleetrl.core.secrets import SecretRefError, resolve_env_refs

    env = {"JUDGE_TOKEN": "sk-live-123"}
    assert resolve_env_refs({"Authorization": "Bearer ${env:JUDGE_TOKEN}", "X": "rl"}, "h", env) == \
        {"Authorization": "Bearer sk-live-123", "X": "rl"}
    assert resolve_env_refs(["${env:JUDGE_TOKEN}", 3], "l", env) == ["sk-live-123", 3]
    with pytest.raises(SecretRefError, match=r"run.storage_options.secret refers to \$\{env:S3_SECRET\} but "
                                             r"S3_SECRET is not set in the environment of this process"):
        resolve_env_refs({"secret": "${env:S3_SECRET}"}, "run.storage_options", {})


def test_http_headers_by_reference_are_read_in_the_scorer_and_shown_as_written(tmp_path, monkeypatch):
    from fleetrl.reward.http_scorer import HttpScorer

    cfg_tree = yaml.safe_load((REPO / "examples/grpo_tiny.yaml").read_text())
    cfg_tree["data"]["path"] = str(REPO / "examples/data/letters_train.jsonl")
    cfg_tree["reward"]["functions"].append({"name": "judge", "kind": "http", "url": "https://judge.example.com/s",
                                            "headers": {"Authorization": "Bearer ${env:JUDGE_TOKEN}"}})
    cfg_tree["run"]["storage_options"] = {"key": "${env:S3_KEY}", "secret": "${env:S3_SECRET}"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg_tree))
    cfg = load_config(path)
    text = dump_config(cfg)
    assert "Bearer ${env:JUDGE_TOKEN}" in text and "${env:S3_SECRET}" in text  # no secret in them: kept
    # A saved config.yaml with references loads again with nothing to give back (resume asks for nothing).
    saved = tmp_path / "saved.yaml"
    saved.write_text(text)
    again = load_config(saved)
    assert again.run.storage_options == {"key": "${env:S3_KEY}", "secret": "${env:S3_SECRET}"}
    monkeypatch.setenv("JUDGE_TOKEN", "sk-live-123")
    judge = next(f for f in cfg.reward.functions if f.name == "judge")
    assert HttpScorer(judge.url, headers=judge.headers).headers["Authorization"] == "Bearer sk-live-123"
    assert judge.headers["Authorization"] == "Bearer ${env:JUDGE_TOKEN}"  # the config keeps the reference


def test_storage_options_by_reference_are_resolved_when_the_store_is_opened(tmp_path, monkeypatch, s3_server):
    import s3fs

    from fleetrl.core.secrets import SecretRefError
    from fleetrl.core.storage import Storage

    s3fs.S3FileSystem(**s3_server).mkdir("refs")
    options = {**s3_server, "key": "${env:T_S3_KEY}", "secret": "${env:T_S3_SECRET}"}
    store = Storage(options)
    assert store.options["secret"] == "${env:T_S3_SECRET}"  # what is handed to other processes
    with pytest.raises(SecretRefError, match=r"run.storage_options.key refers to \$\{env:T_S3_KEY\}"):
        store.write_text("s3://refs/x.txt", "hi")
    monkeypatch.setenv("T_S3_KEY", s3_server["key"])
    monkeypatch.setenv("T_S3_SECRET", s3_server["secret"])
    store = Storage(options)
    store.write_text("s3://refs/x.txt", "hi")
    assert store.read_text("s3://refs/x.txt") == "hi"
