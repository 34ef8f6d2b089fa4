"""Shared fixtures. End-to-end tests use a real local Ray, kept on loopback."""

import os

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
