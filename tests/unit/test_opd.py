"""OPD's per-token advantage, by hand."""

from __future__ import annotations

import pytest
import torch

from fleetrl.algos import ONLINE_ALGORITHMS
from fleetrl.algos.opd import opd_advantages


def test_opd_advantage_is_minus_the_reverse_kl_by_hand():
    student = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -0.2, -3.0, 0.0]])
    teacher = torch.tensor([[0.0, -0.5, -4.0, -0.1], [0.0, -1.2, -1.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    adv, rkl = opd_advantages(student, teacher, mask)
    # row 0: -1-(-0.5) = -0.5, -2-(-4) = 2, -0.5-(-0.1) = -0.4; row 1: -0.2-(-1.2) = 1, -3-(-1) = -2
    assert torch.allclose(rkl, torch.tensor([[0.0, -0.5, 2.0, -0.4], [0.0, 1.0, -2.0, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[0.0, 0.5, -2.0, 0.4], [0.0, -1.0, 2.0, 0.0]]))
    mixed, _ = opd_advantages(student, teacher, mask, torch.tensor([1.0, -2.0]), reward_weight=0.5)
    # + 0.5 * 1 on row 0's tokens, + 0.5 * -2 on row 1's, nothing off the mask
    assert torch.allclose(mixed, torch.tensor([[0.0, 1.0, -1.5, 0.9], [0.0, -2.0, 1.0, 0.0]]))


def test_opd_refusals():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one shape"):
        opd_advantages(x, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="no group advantages"):
        opd_advantages(x, x, torch.ones(2, 3), reward_weight=1.0)
    assert ONLINE_ALGORITHMS.get("opd").advantage == "reverse_kl"


def test_opd_config_and_the_teacher_tokenizer_check(tmp_path, tiny_policy):
    """opd needs a teacher section; check time refuses a teacher whose tokenizer is not the student's."""
    import shutil

    from transformers import AutoTokenizer

    from fleetrl.run.check import CheckError, check_run
    from fleetrl.run.config import ConfigError, load_config

    example = "examples/opd_tiny.yaml"
    with pytest.raises(ConfigError, match="opd distills a teacher: set teacher.model_path"):
        load_config(example, ["teacher=null"])
    with pytest.raises(ConfigError, match="the teacher section is for opd"):
        load_config("examples/grpo_tiny.yaml", ["teacher.model_path=tiny"])
    with pytest.raises(ConfigError, match="needs rl.group_size >= 2"):
        load_config(example, ["opd.reward_weight=0.5", "rl.group_size=1", "learner.micro_batch_size=16"])

    same = tmp_path / "same"
    shutil.copytree(tiny_policy, same)
    other = tmp_path / "other"
    shutil.copytree(tiny_policy, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<not-the-students>"])
    tok.save_pretrained(other)
    base = [f"model.path={tiny_policy}", f"run.output_dir={tmp_path / 'runs'}"]
    report = check_run(load_config(example, base + [f"teacher.model_path={same}"]), example, cluster=False)
    assert any("teacher: " in n and "same tokenizer as the student" in n for n in report.notes), report.notes
    with pytest.raises(CheckError, match=r"teacher: teacher.model_path=.*other has a different tokenizer from the "
                                         r"student's .*its vocabulary differs"):
        check_run(load_config(example, base + [f"teacher.model_path={other}"]), example, cluster=False)


def test_teacher_gives_the_learners_token_logprobs(tiny_policy):
    """The Teacher actor's class, in this process: the frozen model's log-probs of each token given the
    ones before it, 0 on the first token and on padding, the same in one micro-batch or several."""
    from transformers import AutoModelForCausalLM

    from fleetrl.learner.teacher import Teacher

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 0]])
    attn = (ids != 0).long()
    one, split = Teacher(str(tiny_policy), micro_batch_size=8), Teacher(str(tiny_policy), micro_batch_size=1)
    logp = one.compute_logprobs({"input_ids": ids, "attention_mask": attn})
    assert torch.allclose(logp, split.compute_logprobs({"input_ids": ids, "attention_mask": attn}), atol=1e-5)
    assert logp[:, 0].eq(0).all() and logp[1, 2:].eq(0).all() and logp[2, 3] == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_policy).float().eval()
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids[:1]).logits.float(), -1)
    expected = full[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert torch.allclose(logp[0, 1:], expected, atol=1e-5)
    assert not any(p.requires_grad for p in one.model.parameters())
