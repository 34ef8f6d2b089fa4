"""Tiny models built locally: no model hub is reachable from tests, CI or the CPU demo.

`build_tiny_model` writes a random-init Qwen2-style model plus a byte-level BPE tokenizer
trained here on the built-in task corpus (fleetrl/testing/tasks.py). The shape defaults are the
ones known to run in vLLM's CPU build (docs: ENVIRONMENT.md): head_dim 64, fp32, 1 KV head.
`ensure_tiny_model` builds once into a cache; `resolve_model_path` maps the names "tiny",
"tiny-policy" and "tiny-reward" used by examples and tests to cached paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fleetrl.testing.tasks import TOKENIZER_CORPUS

# Bump when the build output changes for the same parameters (invalidates every cache entry).
BUILDER_VERSION = 2
MARKER_FILE = "fleetrl_tiny.json"

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS_TOKEN = IM_END  # one stop token for raw and chat completions alike
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, IM_START, IM_END)  # ids 0..3 in this order

# ChatML-like. The tokenizer does not add BOS: prompts are exactly what the template renders.
CHAT_TEMPLATE = (
    # Tool schemas (an environment's `tools`) as a first system turn, so a tool environment runs here.
    "{%- if tools -%}{{ '<|im_start|>system\n# Tools\n' + (tools | tojson) + '<|im_end|>\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# vLLM's CPU attention supports head sizes 32, 64, 80, ... (not 16); we pick 64, else 32.
_HEAD_DIMS = (64, 32)
MAX_POSITION_EMBEDDINGS = 1024
KINDS = ("policy", "reward")


def _head_dim_for(hidden_size: int) -> int:
    for head_dim in _HEAD_DIMS:
        if hidden_size % head_dim == 0:
            return head_dim
    raise ValueError(
        f"build_tiny_model: hidden_size={hidden_size} must be a multiple of 32 (head_dim 64 or 32; "
        "vLLM's CPU attention rejects smaller heads). Use e.g. hidden_size=128 or 256."
    )


def _validate(hidden_size: int, num_layers: int, vocab_size: int, seed: int) -> None:
    for name, value, low in (("hidden_size", hidden_size, 32), ("num_layers", num_layers, 1),
                             ("vocab_size", vocab_size, 300), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            hint = " (the byte-level alphabet alone is 256 tokens plus 4 special tokens)" \
                if name == "vocab_size" else ""
            raise ValueError(f"build_tiny_model: {name} must be an int >= {low}, got {value!r}{hint}")
    _head_dim_for(hidden_size)


def build_params(seed: int = 0, reward_model: bool = False, hidden_size: int = 128,
                 num_layers: int = 2, vocab_size: int = 512) -> dict[str, Any]:
    """The parameters that fully determine a build (also written to the marker file)."""
    corpus_sha = hashlib.sha256("\n".join(TOKENIZER_CORPUS).encode()).hexdigest()
    return {
        "builder_version": BUILDER_VERSION,
        "kind": "reward" if reward_model else "policy",
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "vocab_size": vocab_size,
        "corpus_sha256": corpus_sha,
    }


def train_tokenizer(vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on the built-in corpus (deterministic).

    transformers 5 loads any `model_type: qwen2` tokenizer through `Qwen2Tokenizer`, which
    rebuilds the normalizer and pre-tokenizer from its own defaults (so does vLLM, via
    AutoTokenizer). We train with exactly those, taken from that class, so that every loader
    (AutoTokenizer, vLLM, raw `tokenizers`) produces the same ids.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    reference = Qwen2Tokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer = reference.normalizer
    tok.pre_tokenizer = reference.pre_tokenizer
    tok.decoder = reference.decoder
    tok.post_processor = reference.post_processor
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        padding_side="left",  # generation-friendly; learners pad explicitly anyway
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, reward_model: bool = False,
                     hidden_size: int = 128, num_layers: int = 2, vocab_size: int = 512) -> Path:
    """Write a random-init Qwen2 model + locally trained tokenizer into `out_dir`; returns it.

    Same arguments give byte-identical files. `reward_model=True` writes a
    `Qwen2ForSequenceClassification` with one label (a scalar score) and the same tokenizer.
    """
    _validate(hidden_size, num_layers, vocab_size, seed)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    real_vocab = len(tokenizer)
    head_dim = _head_dim_for(hidden_size)
    ids = {name: tokenizer.convert_tokens_to_ids(tok)
           for name, tok in (("pad", PAD_TOKEN), ("bos", BOS_TOKEN), ("eos", EOS_TOKEN))}
    config = Qwen2Config(
        vocab_size=real_vocab,  # never sample an id the tokenizer cannot decode
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=not reward_model,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        use_sliding_window=False,
        dtype="float32",
    )
    if reward_model:
        config.num_labels = 1  # one scalar score per sequence
        config.architectures = ["Qwen2ForSequenceClassification"]
    # Init on a private generator state so building never perturbs the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = Qwen2ForSequenceClassification if reward_model else Qwen2ForCausalLM
        model = cls(config).to(torch.float32)
    if not reward_model:
        gen = model.generation_config
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    params = build_params(seed, reward_model, hidden_size, num_layers, vocab_size)
    params["tokenizer_vocab_size"] = real_vocab
    params["num_parameters"] = sum(p.numel() for p in model.parameters())
    (out / MARKER_FILE).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLEETRL_CACHE") or Path.home() / ".cache" / "fleetrl")


def ensure_tiny_model(kind: str = "policy", cache_dir: str | os.PathLike | None = None,
                      seed: int = 0, **shape: int) -> Path:
    """Path of the cached tiny model of `kind`, built on first use.

    Safe under concurrent callers: each builds into its own temp dir and renames it into place;
    the loser of the race discards its copy (the builds are byte-identical anyway).
    """
    if kind not in KINDS:
        raise ValueError(f"ensure_tiny_model: kind must be one of {KINDS}, got {kind!r}")
    # `shape`: hidden_size / num_layers / vocab_size of build_tiny_model (the benchmarks' bigger models).
    params = build_params(seed=seed, reward_model=kind == "reward", **shape)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "tiny-models" / f"{kind}-seed{seed}-{key}"
    if (final / MARKER_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_tiny_model(tmp, seed=seed, reward_model=kind == "reward", **shape)
        try:
            os.rename(tmp, final)  # atomic on one filesystem; fails if `final` already exists
        except OSError:
            if not (final / MARKER_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


TINY_NAMES = {"tiny": "policy", "tiny-policy": "policy", "tiny-reward": "reward"}


def resolve_model_path(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """Map "tiny" / "tiny-policy" / "tiny-reward" to a built cached model; other values unchanged."""
    kind = TINY_NAMES.get(str(name_or_path))
    if kind is None:
        return name_or_path
    return str(ensure_tiny_model(kind))
