"""Multi-turn episodes without an engine: token bookkeeping, the runner's limits and errors."""

import asyncio
import time

import pytest
import torch

from fleetrl.env import ChatDelta, EnvError, Environment, EpisodeConfig, StepResult, TurnOutput, run_episode
from fleetrl.env.loader import EnvLoadError, load_environment
from fleetrl.online.batch import Sample, pad_samples

# Renders assistant turns trimmed: a conversation re-rendered from text drops the leading space
# the policy sampled (" aaaa" -> "aaaa"), so its tokens differ from what the fleet produced.
TRIMMING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] | trim) + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_policy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    tok.chat_template = TRIMMING_TEMPLATE
    return tok


class Scripted:
    """A fake engine: each turn samples the token ids of ``answers[k]`` plus the stop token."""

    def __init__(self, tokenizer, answers, delay_s=0.0):
        self.tok, self.answers, self.delay_s, self.calls = tokenizer, answers, delay_s, []

    async def __call__(self, ids, max_tokens):
        self.calls.append((list(ids), max_tokens))
        await asyncio.sleep(self.delay_s)
        text = self.answers[min(len(self.calls) - 1, len(self.answers) - 1)]
        out = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.convert_tokens_to_ids("<|im_end|>")]
        out = out[:max_tokens]
        return TurnOutput(out, [-0.5] * len(out), "stop", weight_version=3, last_weight_version=4)


class TwoQuestions(Environment):
    def __init__(self, hang_s=0.0, fail=False):
        self.hang_s, self.fail, self.turn = hang_s, fail, 0

    async def reset(self, row):
        return None

    async def step(self, text):
        self.turn += 1
        if self.fail:
            raise KeyError("tool broke")
        await asyncio.sleep(self.hang_s)
        if self.turn == 1:
            return StepResult(observation="Now the letter b:", reward=float("a" in text))
        return StepResult(reward=float("b" in text), done=True)


def _run(env, tokenizer, engine, cfg=None, name="episode 0"):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a:"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return asyncio.run(run_episode(env, {"prompt": "Write a:"}, ids, engine, ChatDelta(tokenizer),
                                   cfg or EpisodeConfig(), max_tokens=16, name=name))


def test_learner_sees_exactly_the_sampled_tokens(tokenizer):
    engine = Scripted(tokenizer, [" aaaa", " bbbb"])
    result = _run(TwoQuestions(), tokenizer, engine)
    ep = result.episode
    assert ep.num_turns == 2 and ep.turn_rewards == [1.0, 1.0] and result.finish_reason == "stop"
    # The second turn was generated from exactly the ids the episode holds before it.
    second_prompt = engine.calls[1][0]
    assert ep.ids[: len(second_prompt)] == second_prompt
    sample = Sample(0, "", ep.prompt_ids, ep.completion_ids, ep.logprobs, "stop", 3,
                    completion_mask=ep.loss_mask)
    batch = pad_samples([sample], pad_id=0)
    seen = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert seen == ep.ids
    assert tokenizer.decode(seen, skip_special_tokens=False) == (
        "<|im_start|>user\nWrite a:<|im_end|>\n<|im_start|>assistant\n aaaa<|im_end|>\n"
        "<|im_start|>user\nNow the letter b:<|im_end|>\n<|im_start|>assistant\n bbbb<|im_end|>")
    # Re-rendering the conversation would have trained other tokens (the template trims turns).
    rerendered = tokenizer.apply_chat_template(ep.messages, tokenize=False)
    assert tokenizer(rerendered, add_special_tokens=False)["input_ids"][: len(seen)] != seen
    # Observation tokens: no loss, no behaviour logprob; policy tokens keep the sampler's.
    obs = batch["observation_mask"][0].bool()
    assert obs.sum().item() == ep.observation_tokens > 0
    assert (batch["loss_mask"][0][obs] == 0).all() and (batch["old_logprobs"][0][obs] == 0).all()
    policy = batch["loss_mask"][0].bool()
    assert (batch["old_logprobs"][0][policy] == -0.5).all()
    assert (policy & obs).sum() == 0 and (policy | obs).sum() == len(ep.completion_ids)
    assert (result.weight_version, result.last_weight_version) == (3, 4)


def test_observation_tokens_carry_no_gradient(tokenizer):
    from fleetrl.algos.registry import POLICY_LOSSES

    ep = _run(TwoQuestions(), tokenizer, Scripted(tokenizer, [" aaaa", " bbbb"])).episode
    batch = pad_samples([Sample(0, "", ep.prompt_ids, ep.completion_ids, ep.logprobs, "stop", 0,
                                completion_mask=ep.loss_mask)], pad_id=0)
    logprobs = batch["old_logprobs"].clone().requires_grad_(True)  # ratio 1: nothing clipped
    loss_fn = POLICY_LOSSES.get("ppo")
    out = loss_fn(logprobs, batch["old_logprobs"], torch.ones(1), batch["loss_mask"])
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    obs = batch["observation_mask"].bool()
    assert (logprobs.grad[obs] == 0).all() and (logprobs.grad[batch["loss_mask"].bool()] != 0).all()


def test_max_turns_and_max_total_tokens(tokenizer):
    class Endless(Environment):
        async def step(self, text):
            return StepResult(observation="again")

    r = _run(Endless(), tokenizer, Scripted(tokenizer, [" a"]), EpisodeConfig(max_turns=3))
    assert r.episode.num_turns == 3 and r.episode.completion_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    engine = Scripted(tokenizer, [" a b c d e f g h"])
    r = _run(Endless(), tokenizer, engine, EpisodeConfig(max_turns=50, max_total_tokens=40))
    assert len(r.episode.ids) <= 40 and r.finish_reason == "max_total_tokens"
    assert all(len(ids) + mt <= 40 for ids, mt in engine.calls)  # no turn may pass the budget


def test_env_error_fail_names_the_episode(tokenizer):
    with pytest.raises(EnvError, match=r"TwoQuestions in episode 7, step of turn 1: raised KeyError.*on_error: zero"):
        _run(TwoQuestions(fail=True), tokenizer, Scripted(tokenizer, [" a"]), name="episode 7")


def test_env_error_zero_ends_the_episode(tokenizer):
    r = _run(TwoQuestions(fail=True), tokenizer, Scripted(tokenizer, [" a"]), EpisodeConfig(on_error="zero"))
    assert r.finish_reason == "env_error" and "KeyError" in r.error and r.episode.num_turns == 1


def test_step_timeout(tokenizer):
    cfg = EpisodeConfig(step_timeout_s=0.2)
    with pytest.raises(EnvError, match=r"timed out after 0.2 s \(rollout.episode.step_timeout_s\)"):
        _run(TwoQuestions(hang_s=30), tokenizer, Scripted(tokenizer, [" a"]), cfg)


def test_a_hanging_step_does_not_stall_other_episodes(tokenizer):
    """Eight episodes share one event loop (as in a rollout worker); one env step hangs. The
    others finish while it hangs; it ends at its deadline, not before the others."""
    delta = ChatDelta(tokenizer)
    ids = delta.first("Write a:")
    cfg = EpisodeConfig(step_timeout_s=2.0, on_error="zero")
    done_at: dict[int, float] = {}

    async def one(i):
        env = TwoQuestions(hang_s=3600 if i == 0 else 0.0)
        r = await run_episode(env, {}, ids, Scripted(tokenizer, [" a", " b"], delay_s=0.01), delta, cfg, 8,
                              name=f"episode {i}")
        done_at[i] = time.perf_counter()
        return r

    async def main():
        return await asyncio.gather(*(one(i) for i in range(8)))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    assert results[0].finish_reason == "env_error" and "timed out" in results[0].error
    assert all(r.episode.num_turns == 2 and r.error is None for r in results[1:])
    # Ordering, not speed: every other episode was done before the hung one gave up.
    assert max(done_at[i] for i in range(1, 8)) < done_at[0]
    assert done_at[0] - t0 >= 2.0


def test_sync_env_methods_run_in_a_thread(tokenizer):
    class Blocking(Environment):
        def reset(self, row):
            return [{"role": "user", "content": "Write c:"}]

        def step(self, text):
            time.sleep(0.05)
            return StepResult(reward=1.0, done=True)

    r = _run(Blocking(), tokenizer, Scripted(tokenizer, [" c"]))
    assert tokenizer.decode(r.episode.prompt_ids) .endswith("Write c:<|im_end|>\n<|im_start|>assistant\n")
    assert r.episode.turn_rewards == [1.0] and r.env_s >= 0.05


def test_bad_step_result_is_an_error(tokenizer):
    class Wrong(Environment):
        async def step(self, text):
            return "done"

    with pytest.raises(EnvError, match="must return a fleetrl.env.StepResult, got str"):
        _run(Wrong(), tokenizer, Scripted(tokenizer, [" a"]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "high"])
def test_a_non_finite_or_non_numeric_step_reward_is_an_environment_error(tokenizer, bad):
    class Bad(Environment):
        async def step(self, text):
            return StepResult(reward=bad, done=True)

    with pytest.raises(EnvError, match=r"Bad in episode 0, step of turn 1: raised (ValueError: step returned a "
                                       r"non-finite reward \((nan|inf)\)|ValueError: could not convert)"):
        _run(Bad(), tokenizer, Scripted(tokenizer, [" a"]))
    r = _run(Bad(), tokenizer, Scripted(tokenizer, [" a"]), EpisodeConfig(on_error="zero"))
    assert r.finish_reason == "env_error" and r.episode.turn_rewards == []


def test_chat_delta_rejects_a_template_that_rewrites_history(tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    # Marks only the last message: appending a message changes how the earlier ones render.
    tok.chat_template = ("{%- for m in messages -%}{{ m['role'] + ('*' if loop.last else '') + ':' + m['content']"
                         " + '\n' }}{%- endfor -%}")
    with pytest.raises(ValueError, match="renders earlier messages differently"):
        ChatDelta(tok).observation_ids("hi", [5])


def test_chat_delta_refuses_a_template_that_does_not_render_tools(tokenizer):
    from transformers import AutoTokenizer

    from fleetrl.env.tools import TOOL_SCHEMAS

    tools = [TOOL_SCHEMAS["calculator"], TOOL_SCHEMAS["python"]]
    built = AutoTokenizer.from_pretrained(tokenizer.name_or_path)  # the tiny model's own template shows them
    ChatDelta(built).check_tools(tools)
    assert "calculator" in built.decode(ChatDelta(built).first("hi", tools))
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{%- for m in messages -%}"
                         "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endfor -%}"
                         "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")
    with pytest.raises(ValueError, match=r"does not render `tools`, so the policy would never see the "
                                         r"environment's tools \['calculator', 'python'\]"):
        ChatDelta(tok).check_tools(tools)


def test_load_environment(tmp_path):
    f = tmp_path / "my_env.py"
    f.write_text("from fleetrl.env import Environment\nclass E(Environment):\n    async def step(self, t):\n"
                 "        return None\nclass NoStep:\n    pass\n")
    assert load_environment("my_env.py:E", base_dir=tmp_path).__name__ == "E"
    assert load_environment("fleetrl.env.base:Environment") is Environment
    with pytest.raises(EnvLoadError, match="file not found"):
        load_environment("nope.py:E", base_dir=tmp_path)
    with pytest.raises(EnvLoadError, match="has no class 'F'"):
        load_environment("my_env.py:F", base_dir=tmp_path)
    with pytest.raises(EnvLoadError, match="no step"):
        load_environment("my_env.py:NoStep", base_dir=tmp_path)
    with pytest.raises(EnvLoadError, match="must look like"):
        load_environment("my_env.py")
    from fleetrl.env import resolve_environment

    assert resolve_environment("my_env.py:E", tmp_path) == f"{(tmp_path / 'my_env.py').resolve()}:E"
    assert resolve_environment("fleetrl.env.tools:ToolEnv", None, {"tools": ["calculator"]}).endswith(":ToolEnv")
    with pytest.raises(EnvLoadError, match=r"env_kwargs=\{'tools': \['shell'\]\}: building it raised ValueError"):
        resolve_environment("fleetrl.env.tools:ToolEnv", None, {"tools": ["shell"]})


def test_episode_config_is_checked():
    from pathlib import Path

    from fleetrl.run.config import load_config

    example = Path(__file__).resolve().parents[2] / "examples" / "multiturn_tiny.yaml"
    cfg = load_config(example, [])
    assert cfg.rollout.environment == "fleetrl.testing.tasks:TwoLettersEnv" and cfg.reward.functions == []
    with pytest.raises(Exception, match=r"rollout.episode.max_total_tokens=512 exceeds rollout.max_model_len=256"):
        load_config(example, ["rollout.episode.max_total_tokens=512"])
    with pytest.raises(Exception, match="held-out evaluation scores single completions"):
        load_config(example, ["data.eval_fraction=0.1"])
    with pytest.raises(Exception, match="episode"):
        load_config(example, ["rollout.episode.max_turn=3"])  # unknown keys are errors
    with pytest.raises(Exception, match="reward.functions"):
        load_config(example, ["rollout.environment=null"])
    tools = load_config(example.parent / "tools_gpu.yaml", [])
    assert tools.rollout.environment == "fleetrl.env.tools:ToolEnv" and tools.rollout.episode.max_turns == 4


def test_episode_stats_and_two_letters_env():
    from fleetrl.online.batch import episode_stats
    from fleetrl.testing.tasks import TwoLettersEnv, two_letters_task

    row = two_letters_task(1)[0]
    env = TwoLettersEnv()
    asyncio.run(env.reset(row))
    first = asyncio.run(env.step(" " + row["letter"] * 3 + "x"))
    assert first.reward == 0.75 and not first.done and row["second"] in first.observation
    second = asyncio.run(env.step(row["second"] * 2))
    assert second.reward == 1.0 and second.done

    def sample(turns, obs, n, rewards, error=None):
        return Sample(0, "", [1], [5] * n, [0.0] * n, "stop", 0, completion_mask=[1] * (n - obs) + [0] * obs,
                      episode={"turns": turns, "observation_tokens": obs, "env_s": 0.5, "env_error": error,
                               "turn_rewards": rewards})

    stats = episode_stats([sample(2, 4, 10, [1.0, 0.5]), sample(1, 0, 10, [0.0], error="boom")])
    assert stats == {"episode/turns": 1.5, "episode/observation_token_share": 0.2, "env/time_s": 1.0,
                     "env/errors": 1, "reward/turn_1": 0.5, "reward/turn_2": 0.5}
    assert episode_stats([Sample(0, "", [1], [2], [0.0], "stop", 0)]) == {}
