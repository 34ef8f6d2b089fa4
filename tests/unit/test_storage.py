"""The output storage layer and the durable-checkpoint protocol (fleetrl.core.storage, RunDir).

Every protocol test runs twice: on a local directory and on an S3-compatible server (moto) started
on loopback, reached through s3fs exactly as a cluster reaches S3.
"""

from __future__ import annotations

import json

import pytest
import torch

from fleetrl import cli
from fleetrl.core import storage
from fleetrl.core.storage import Storage, StorageError
from fleetrl.run.config import ConfigError, config_from_dict
from fleetrl.run.runtime import RunDir, request_graceful_stop, resume_config

_buckets = iter(range(10**6))


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(Storage, a fresh root location) on local disk or in a new bucket of the loopback S3 server."""
    if request.param == "local":
        return Storage(), str(tmp_path / "out")
    import s3fs

    options = request.getfixturevalue("s3_server")
    bucket = f"unit-{next(_buckets)}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return Storage(options), f"s3://{bucket}/runs"


def write_checkpoint(store: Storage, final: str, ranks: int, payload: bytes = b"w" * 100) -> str:
    """What the learner ranks and the driver do: stage, each rank commits from scratch, verify, publish."""
    staging = storage.begin(store, final)
    for rank in range(ranks):
        scratch = storage.scratch_dir(store, staging, rank)
        with open(f"{scratch}/shard-{rank}.pt", "wb") as f:
            f.write(payload)
        storage.commit_rank_files(store, scratch, staging, rank)
    storage.verify_complete(store, staging, ranks, "checkpoint")
    storage.publish(store, staging, final, "done\n")
    return final


def test_checkpoint_is_staged_verified_and_published_with_complete_last(where):
    store, root = where
    final = write_checkpoint(store, store.join(root, "step-000001"), ranks=2)
    sizes = store.file_sizes(final)
    assert sizes["shard-0.pt"] == sizes["shard-1.pt"] == 100
    assert {".manifest-rank-0.json", ".manifest-rank-1.json", "COMPLETE"} <= set(sizes)
    assert not any(".scratch" in k for k in sizes)
    assert store.listdir(root) == ["step-000001"]  # no staging left behind
    assert storage.complete_checkpoints(store, root) == [final]


def test_a_rank_that_did_not_commit_or_a_torn_file_fails_verification(where):
    store, root = where
    staging = storage.begin(store, store.join(root, "step-000002"))
    scratch = storage.scratch_dir(store, staging, 0)
    with open(f"{scratch}/a.pt", "wb") as f:
        f.write(b"x" * 10)
    storage.commit_rank_files(store, scratch, staging, 0)
    with pytest.raises(StorageError, match=r"rank\(s\) \[1\] of 2 did not commit"):
        storage.verify_complete(store, staging, 2, "checkpoint")
    store.write_text(store.join(staging, "a.pt"), "short")  # a shard cut short after its manifest
    with pytest.raises(StorageError, match=r"a.pt \(rank 0: expected 10 bytes, found 5\)"):
        storage.verify_complete(store, staging, 1, "checkpoint")


def test_torn_checkpoints_are_ignored_and_keep_last_deletes_only_older_complete_ones(where):
    store, root = where
    for step in (1, 2, 3):
        write_checkpoint(store, store.join(root, f"step-00000{step}"), ranks=1)
    # A torn newer one: written but never published (no COMPLETE).
    torn = storage.begin(store, store.join(root, "step-000004"))
    store.write_text(store.join(torn, "shard-0.pt"), "partial")
    assert storage.complete_checkpoints(store, root)[-1].endswith("step-000003")

    assert storage.prune(store, root, keep_last=0) == [torn]  # 0 keeps every complete one
    assert [store.name(p) for p in storage.complete_checkpoints(store, root)] == \
        ["step-000001", "step-000002", "step-000003"]
    write_checkpoint(store, store.join(root, "step-000004"), ranks=1)
    storage.prune(store, root, keep_last=2)
    assert store.listdir(root) == ["step-000003", "step-000004"]


def test_free_space_is_checked_first_with_a_clear_error(tmp_path):
    with pytest.raises(StorageError) as e:
        storage.check_free_space(Storage(), str(tmp_path / "ckpt"), 10**18, "a checkpoint (learner rank 0)")
    msg = str(e.value)
    assert "a checkpoint (learner rank 0)" in msg and str(tmp_path / "ckpt") in msg
    assert "1,100,000,000,000,000,000 bytes" in msg and "free" in msg
    storage.check_free_space(Storage(), str(tmp_path), 1, "x")  # enough: no error
    assert Storage({}).free_bytes("s3://bucket/x") is None  # object stores have no such limit


def test_resume_needs_a_run_name():
    with pytest.raises(ConfigError, match=r"run.resume=true needs run.name .* fleetrl train --resume RUN_DIR"):
        config_from_dict({"algorithm": "grpo", "data": {"path": "x.jsonl"}}, ["run.resume=true"])


def _cfg(output_dir, options=None, *extra):
    return config_from_dict({"algorithm": "grpo", "data": {"path": "/data/x.jsonl"},
                             "reward": {"functions": [{"name": "l", "kind": "builtin", "builtin": "letter_fraction"}]},
                             "run": {"output_dir": output_dir, "name": "r1", "storage_options": options or {}}},
                            list(extra))


def test_run_dir_on_s3_saves_redacted_config_logs_stop_file_and_resumes_by_directory(s3_server):
    import s3fs

    s3fs.S3FileSystem(**s3_server).mkdir("rundirs")
    cfg = _cfg("s3://rundirs/exp", s3_server, "run.steps=7")
    run_dir = RunDir(cfg)
    assert run_dir.uri == "s3://rundirs/exp/r1" and run_dir.location == run_dir.uri
    store = run_dir.storage
    saved = store.read_text("s3://rundirs/exp/r1/config.yaml")
    assert "test-secret-key" not in saved and "<redacted>" in saved  # storage_options.secret/key
    # The driver's logs are local files uploaded to the run directory.
    run_dir.metrics_path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n{\"st")
    run_dir.sync(force=True)
    assert store.read_text("s3://rundirs/exp/r1/metrics.jsonl").startswith('{"step": 1}')
    # A directory with more than a failed start's config.yaml/train.log is a run: not started over.
    with pytest.raises(FileExistsError, match=r"fleetrl train --resume s3://rundirs/exp/r1"):
        RunDir(cfg)

    # Graceful stop through the run directory.
    assert not run_dir.stop_requested()
    request_graceful_stop("s3://rundirs/exp/r1", s3_server)
    run_dir._last_stop_poll = 0.0
    assert run_dir.stop_requested()
    run_dir.clear_stop()
    run_dir._last_stop_poll = 0.0
    assert not run_dir.stop_requested()

    # Resume by directory: the saved config, secrets given back as overrides, anything else overridable.
    overrides = [f"run.storage_options.{k}={s3_server[k]}" for k in ("endpoint_url", "key", "secret")]
    overrides.append("run.steps=9")
    again = resume_config("s3://rundirs/exp/r1/", overrides)
    assert (again.run.name, again.run.output_dir, again.run.resume, again.run.steps) == \
        ("r1", "s3://rundirs/exp", True, 9)
    with pytest.MonkeyPatch.context() as mp, \
            pytest.raises(ConfigError, match=r"run.storage_options.key, run.storage_options.secret are '<redacted>'"):
        mp.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])  # readable with the environment's credentials
        mp.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
        resume_config("s3://rundirs/exp/r1", overrides[:1])
    resumed = RunDir(again)  # the logs come back, torn last line dropped on truncate
    resumed.truncate_logs(1)
    assert resumed.metrics_path.read_text() == json.dumps({"step": 1}) + "\n"


def test_cli_resume_errors_are_clear(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml there" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path), "examples/grpo_tiny.yaml"]) == 2
    assert "give only key=value overrides" in capsys.readouterr().err
    assert cli.main(["train"]) == 2
    assert "--resume RUN_DIR" in capsys.readouterr().err
    assert cli.main(["stop", "--graceful", str(tmp_path)]) == 2
    assert "not a fleetrl run directory" in capsys.readouterr().err


class _NotATensor:
    pass


def test_resume_loads_only_tensors(tmp_path):
    """DeepSpeed's own loader uses weights_only=False; fleetrl's replacement refuses other objects."""
    from fleetrl.learner.engine import _tensors_only_load

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "step": 3, "rng": torch.get_rng_state()}, good)
    assert _tensors_only_load(str(good))["step"] == 3
    torch.save({"w": torch.ones(2), "evil": _NotATensor()}, bad)
    with pytest.raises(RuntimeError, match=r"bad.pt: refused to load .*_NotATensor.*_safe_checkpoint_globals"):
        _tensors_only_load(str(bad))


def test_kuberay_manifests_keep_outputs_off_the_pods():
    """The RayJob writes to a bucket; head and learner pods (driver logs, checkpoint shards) get the
    S3 credentials from one optional Secret, in both manifests."""
    import shlex
    from pathlib import Path

    import yaml

    deploy = Path(__file__).resolve().parents[2] / "src" / "fleetrl" / "deploy" / "kuberay"
    job = yaml.safe_load((deploy / "rayjob.yaml").read_text())
    assert any(a.startswith("run.output_dir=s3://") for a in shlex.split(job["spec"]["entrypoint"]))
    for spec in (job["spec"]["rayClusterSpec"], yaml.safe_load((deploy / "raycluster.yaml").read_text())["spec"]):
        pods = [spec["headGroupSpec"]] + [g for g in spec["workerGroupSpecs"] if g["groupName"] == "learner"]
        for group in pods:
            (container,) = group["template"]["spec"]["containers"]
            assert {"secretRef": {"name": "fleetrl-s3", "optional": True}} in container["envFrom"]
    assert "persistentVolumeClaim" in (deploy / "raycluster.yaml").read_text()  # the shared-mount example


def test_sigterm_asks_the_driver_for_a_graceful_stop_and_a_second_one_ends_it():
    import os
    import signal

    from fleetrl.train import _graceful_sigterm

    class Run:
        stop_signal = False

    run = Run()
    with _graceful_sigterm(run):
        os.kill(os.getpid(), signal.SIGTERM)
        assert run.stop_signal
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                pass
        assert e.value.code == 128 + signal.SIGTERM


def test_a_resumed_run_finds_its_rule_and_environment_files_from_any_directory(tmp_path, monkeypatch):
    """config.yaml in the run directory names the rule and environment files next to the original
    config absolutely: `fleetrl train --resume RUN_DIR` from elsewhere still finds them."""
    import yaml

    from fleetrl.reward.rules import load_rule_function
    from fleetrl.run.config import load_config

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "rewards.py").write_text("def short(prompt, completion, **kw):\n    return float(len(completion) < 5)\n")
    (proj / "env.py").write_text("class Env:\n    pass\n")
    (proj / "run.yaml").write_text(yaml.safe_dump({
        "algorithm": "grpo", "data": {"path": "/data/x.jsonl"},
        "reward": {"functions": [{"name": "s", "kind": "rule", "path": "rewards.py:short"},
                                 {"name": "l", "kind": "builtin", "builtin": "letter_fraction"}]},
        "rollout": {"environment": "env.py:Env"},
        "run": {"output_dir": str(tmp_path / "runs"), "name": "r1"}}))
    cfg = load_config(proj / "run.yaml")
    assert cfg.reward.functions[0].path == "rewards.py:short"  # as written: checks name it so
    RunDir(cfg, proj / "run.yaml")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = resume_config(str(tmp_path / "runs" / "r1"))
    assert again.reward.functions[0].path == f"{proj / 'rewards.py'}:short"
    assert again.rollout.environment == f"{proj / 'env.py'}:Env"
    load_rule_function(again.reward.functions[0].path, base_dir=elsewhere)  # found (it was not, relative)


# ---------------------------------------------------------------- run names and scratch directories


@pytest.mark.parametrize("bad", ["/etc", "..", ".", "a/b", "a/../../b", "../x", "a\\b", "", " x", ".hidden",
                                 "-rf", "x" * 201, "a\nb", "name with space"])
def test_run_name_must_be_one_plain_path_component(bad):
    with pytest.raises(ConfigError, match=r"run.name=.* must be one plain directory name"):
        config_from_dict({"algorithm": "sft", "data": {"path": "d.jsonl"}, "run": {"name": bad}})


@pytest.mark.parametrize("good", ["r1", "grpo-20261206-044500", "exp_3.b+lr=1e-6@v2", "A" * 200])
def test_plain_run_names_pass(good):
    assert config_from_dict({"algorithm": "sft", "data": {"path": "d.jsonl"}, "run": {"name": good}}).run.name == good


def test_private_dir_is_this_users_own_and_refuses_what_another_user_could_plant(tmp_path):
    import os
    import stat

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    mine = storage.private_dir(shared)
    assert mine == shared / f"fleetrl-{os.getuid()}"
    assert stat.S_IMODE(os.lstat(mine).st_mode) == 0o700 and storage.private_dir(shared) == mine  # idempotent
    # A symlink planted under the name (pointing, say, at the victim's home) is refused, not followed.
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "shared2").mkdir()
    (tmp_path / "shared2" / f"fleetrl-{os.getuid()}").symlink_to(other)
    with pytest.raises(StorageError, match=r"is not a plain directory \(a symlink or a file\)"):
        storage.private_dir(tmp_path / "shared2")
    # A directory others can write into is refused too.
    (tmp_path / "shared3" / f"fleetrl-{os.getuid()}").mkdir(parents=True)
    os.chmod(tmp_path / "shared3" / f"fleetrl-{os.getuid()}", 0o777)
    with pytest.raises(StorageError, match=r"others can write into it .*mode 777"):
        storage.private_dir(tmp_path / "shared3")
    if os.getuid() == 0:  # sessions and CI run as root: a directory of another owner
        (tmp_path / "shared4" / "fleetrl-0").mkdir(parents=True)
        os.chown(tmp_path / "shared4" / "fleetrl-0", 12345, 12345)
        with pytest.raises(StorageError, match=r"belongs to another user .*owner uid 12345"):
            storage.private_dir(tmp_path / "shared4")


def test_scratch_root_is_per_user_and_fleetrl_scratch_must_be_private(tmp_path, monkeypatch):
    import os
    import tempfile

    monkeypatch.delenv("FLEETRL_SCRATCH", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert storage.scratch_root() == tmp_path / f"fleetrl-{os.getuid()}"
    rank_dir = storage.scratch_dir(Storage(), "s3://bucket/ckpt.tmp", 0)
    assert rank_dir.startswith(str(tmp_path / f"fleetrl-{os.getuid()}") + "/fleetrl-rank0-")
    monkeypatch.setenv("FLEETRL_SCRATCH", str(tmp_path / "mine"))
    assert storage.scratch_root() == tmp_path / "mine"
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    monkeypatch.setenv("FLEETRL_SCRATCH", str(open_dir))
    with pytest.raises(StorageError, match=r"FLEETRL_SCRATCH=.*open belongs to another user or others can write"):
        storage.scratch_root()


def test_a_remote_run_mirrors_its_logs_in_this_users_scratch(s3_server, tmp_path, monkeypatch):
    import os
    import tempfile

    import s3fs

    monkeypatch.delenv("FLEETRL_SCRATCH", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    s3fs.S3FileSystem(**s3_server).mkdir("mirrors")
    run_dir = RunDir(_cfg("s3://mirrors/exp", s3_server))
    assert run_dir.path == tmp_path / f"fleetrl-{os.getuid()}" / "fleetrl-runs" / "r1"


def test_adapter_root_defaults_to_this_users_own_directory(tmp_path, monkeypatch):
    import os

    from fleetrl.rollout import worker

    monkeypatch.setattr(worker.os, "access", lambda path, mode: False)  # no /dev/shm: the temp dir
    monkeypatch.setattr(worker.tempfile, "gettempdir", lambda: str(tmp_path))
    root = worker.adapter_root(2)
    assert root == str(tmp_path / f"fleetrl-{os.getuid()}" / f"fleetrl-lora-w2-pid{os.getpid()}")
