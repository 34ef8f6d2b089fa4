"""The chunked log-prob head (learner/forward.py: chunked_head) against the full logits, in fp32:
same log-probs, entropies, losses and gradients, for a plain model, packed rows, a PEFT model and
the adapter-off reference; and the models it must leave to the unchunked path."""

import pytest
import torch

from fleetrl.learner.forward import _ChunkedHead, causal_lm_of, token_logps


@pytest.fixture(scope="module")
def model(tiny_policy):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    # A trained-looking head: random-init logits are nearly flat, which would hide errors.
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(8.0)
    return m


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (3, 19), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :5] = 0  # left padding
    attn[2, 15:] = 0  # right padding
    return ids, attn


def _loss_and_grads(model, chunk, entropy="grad", pack=False, temperature=1.0):
    model.zero_grad()
    ids, attn = _batch(model.config.vocab_size)
    logp, ent = token_logps(model, ids, attn, torch.device("cpu"), temperature, entropy, pack=pack,
                            chunk_tokens=chunk)
    loss = -(logp * attn).sum() / attn.sum() - 0.1 * (ent * attn).sum() / attn.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), loss.detach(), grads


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("pack", [False, True])
def test_chunked_matches_full_logits(model, chunk, pack):
    full = _loss_and_grads(model, 0, pack=pack, temperature=0.7)
    chunked = _loss_and_grads(model, chunk, pack=pack, temperature=0.7)
    torch.testing.assert_close(chunked[0], full[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(chunked[1], full[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(chunked[2], full[2], rtol=0, atol=1e-6)
    assert full[3].keys() == chunked[3].keys() and full[3]
    for name, g in full[3].items():
        torch.testing.assert_close(chunked[3][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_detached_entropy_and_no_grad(model):
    ids, attn = _batch(model.config.vocab_size)
    dev = torch.device("cpu")
    logp, ent = token_logps(model, ids, attn, dev, 1.0, "detached", chunk_tokens=5)
    assert logp.requires_grad and not ent.requires_grad
    with torch.no_grad():
        ref, _ = token_logps(model, ids, attn, dev, 1.0, chunk_tokens=0)
    torch.testing.assert_close(logp.detach(), ref, rtol=0, atol=1e-5)
    # The head is put back: a plain forward gives logits again.
    assert model(input_ids=ids[:1, :4]).logits.shape[-1] == model.config.vocab_size


def test_chunked_under_peft_and_adapter_off_reference(tiny_policy):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fleetrl.learner.lora import AdapterDisabled

    base = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    assert causal_lm_of(peft_model) is base
    ref = AdapterDisabled(peft_model, peft_model)
    assert causal_lm_of(ref) is base
    ids, attn = _batch(base.config.vocab_size)
    dev = torch.device("cpu")
    for fn in (peft_model, ref):
        a, _ = token_logps(fn, ids, attn, dev, 1.0, chunk_tokens=4)
        b, _ = token_logps(fn, ids, attn, dev, 1.0, chunk_tokens=0)
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-5)
    on, _ = token_logps(peft_model, ids, attn, dev, 1.0, chunk_tokens=4)
    off, _ = token_logps(ref, ids, attn, dev, 1.0, chunk_tokens=4)
    assert (on - off).abs().max() > 1e-4  # the adapter really was off for the reference


def test_models_the_chunked_head_leaves_alone(model):
    class NotAnLM(torch.nn.Module):
        def forward(self, **kwargs):
            raise AssertionError("unused")

    assert causal_lm_of(NotAnLM()) is None
    assert causal_lm_of(lambda **kw: None) is None
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: the head's output is not the logits
    try:
        assert causal_lm_of(model) is None
    finally:
        del model.config.final_logit_softcapping
    assert causal_lm_of(model) is model


def test_chunked_head_short_rows():
    head = torch.nn.Linear(4, 11, bias=False)
    out = _ChunkedHead(head, torch.tensor([[3]]), 1.0, True, 2)(torch.randn(1, 1, 4))
    assert out.shape == (1, 1, 2) and out.abs().sum() == 0


def test_the_learners_deepspeed_engine_takes_the_chunked_head(tiny_policy):
    # DeepSpeedEngine forwards attribute lookups to its model, so it looked like an LM whose head is
    # not its child: the chunked head was silently off for every full fine-tuning learner.
    import subprocess
    import sys

    script = f"""
import torch
from fleetrl.learner.deepspeed_utils import free_port
from fleetrl.learner.forward import causal_lm_of
from fleetrl.learner.rank import Learner
cfg = {{"num_ranks": 1, "num_cpus_per_rank": 1, "zero_stage": 2, "micro_batch_size": 2, "reference": True,
        "loss": {{"kl_coef": 0.0}}}}
learner = Learner(cfg, {str(tiny_policy)!r}, 0, 1, "127.0.0.1", free_port(), None, 2)
engine = learner.engine
assert type(engine.policy).__name__ == "DeepSpeedEngine", type(engine.policy)
assert causal_lm_of(engine.policy) is engine.policy.module
assert causal_lm_of(engine.reference()) is not None
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
