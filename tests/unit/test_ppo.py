"""PPO / REINFORCE++ pieces without Ray or DeepSpeed: per-token advantages from a padded batch,
value alignment, the value model's head, the critic's batch and config rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fleetrl.algos import ADVANTAGE_ESTIMATORS
from fleetrl.algos.kl import AdaptiveKLController, FixedKLController
from fleetrl.algos.reduce import masked_whiten
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.critic import align_values, load_value_model
from fleetrl.learner.critic_config import CriticConfig
from fleetrl.online.advantages import (
    completion_mask,
    critic_batch,
    make_kl_controller,
    token_advantages,
    token_kl,
)
from fleetrl.run.config import (
    ONLINE_ALGORITHMS,
    PLANNED_ALGORITHMS,
    ConfigError,
    PPOConfig,
    ReinforcePPConfig,
    config_from_dict,
    load_config,
)

T = torch.tensor
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def reinforce_pp_advantages(scores, kl, mask, kl_coef, gamma):
    return ADVANTAGE_ESTIMATORS.get("reinforce_pp")(scores, mask, kl=kl, kl_coef=kl_coef, gamma=gamma)[0]


def reinforce_pp_baseline_advantages(scores, group_size, kl, mask, kl_coef, gamma):
    estimator = ADVANTAGE_ESTIMATORS.get("reinforce_pp_baseline")
    return estimator(scores, mask, kl=kl, kl_coef=kl_coef, group_size=group_size, gamma=gamma)[0]


def close(a, b, tol=1e-5):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol), (a, b)


# Row 0 right-padded (prompt 0-1, completion 2-3, pad 4); row 1 left-padded (pad 0, prompt 1,
# completion 2-4). 9.0 marks values that must never reach a result.
MASK = T([[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]).bool()
KL = T([[9.0, 9.0, 0.5, 0.1, 9.0], [9.0, 9.0, 0.2, 0.0, 0.3]])
VALUES = T([[9.0, 9.0, 0.5, 0.8, 9.0], [9.0, 9.0, -1.0, -1.5, -1.0]])
SCORES = T([1.0, -2.0])


def test_ppo_reward_at_last_token_kl_per_token_and_gae_by_hand():
    # token rewards (coef 0.1): row 0: [-0.05, -0.01 + 1]; row 1: [-0.02, 0, -0.03 - 2]
    # gamma 1, lam 0.5. row 0: A3 = 0.99 - 0.8 = 0.19; A2 = (-0.05 + 0.8 - 0.5) + 0.5 * 0.19 = 0.345
    # row 1: A4 = -2.03 + 1 = -1.03; A3 = (0 - 1 + 1.5) + 0.5 * -1.03 = -0.015;
    #        A2 = (-0.02 - 1.5 + 1) + 0.5 * -0.015 = -0.5275
    section = PPOConfig(gamma=1.0, lam=0.5, whiten_advantages=False)
    out = token_advantages("gae", section, SCORES, MASK, KL, 0.1, values=VALUES)
    close(out.advantages, [[0, 0, 0.345, 0.19, 0], [0, 0, -0.5275, -0.015, -1.03]])
    close(out.returns, [[0, 0, 0.845, 0.99, 0], [0, 0, -1.5275, -1.515, -2.03]])
    m = out.metrics
    close(m["values/mean"], (0.5 + 0.8 - 1 - 1.5 - 1) / 5)
    close(m["kl/seq_mean"], ((0.5 + 0.1) + (0.2 + 0.0 + 0.3)) / 2)
    close(m["kl/coef"], 0.1)
    close(m["returns/mean"], (0.845 + 0.99 - 1.5275 - 1.515 - 2.03) / 5)
    close(m["advantage/mean"], (0.345 + 0.19 - 0.5275 - 0.015 - 1.03) / 5)
    assert "reward/clip_frac" not in m and "advantage/raw_mean" not in m


def test_ppo_whitens_over_valid_tokens_only_and_reports_raw_stats():
    out = token_advantages("gae", PPOConfig(gamma=1.0, lam=0.5), SCORES, MASK, KL, 0.1, values=VALUES)
    raw = token_advantages("gae", PPOConfig(gamma=1.0, lam=0.5, whiten_advantages=False), SCORES, MASK, KL,
                           0.1, values=VALUES)
    close(out.advantages, masked_whiten(raw.advantages, MASK))
    valid = out.advantages[MASK]
    close(valid.mean(), 0.0)
    close(valid.std(), 1.0, tol=1e-4)
    assert (out.advantages[~MASK] == 0).all()
    close(out.metrics["advantage/raw_mean"], raw.metrics["advantage/mean"])
    close(out.returns, raw.returns)  # the critic's targets are not whitened


def test_explained_variance_metric_uses_completion_tokens_only():
    perfect = token_advantages("gae", PPOConfig(gamma=1.0, lam=1.0), SCORES, MASK, KL, 0.1, values=VALUES)
    # Values equal to the returns explain them fully, whatever sits at the padding.
    again = token_advantages("gae", PPOConfig(gamma=1.0, lam=1.0), SCORES, MASK, KL, 0.1,
                             values=torch.where(MASK, perfect.returns, T(1e6)))
    close(again.metrics["critic/explained_variance"], 1.0)


def test_reward_clip_and_no_kl():
    section = PPOConfig(gamma=1.0, lam=1.0, whiten_advantages=False, reward_clip=1.5)
    out = token_advantages("gae", section, SCORES, MASK, None, 0.1, values=torch.zeros(2, 5))
    # gamma = lam = 1, V = 0: every token's advantage is the (clipped) score; no KL term at all.
    close(out.advantages, [[0, 0, 1, 1, 0], [0, 0, -1.5, -1.5, -1.5]])
    close(out.metrics["reward/clip_frac"], 0.5)
    close(out.metrics["kl/coef"], 0.0)
    assert "kl/seq_mean" not in out.metrics
    # kl_in: loss -> the coefficient passed is 0 but the observed KL is still reported.
    out = token_advantages("gae", section, SCORES, MASK, KL, 0.0, values=torch.zeros(2, 5))
    close(out.advantages, [[0, 0, 1, 1, 0], [0, 0, -1.5, -1.5, -1.5]])
    close(out.metrics["kl/seq_mean"], 0.55)


def test_reinforce_pp_matches_the_pure_estimators():
    section = ReinforcePPConfig(gamma=0.9)
    out = token_advantages("reinforce_pp", section, SCORES, MASK, KL, 0.1)
    close(out.advantages, reinforce_pp_advantages(SCORES, KL, MASK, 0.1, 0.9))
    # returns-to-go at the first completion token: score discounted back + discounted KL penalties
    close(out.returns[0, 2], -0.05 + 0.9 * 0.99)
    scores = T([1.0, 3.0, -2.0, -2.0])
    mask, kl = torch.cat([MASK, MASK]), torch.cat([KL, KL])
    out = token_advantages("reinforce_pp_baseline", section, scores, mask, kl, 0.1, group_size=2)
    close(out.advantages, reinforce_pp_baseline_advantages(scores, 2, kl, mask, 0.1, 0.9))
    # group means 2 and -2: the centered scores are -1, 1, 0, 0 -> rows 2 and 3 return their KL only
    close(out.returns[2, 3], -0.01)
    close(out.returns[3, 4], -0.03)
    close(out.returns[1, 4], -0.03 + 1.0)


def test_token_advantages_errors():
    with pytest.raises(ValueError, match="values"):
        token_advantages("gae", PPOConfig(), SCORES, MASK, KL, 0.1)
    with pytest.raises(ValueError, match="not a per-token advantage estimator"):
        token_advantages("grpo", ReinforcePPConfig(), SCORES, MASK, KL, 0.1)
    with pytest.raises(ValueError, match="no valid token"):
        no_tokens = torch.zeros(2, 5, dtype=torch.bool)
        token_advantages("reinforce_pp", ReinforcePPConfig(), SCORES, no_tokens, KL, 0.1)


def test_token_kl_and_masks_from_a_batch():
    batch = {
        "loss_mask": T([[0.0, 1.0, 1.0, 1.0]]),
        "attention_mask": T([[1, 1, 1, 0]]),
        "old_logprobs": T([[0.0, -1.0, -2.0, 5.0]]),
        "ref_logprobs": T([[0.0, -1.5, -1.0, 7.0]]),
    }
    assert completion_mask(batch).tolist() == [[False, True, True, False]]
    close(token_kl(batch, "k1"), [[0.0, 0.5, -1.0, 0.0]])
    values, returns = torch.ones(1, 4), torch.full((1, 4), 2.0)
    cb = critic_batch({**batch, "input_ids": torch.zeros(1, 4, dtype=torch.long)}, values, returns)
    assert sorted(cb) == ["attention_mask", "input_ids", "loss_mask", "old_values", "returns"]
    assert torch.equal(cb["old_values"], values) and torch.equal(cb["returns"], returns)
    assert cb["loss_mask"] is batch["loss_mask"] and cb["input_ids"].shape == (1, 4)


def test_align_values_shifts_by_one_and_zeroes_tokens_without_context():
    head = T([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    attn = T([[1, 1, 1, 0], [0, 1, 1, 1]])
    close(align_values(head, attn), [[0, 1, 2, 0], [0, 0, 6, 7]])
    with pytest.raises(ValueError, match="batch, tokens"):
        align_values(head, attn[:, :3])


# --------------------------------------------------------------------------------------------- value model


@pytest.fixture(scope="module")
def tiny_paths(tiny_policy, tiny_reward):
    return tiny_policy, tiny_reward


def test_value_model_from_a_reward_model_starts_at_its_scores(tiny_paths):
    from transformers import AutoModelForSequenceClassification

    _, rm_path = tiny_paths
    critic = load_value_model(str(rm_path), torch.float32).eval()
    assert critic.score.bias is None and critic.dropout.p == 0.0
    rm = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=torch.float32).eval()
    ids = T([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    attn = T([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rm.config.pad_token_id = 0
    with torch.no_grad():
        head = critic(input_ids=ids, attention_mask=attn).logits[..., 0]
        scores = rm(input_ids=ids, attention_mask=attn).logits[:, 0]
    # The reward model pools at the last real token; the critic's head there is the same number.
    close(head[0, 4], scores[0])
    close(head[1, 2], scores[1])


def test_value_model_from_the_policy_gets_a_fresh_head(tiny_paths):
    policy_path, _ = tiny_paths
    critic = load_value_model(str(policy_path), torch.float32).eval()
    assert critic.config.num_labels == 1 and critic.score.bias is None
    with torch.no_grad():
        out = critic(input_ids=T([[5, 6, 7]])).logits
    assert out.shape == (1, 3, 1) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------- config


def ppo_tree(**extra) -> dict:
    tree = {
        "algorithm": "ppo",
        "data": {"path": "prompts.jsonl"},
        "reward": {"functions": [{"name": "rm", "kind": "model", "model_path": "/models/rm"}]},
        "rl": {"group_size": 2, "prompts_per_step": 4},
        "learner": {"micro_batch_size": 4},
    }
    for key, value in extra.items():
        tree[key] = {**tree.get(key, {}), **value}
    return tree


def test_token_algorithms_are_online_and_none_is_planned():
    assert {"ppo", "reinforce_pp", "reinforce_pp_baseline"} <= set(ONLINE_ALGORITHMS)
    assert PLANNED_ALGORITHMS == ()


def test_ppo_puts_the_kl_in_the_reward_unless_told_otherwise():
    cfg = config_from_dict(ppo_tree())
    assert cfg.learner.loss.kl_in == "reward"
    assert cfg.critic_init_path() == "/models/rm"
    cfg = config_from_dict(ppo_tree(learner={"micro_batch_size": 4, "loss": {"kl_in": "loss"}}))
    assert cfg.learner.loss.kl_in == "loss"
    grpo = config_from_dict({**ppo_tree(), "algorithm": "grpo"})
    assert grpo.learner.loss.kl_in == "loss"  # group algorithms keep the spine's default


def test_ppo_config_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="critic.model_path"):
        config_from_dict(ppo_tree(reward={"functions": [{"name": "l", "kind": "builtin",
                                                        "builtin": "letter_fraction"}]}))
    cfg = config_from_dict(ppo_tree(reward={"functions": [{"name": "l", "kind": "builtin",
                                                           "builtin": "letter_fraction"}]},
                                    critic={"init": "policy"}))
    assert cfg.critic_init_path() == cfg.model.path
    with pytest.raises(ConfigError, match="kl_in: reward"):
        config_from_dict(ppo_tree(ppo={"kl_control": "adaptive"}, learner={"loss": {"kl_in": "loss"}}))
    with pytest.raises(ConfigError, match="kl_coef"):
        config_from_dict(ppo_tree(ppo={"kl_control": "adaptive"}, learner={"loss": {"kl_coef": 0.0}}))
    with pytest.raises(ConfigError, match="critic.micro_batch_size"):
        config_from_dict(ppo_tree(critic={"micro_batch_size": 3}))
    with pytest.raises(ConfigError, match="colocate"):
        config_from_dict(ppo_tree(critic={"placement": "colocate", "num_ranks": 2}))
    with pytest.raises(ConfigError, match="group_size >= 2"):
        config_from_dict({**ppo_tree(rl={"group_size": 1}), "algorithm": "reinforce_pp_baseline"})
    with pytest.raises(ConfigError, match="unknown key 'critic.learning_rate'"):
        config_from_dict(ppo_tree(critic={"learning_rate": 1.0}))


def test_critic_engine_settings_inherit_the_policy_learners():
    policy = LearnerConfig(lr=1e-6, zero_stage=3, micro_batch_size=2, num_ranks=2,
                           loss={"kl_coef": 0.3})
    cfg = CriticConfig(lr=5e-6, micro_batch_size=4).learner_config(policy)
    assert cfg.lr == 5e-6 and cfg.micro_batch_size == 4
    assert cfg.zero_stage == 3 and cfg.num_ranks == 2
    assert cfg.reference is False and cfg.loss.kl_coef == 0.0


def test_kl_controller_follows_the_section():
    cfg = config_from_dict(ppo_tree(learner={"loss": {"kl_coef": 0.2}}))
    ctl = make_kl_controller(cfg)
    assert isinstance(ctl, FixedKLController) and ctl.value == 0.2
    cfg = config_from_dict({**ppo_tree(learner={"loss": {"kl_coef": 0.2}}), "algorithm": "reinforce_pp",
                            "reinforce_pp": {"kl_control": "adaptive", "kl_target": 2.0, "kl_horizon": 100}})
    ctl = make_kl_controller(cfg)
    assert isinstance(ctl, AdaptiveKLController) and (ctl.target, ctl.horizon) == (2.0, 100)
    assert ctl.update(4.0, n_steps=10) == pytest.approx(0.2 * (1 + 0.2 * 10 / 100))


def test_example_chain_paths_resolve_and_override_by_list_index(tmp_path):
    cfg = load_config(EXAMPLES / "ppo_tiny.yaml")
    assert cfg.algorithm == "ppo" and cfg.critic.init == "reward_model"
    assert cfg.reward.functions[0].model_path == "runs/rm-tiny/final_model"  # relative to the CWD
    assert Path(cfg.data.eval_path).is_file()
    cfg = load_config(EXAMPLES / "ppo_tiny.yaml",
                      [f"model.path={tmp_path}/sft", f"reward.functions.0.model_path={tmp_path}/rm"])
    assert cfg.model.path == f"{tmp_path}/sft" and cfg.critic_init_path() == f"{tmp_path}/rm"
    with pytest.raises(ConfigError, match=r"list of 2 entries; name one by its index 0\.\.1"):
        load_config(EXAMPLES / "ppo_tiny.yaml", ["reward.functions.3.model_path=x"])
    # A reward model path that exists next to the config file is taken relative to it.
    (tmp_path / "rm").mkdir()
    (tmp_path / "run.yaml").write_text((EXAMPLES / "ppo_tiny.yaml").read_text().replace(
        "runs/rm-tiny/final_model", "rm").replace("data/", str(EXAMPLES / "data") + "/"))
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.reward.functions[0].model_path == str(tmp_path / "rm")
