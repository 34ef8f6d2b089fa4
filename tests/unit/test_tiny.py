"""Tiny locally built models (orchestrator/tiny.py) and the built-in tasks (orchestrator/tasks.py)."""

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fleetrl.testing import tasks, tiny

SAMPLE_TEXTS = [
    "Write the letter b many times:",
    " bbbbbbbb",
    " e e e e",
    "What is 12 plus 30? 12 + 30 = 42. #### 42",
    "hello  world\n\n  tabs\tand unicode: café ✓",
    "<|im_start|>user\nSay c over and over:<|im_end|>\n<|im_start|>assistant\n",
]


def _letter_fraction(text: str, letter: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c == letter for c in chars) / len(chars) if chars else 0.0


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny.build_tiny_model(tmp_path_factory.mktemp("policy"), seed=0)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    return tiny.build_tiny_model(tmp_path_factory.mktemp("reward"), seed=0, reward_model=True)


# ---------------------------------------------------------------- build_tiny_model


def test_policy_loads_with_known_good_shape(policy_dir):
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 2, 1)
    assert (cfg.head_dim, cfg.num_hidden_layers, cfg.intermediate_size) == (64, 2, 256)
    assert cfg.max_position_embeddings >= 256 and cfg.tie_word_embeddings
    assert next(model.parameters()).dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    marker = json.loads((policy_dir / tiny.MARKER_FILE).read_text())
    assert marker["kind"] == "policy" and marker["builder_version"] == tiny.BUILDER_VERSION
    assert marker["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_tokenizer_special_tokens_and_generation_config(policy_dir):
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    assert len(tok) == model.config.vocab_size == 512
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert None not in ids and len(ids) == 3
    assert tok.eos_token == tiny.IM_END and tok.pad_token == tiny.PAD_TOKEN
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id
    # No BOS is inserted: the prompt tokens are exactly the text's tokens.
    assert tok("Say a over and over:").input_ids[0] != tok.bos_token_id


def test_chat_template_renders(policy_dir):
    tok = AutoTokenizer.from_pretrained(policy_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say a:"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay a:<|im_end|>\n"
                    "<|im_start|>assistant\n")
    no_gen = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_gen == text[: -len("<|im_start|>assistant\n")]
    ids = tok(text).input_ids
    assert ids.count(tok.convert_tokens_to_ids(tiny.IM_START)) == 3
    assert ids.count(tok.eos_token_id) == 2


def test_every_loader_tokenizes_alike(policy_dir):
    """AutoTokenizer (what vLLM uses) swaps in Qwen2Tokenizer; its ids must equal the trained file's."""
    auto = AutoTokenizer.from_pretrained(policy_dir)
    raw = Tokenizer.from_file(str(policy_dir / "tokenizer.json"))
    for text in SAMPLE_TEXTS:
        assert auto(text).input_ids == raw.encode(text).ids, text
        assert auto.decode(auto(text).input_ids) == text


def test_task_text_tokenizes_compactly(policy_dir):
    tok = AutoTokenizer.from_pretrained(policy_dir)
    for letter in tasks.LETTERS:
        assert len(tok(" " + letter).input_ids) == 1
        assert len(tok(" " + letter * 8).input_ids) <= 2  # runs are merged tokens
    assert len(tok("Write the letter b many times:").input_ids) <= 8


def test_policy_forward_and_generate(policy_dir):
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    batch = tok(["Say a over and over:", "Write the letter b many times:"], return_tensors="pt",
                padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert logits.shape == (2, batch.input_ids.shape[1], 512)
    assert torch.isfinite(logits).all()
    assert out.shape[0] == 2 and out.shape[1] > batch.input_ids.shape[1]


def test_same_seed_identical_bytes_other_seed_differs(policy_dir, tmp_path):
    again = tiny.build_tiny_model(tmp_path / "again", seed=0)
    other = tiny.build_tiny_model(tmp_path / "other", seed=1)
    assert _digests(again) == _digests(policy_dir)
    assert (again / "model.safetensors").read_bytes() == (policy_dir / "model.safetensors").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (policy_dir / "model.safetensors").read_bytes()
    # The tokenizer does not depend on the seed.
    assert (other / "tokenizer.json").read_bytes() == (policy_dir / "tokenizer.json").read_bytes()


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_model(tmp_path, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_reward_model_scores(reward_dir, policy_dir):
    tok = AutoTokenizer.from_pretrained(reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    assert type(model).__name__ == "Qwen2ForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    assert (reward_dir / "tokenizer.json").read_bytes() == (policy_dir / "tokenizer.json").read_bytes()
    texts = ["Say a over and over: aaaa", "Write the letter b many times: b b b b b b b b b"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**batch).logits
        alone = torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])
    assert scores.shape == (2, 1)
    # Padding must not change a sequence's score (the model reads the last real token).
    torch.testing.assert_close(scores, alone, rtol=1e-4, atol=1e-5)
    assert json.loads((reward_dir / tiny.MARKER_FILE).read_text())["kind"] == "reward"


@pytest.mark.parametrize("kwargs, field", [
    ({"hidden_size": 48}, "hidden_size"),
    ({"hidden_size": 16}, "hidden_size"),
    ({"num_layers": 0}, "num_layers"),
    ({"vocab_size": 100}, "vocab_size"),
    ({"seed": -1}, "seed"),
    ({"hidden_size": 128.0}, "hidden_size"),
])
def test_bad_arguments_say_what_to_change(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        tiny.build_tiny_model(tmp_path / "x", **kwargs)
    assert "must be" in str(err.value)
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_hidden_size_not_multiple_of_64_uses_head_dim_32(tmp_path):
    path = tiny.build_tiny_model(tmp_path, hidden_size=96, num_layers=1)
    cfg = AutoModelForCausalLM.from_pretrained(path).config
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_hidden_layers) == (32, 3, 1)


# ---------------------------------------------------------------- cache and names


def test_ensure_tiny_model_builds_once(tmp_path):
    first = tiny.ensure_tiny_model("policy", cache_dir=tmp_path)
    weights = first / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    second = tiny.ensure_tiny_model("policy", cache_dir=tmp_path)
    assert second == first and weights.stat().st_mtime_ns == mtime
    reward = tiny.ensure_tiny_model("reward", cache_dir=tmp_path)
    seed1 = tiny.ensure_tiny_model("policy", cache_dir=tmp_path, seed=1)
    assert len({first, reward, seed1}) == 3
    # Only finished entries remain: no temp dirs left behind.
    assert sorted(p.name for p in (tmp_path / "tiny-models").iterdir()) == sorted(
        p.name for p in (first, reward, seed1))
    with pytest.raises(ValueError, match="kind"):
        tiny.ensure_tiny_model("critic", cache_dir=tmp_path)


def test_ensure_tiny_model_loses_race_gracefully(tmp_path, monkeypatch):
    """Another process finishes the same entry while we build: keep theirs, drop ours."""
    real_build = tiny.build_tiny_model
    cache = tmp_path / "cache"

    def build_then_someone_else_finishes(out_dir, **kwargs):
        real_build(out_dir, **kwargs)
        monkeypatch.setattr(tiny, "build_tiny_model", real_build)
        tiny.ensure_tiny_model("policy", cache_dir=cache)  # the "other process"

    monkeypatch.setattr(tiny, "build_tiny_model", build_then_someone_else_finishes)
    path = tiny.ensure_tiny_model("policy", cache_dir=cache)
    assert (path / tiny.MARKER_FILE).is_file()
    assert [p.name for p in (cache / "tiny-models").iterdir()] == [path.name]


def test_ensure_tiny_model_concurrent_threads(tmp_path):
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(tiny.ensure_tiny_model, "reward", tmp_path) for _ in range(3)]
        results = [f.result() for f in futures]  # re-raises any worker's error
    assert len(set(results)) == 1
    assert len(list((tmp_path / "tiny-models").iterdir())) == 1


def test_resolve_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETRL_CACHE", str(tmp_path))
    policy = tiny.resolve_model_path("tiny")
    assert policy == tiny.resolve_model_path("tiny-policy")
    assert Path(policy).parent == tmp_path / "tiny-models"
    assert json.loads((Path(policy) / tiny.MARKER_FILE).read_text())["kind"] == "policy"
    reward = tiny.resolve_model_path("tiny-reward")
    assert json.loads((Path(reward) / tiny.MARKER_FILE).read_text())["kind"] == "reward"
    for other in ("Qwen/Qwen2.5-0.5B", "/models/my-model", "./tiny"):
        assert tiny.resolve_model_path(other) == other


def test_default_cache_dir(monkeypatch):
    monkeypatch.delenv("FLEETRL_CACHE", raising=False)
    assert tiny.default_cache_dir() == Path.home() / ".cache" / "fleetrl"
    monkeypatch.setenv("FLEETRL_CACHE", "/somewhere")
    assert tiny.default_cache_dir() == Path("/somewhere")


# ---------------------------------------------------------------- tasks


@pytest.mark.parametrize("fn", [tasks.letters_task, tasks.sft_task, tasks.preference_task,
                                tasks.unpaired_task])
def test_tasks_deterministic_by_seed(fn):
    assert fn(20, seed=3) == fn(20, seed=3)
    assert fn(20, seed=3) != fn(20, seed=4)
    assert fn(0, seed=0) == []
    assert fn(5, seed=3) == fn(20, seed=3)[:5]  # a prefix does not depend on n
    with pytest.raises(ValueError, match="n must be"):
        fn(-1, seed=0)


def test_letters_task_rows():
    rows = tasks.letters_task(50, seed=0)
    assert {r["letter"] for r in rows} == set(tasks.LETTERS)
    for r in rows:
        assert set(r) == {"prompt", "letter"}
        assert f" {r['letter']}" in r["prompt"] and r["prompt"].endswith(":")


def test_sft_and_preference_follow_the_letters_rule():
    for r in tasks.sft_task(40, seed=1):
        assert _letter_fraction(r["completion"], r["letter"]) == 1.0
    for r in tasks.preference_task(40, seed=1):
        assert set(r) == {"prompt", "letter", "chosen", "rejected"}
        assert _letter_fraction(r["chosen"], r["letter"]) == 1.0
        assert _letter_fraction(r["rejected"], r["letter"]) == 0.0
        assert r["chosen"].startswith(" ") and r["rejected"].startswith(" ")


def test_unpaired_labels_match_quality():
    rows = tasks.unpaired_task(40, seed=2)
    assert {r["label"] for r in rows[:2]} == {True, False}
    for r in rows:
        assert isinstance(r["label"], bool)
        assert _letter_fraction(r["completion"], r["letter"]) == (1.0 if r["label"] else 0.0)


def test_tokenizer_corpus_covers_tasks():
    corpus = "\n".join(tasks.TOKENIZER_CORPUS)
    assert tasks.TOKENIZER_CORPUS == tuple(tasks.tokenizer_corpus())
    for needle in ("Write the letter a many times:", " eeee", "#### 42", "assistant", "0", "9"):
        assert needle in corpus


def test_write_jsonl_roundtrip(tmp_path):
    rows = tasks.preference_task(7, seed=0)
    path = tasks.write_jsonl(rows, tmp_path / "sub" / "prefs.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert os.path.getsize(path) > 0
