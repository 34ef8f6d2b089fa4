"""Checking after a weight sync that a worker holds exactly the learner's weights (issue 24).

Each side reduces every tensor to a *checksum*: ``(sum, sum of |x|, sum of x**2)`` in float64.
All three are sums over elements, so the checksum of a concatenation is the sum of its parts'
checksums: vLLM fuses Hugging Face tensors (``q_proj``/``k_proj``/``v_proj`` into ``qkv_proj``,
``gate_proj``/``up_proj`` into ``gate_up_proj``) and pads embedding rows with zeros, and its
loaded parameter's checksum still equals the sum of the sent tensors' checksums. The receiver
reads its model's parameters back AFTER the reload (what the model will compute with), names
the Hugging Face tensors each one holds (``loaded_groups``), and ``compare_checksums`` checks
every group against the learner's checksums within a tolerance set by the two dtypes.

A reduction over elements cannot see two elements swapped inside one tensor; it catches a
corrupted value, a tensor or layer left out of the reload and a missed update (the faults the
tests inject, ``apply_fault``). What it cannot see (elements moved inside a tensor, parameters the
engine cannot read back, an adapter that loads differently from what was sent) the *log-prob
probe* covers: a few fixed tokens scored by the learner and by every worker, whose mean absolute
log-prob difference must stay within a tolerance set by the two dtypes (``probe_tolerance``).

Only torch here: no Ray, no vLLM, no fleetrl imports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

Checksum = tuple[float, float, float]  # (sum, sum |x|, sum x**2), float64

# What the checksums after a reload must catch; interrupt_reload instead breaks the reload halfway
# (the worker must then take itself out of service: rollout/worker.py, PARTIAL_RELOAD).
CHECKSUM_FAULTS = ("corrupt_bucket", "skip_tensor", "stale_layer", "miss_update")
# What only the log-prob probe can catch: the checksums of a tensor whose rows were permuted are its own.
PROBE_FAULTS = ("permute_rows",)
FAULTS = (*CHECKSUM_FAULTS, *PROBE_FAULTS, "interrupt_reload")
FAULT_ENV = "FLEETRL_WEIGHT_FAULT"

# Relative tolerance per dtype: bit-identical values differ only by float64 summation order;
# a cast on the way (fp32 sent, bf16 loaded) rounds every element by up to its dtype's epsilon.
_CAST_RTOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
_SAME_RTOL = 1e-9

# Mean |log p_fleet - log p_learner| over the probe's tokens allowed per dtype (the coarser of the
# two sides'). Measured: ~6e-6 for fp32 on the CPU (vLLM vs the learner, SmolLM2); bf16 serving
# differs by ~0.01-0.02 in healthy runs and by 0.2 with weights never synced (TRL #5312). A fault
# the probe is there for (a layer scrambled, a weight lost) moves it by ~1 or gives NaN.
_PROBE_TOL = {"float32": 0.01, "float16": 0.05, "bfloat16": 0.1}


@torch.no_grad()
def tensor_checksum(t: torch.Tensor) -> Checksum:
    """``(sum, sum |x|, sum x**2)`` of a tensor, accumulated in float64 (deterministic).

    The reductions accumulate in float64 as they read the tensor (``dtype=torch.float64``), with no
    float64 copy of it: ~6x faster on the CPU than casting first, and as exact (issue 24)."""
    x = t.detach().reshape(-1)
    f64 = torch.float64
    return (float(x.sum(dtype=f64)), float(torch.linalg.vector_norm(x, 1, dtype=f64)),
            float(torch.linalg.vector_norm(x, 2, dtype=f64)) ** 2)


def checksums(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Checksum]:
    return {name: tensor_checksum(t) for name, t in named}


def checksum_rtol(sent_dtype: str, loaded_dtype: str) -> float:
    """How far two checksums of the same weights may differ, relative to their size."""
    if sent_dtype == loaded_dtype:
        return _SAME_RTOL
    return max(_CAST_RTOL.get(sent_dtype, 1e-2), _CAST_RTOL.get(loaded_dtype, 1e-2))


def probe_tolerance(*dtypes: str) -> float:
    """The probe's allowed mean absolute log-prob difference for these dtypes (unknown: bf16's)."""
    return max(_PROBE_TOL.get(str(d).removeprefix("torch."), _PROBE_TOL["bfloat16"]) for d in dtypes)


def probe_diff(learner: Sequence[float], fleet: Sequence[float]) -> tuple[float, float]:
    """(mean, max) of |learner - fleet| over the probe's tokens; inf when either side is not finite."""
    a = torch.as_tensor(learner, dtype=torch.float64)
    b = torch.as_tensor(fleet, dtype=torch.float64)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"probe log-probs of {a.numel()} and {b.numel()} tokens: both sides must score the "
                         "same non-empty token list")
    d = (a - b).abs()
    if not torch.isfinite(d).all():
        return float("inf"), float("inf")
    return float(d.mean()), float(d.max())


def unfuse_name(name: str, packed: Mapping[str, Sequence[str]]) -> list[str]:
    """The Hugging Face names a vLLM parameter holds: ``a.qkv_proj.weight`` -> its q/k/v names."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            return [".".join(parts[:i] + [sub] + parts[i + 1:]) for sub in packed[part]]
    return [name]


def compare_checksums(expected: Mapping[str, Checksum], sent_dtype: Mapping[str, str],
                      loaded: Mapping[str, tuple[Checksum | None, str, Sequence[str]]],
                      ) -> tuple[list[str], list[str], list[str]]:
    """Compare the learner's per-tensor checksums with a worker's loaded parameters.

    ``loaded`` maps a loaded parameter's name to (its checksum, its dtype, the Hugging Face names it
    holds); checksum None: the parameter cannot be read back (vLLM's CPU backend repacks linear
    weights into oneDNN handles and leaves an empty tensor). A group is checked when every one of its
    names was sent. Returns (mismatched parameters with the reason, sent names held by unreadable
    parameters, sent names no loaded parameter holds).
    """
    bad: list[str] = []
    covered: set[str] = set()
    unreadable: list[str] = []
    for pname, (got, dtype, names) in loaded.items():
        names = list(names)
        if not names or any(n not in expected for n in names):
            continue
        covered.update(names)
        if got is None:
            unreadable.extend(names)
            continue
        want = [sum(expected[n][k] for n in names) for k in range(3)]
        rtol = max(checksum_rtol(sent_dtype[n], dtype) for n in names)
        scale_abs = max(want[1], got[1], 1e-30)
        for k, what, scale in ((0, "sum", scale_abs), (1, "sum|x|", scale_abs),
                               (2, "sum x^2", max(want[2], got[2], 1e-30))):
            if not abs(want[k] - got[k]) <= rtol * scale:  # `not <=`: NaN fails too
                bad.append(f"{pname}: {what} {got[k]:.9g} != learner's {want[k]:.9g} (rtol {rtol:g})")
                break
    missing = [n for n in expected if n not in covered]
    return bad, unreadable, missing


def parse_fault(spec: str | None) -> list[tuple[str, int | None]]:
    """FLEETRL_WEIGHT_FAULT: comma-separated ``kind`` or ``kind@version`` (e.g. ``stale_layer@1,miss_update@2``)."""
    out = []
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        kind, _, version = item.strip().partition("@")
        if kind not in FAULTS or (version and not version.isdigit()):
            raise ValueError(f"{FAULT_ENV}={spec!r}: each fault must be one of {', '.join(FAULTS)}, optionally "
                             "@<version> (e.g. corrupt_bucket@1), several separated by commas")
        out.append((kind, int(version) if version else None))
    return out


def apply_fault(kind: str, weights: list[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    """Tests only: what a faulty sync would hand vLLM's reload instead of ``weights``.

    corrupt_bucket: a received value is damaged (the first tensor's first element shifted by 1);
    skip_tensor: one tensor (the middle one) is left out of the reload; stale_layer: every tensor of
    the first transformer layer is left out (the reload leaves that layer on its old weights);
    miss_update: nothing is reloaded. Tensors left out keep the worker's previous values.
    permute_rows: the rows of every matrix of the first transformer layer are reversed (the values
    and so the checksums are the same; what the layer computes is not).
    interrupt_reload: half of the tensors arrive, then the stream breaks (as a broadcast that fails
    while the reload is taking its tensors).
    """
    if kind == "corrupt_bucket":
        name, t = weights[0]
        bad = t.clone()
        flat = bad.view(-1)
        flat[0] = flat[0] + 1.0
        return [(name, bad)] + weights[1:]
    if kind == "skip_tensor":
        mid = len(weights) // 2
        return weights[:mid] + weights[mid + 1:]
    if kind == "stale_layer":
        layer = _first_layer(weights)
        return [(n, t) for n, t in weights if layer is None or layer not in n]
    if kind == "miss_update":
        return []
    if kind == "permute_rows":
        layer = _first_layer(weights)
        return [(n, t.flip(0) if t.dim() == 2 and layer is not None and layer in n else t) for n, t in weights]
    if kind == "interrupt_reload":
        return _broken_halfway(weights)
    raise ValueError(f"unknown weight fault {kind!r}: one of {', '.join(FAULTS)}")


def _first_layer(weights: list[tuple[str, torch.Tensor]]) -> str | None:
    """``.layers.<i>.`` of the first transformer layer among the names (None: no layers)."""
    return next((f".layers.{n.split('.layers.')[1].split('.')[0]}." for n, _ in weights if ".layers." in n), None)


def _broken_halfway(weights: list[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    yield from weights[: len(weights) // 2]
    raise RuntimeError("injected fault interrupt_reload: the weights stopped arriving halfway")
