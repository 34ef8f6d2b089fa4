"""Outputs a cluster keeps: an online run whose run.output_dir is an s3:// URI on an S3-compatible
server started on loopback (moto), stopped gracefully with `fleetrl stop --graceful`, then resumed
with `fleetrl train --resume RUN_DIR` from what is in the bucket.

One short tiny-GRPO run (one rollout worker, small steps) checks: durable checkpoints and the final
model land in the bucket with COMPLETE last and every rank's manifest; run.keep_last prunes older
checkpoints; logs and the redacted config are there; the graceful stop ends the run early, with a
checkpoint at its last step, exit 0, and the STOP request cleared; the resume continues from that
checkpoint (loaded with weights_only=True) and its weight versions and steps follow on exactly.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from fleetrl import cli
from fleetrl.core.storage import Storage
from fleetrl.run.config import load_config
from fleetrl.run.runtime import RunDir, resume_config
from fleetrl.train import train

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml"


def test_s3_run_dir_graceful_stop_and_resume(tmp_path, ray_local, s3_server, monkeypatch):
    import s3fs

    s3fs.S3FileSystem(**s3_server).mkdir("fleetrl-e2e")
    # `fleetrl stop --graceful` (another process, in real life) reaches the bucket through the AWS
    # environment variables; the run itself uses run.storage_options.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("FLEETRL_SCRATCH", str(tmp_path / "scratch"))  # the driver's local log mirror
    monkeypatch.setattr(RunDir, "STOP_POLL_S", 0.0)  # look for STOP every step (5 s apart by default)
    uri = "s3://fleetrl-e2e/runs/g"
    store = Storage(s3_server)
    options = [f"run.storage_options.{k}={v}" for k, v in s3_server.items() if k != "client_kwargs"]
    options.append("run.storage_options.client_kwargs.region_name=eu-west-1")
    small = ["rollout.num_workers=1", "rl.prompts_per_step=4", "rl.group_size=4", "learner.micro_batch_size=16",
             "rollout.sampling.max_tokens=8", "rl.max_staleness=0", "run.keep_last=1", "run.checkpoint_every=2"]
    cfg = load_config(EXAMPLE, ["run.output_dir=s3://fleetrl-e2e/runs", "run.name=g", "run.steps=40",
                                *options, *small])

    # Ask for a graceful stop once the run has finished its first step (seen in its local log mirror).
    metrics = tmp_path / "scratch" / "fleetrl-runs" / "g" / "metrics.jsonl"
    stop_rc = []

    def stop_when_running():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.2)
        stop_rc.append(cli.main(["stop", "--graceful", uri]))

    stopper = threading.Thread(target=stop_when_running, daemon=True)
    stopper.start()
    assert train(cfg, config_path=EXAMPLE) == uri
    stopper.join(timeout=30)
    assert stop_rc == [0]

    rows = [json.loads(line) for line in store.read_text(f"{uri}/metrics.jsonl").splitlines()]
    stopped_at = rows[-1]["step"]
    assert 1 <= stopped_at < 40 and [r["step"] for r in rows] == list(range(1, stopped_at + 1))
    assert not store.exists(f"{uri}/STOP")  # the request was honoured and cleared
    # keep_last=1: only the checkpoint of the last step is left, complete, with the rank's manifest.
    assert store.listdir(f"{uri}/checkpoints") == [f"step-{stopped_at:06d}"]
    ckpt = store.file_sizes(f"{uri}/checkpoints/step-{stopped_at:06d}")
    assert {"COMPLETE", ".manifest-rank-0.json", "collector.json", "latest"} <= set(ckpt)
    assert any(k.endswith("optim_states.pt") for k in ckpt)
    final = store.file_sizes(f"{uri}/final_model")
    assert {"COMPLETE", "config.json", "model.safetensors", "tokenizer.json"} <= set(final)
    saved = store.read_text(f"{uri}/config.yaml")
    assert s3_server["secret"] not in saved and "<redacted>" in saved
    assert "stop requested" in store.read_text(f"{uri}/train.log")

    # Resume by run directory: the saved config (secrets back as overrides), one more step.
    again = resume_config(uri, options + [f"run.steps={stopped_at + 1}"])
    assert train(again) == uri
    rows = [json.loads(line) for line in store.read_text(f"{uri}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == list(range(1, stopped_at + 2))
    assert [r["weight_version"] for r in rows] == list(range(1, stopped_at + 2))
    assert store.listdir(f"{uri}/checkpoints") == [f"step-{stopped_at + 1:06d}"]
    assert f"resumed from {uri}/checkpoints/step-{stopped_at:06d}" in store.read_text(f"{uri}/train.log")
