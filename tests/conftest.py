"""Shared fixtures: one local Ray kept on loopback, and the tiny models, both once per session."""

import os
from pathlib import Path

import pytest

# Ray 2.60 binds the machine's public address unless told otherwise (ENVIRONMENT.md); tests may
# only talk to 127.0.0.0/8. vLLM CPU engines in tests get a small KV cache.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, namespace="fleetrl-tests")
    yield ray
    ray.shutdown()


# The built-in tiny models, built once (ensure_tiny_model keeps them in FLEETRL_CACHE, default
# ~/.cache/fleetrl, the same place the example configs' `model.path: tiny` resolves to, so a session
# builds each at most once and later sessions reuse it). Read-only: a test that changes a model
# copies it first. tests/unit/test_tiny.py builds its own on purpose (it tests the builder).
@pytest.fixture(scope="session")
def tiny_policy() -> Path:
    """The tiny Qwen2 causal LM, seed 0 (what `model.path: tiny` is)."""
    from fleetrl.testing.tiny import ensure_tiny_model

    return ensure_tiny_model("policy", seed=0)


@pytest.fixture(scope="session")
def tiny_policy_seed1() -> Path:
    """A second tiny causal LM, same shape and tokenizer, other weights (seed 1): a weight-sync target."""
    from fleetrl.testing.tiny import ensure_tiny_model

    return ensure_tiny_model("policy", seed=1)


@pytest.fixture(scope="session")
def tiny_reward() -> Path:
    """The tiny Qwen2 sequence classifier (one scalar score), seed 0 (what `tiny-reward` is)."""
    from fleetrl.testing.tiny import ensure_tiny_model

    return ensure_tiny_model("reward", seed=0)


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on a free loopback port, for the session. Yields the
    ``run.storage_options`` that reach it; make a bucket with ``s3fs.S3FileSystem(**options).mkdir``."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test-key-id", "secret": "test-secret-key",
           "client_kwargs": {"region_name": "eu-west-1"}}
    server.stop()
