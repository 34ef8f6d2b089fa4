"""Built-in tools: JSON tool-call parsing, the calculator, ToolEnv, and model output that must never
crash or stall a run (the inputs of issue 22)."""

import asyncio
import time

import pytest

import fleetrl.env.tools as tools
from fleetrl.env import ChatDelta, EnvError, EpisodeConfig, TurnOutput, run_episode
from fleetrl.env.tools import ToolCallError, ToolEnv, calculate, parse_tool_calls

CALC = '<tool_call>{{"name": "calculator", "arguments": {{"expression": "{}"}}}}</tool_call>'


def test_parse_tool_calls():
    text = 'Let me check.<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>' \
           '<tool_call>\n{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}\n</tool_call>'
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "2+3"}),
                                                      ("python", {"code": "print(1)"})]
    assert parse_tool_calls('{"name": "calculator", "arguments": {"expression": "1"}}')[0].name == "calculator"
    assert parse_tool_calls("The answer is 5.") == []
    with pytest.raises(ToolCallError, match="not valid JSON"):
        parse_tool_calls("<tool_call>{name: calculator}</tool_call>")
    with pytest.raises(ToolCallError, match='must be {"name": str'):
        parse_tool_calls('<tool_call>["calculator"]</tool_call>')
    with pytest.raises(ToolCallError, match="must be an object"):
        parse_tool_calls('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>')


@pytest.mark.parametrize("text", [
    "<tool_call>" + "[" * 100_000 + "</tool_call>",
    '{"name": "calculator", "arguments": ' + "[" * 100_000 + "}",
    '<tool_call>{"name": "calculator", "arguments": "' + "[" * 100_000 + '"}</tool_call>',
    '<tool_call>{"name": "calculator", "arguments": {"x": ' + "[" * 50_000 + "]" * 50_000 + "}}</tool_call>",
], ids=["tagged", "bare", "arguments-string", "balanced"])
def test_deeply_nested_tool_calls_are_a_tool_call_error(text):
    """json.loads raises RecursionError on deep nesting: it must come out as a ToolCallError."""
    with pytest.raises(ToolCallError, match="nests too deeply"):
        parse_tool_calls(text)


def test_a_number_past_pythons_digit_limit_is_a_tool_call_error():
    with pytest.raises(ToolCallError, match="cannot be read: Exceeds the limit"):
        parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {"x": ' + "1" * 5000 + "}}</tool_call>")


def test_calculator():
    assert calculate("2 + 3 * (4 - 1)") == "11"
    assert calculate("7 / 2") == "3.5" and calculate("-2 ** 2") == "-4" and calculate("6/3") == "2"
    assert calculate("2 ** 100") == str(2 ** 100) and calculate("10 ** 1000") == str(10 ** 1000)
    assert calculate("1/0").startswith("error: ZeroDivisionError")
    assert "only numbers" in calculate("__import__('os').system('ls')")
    assert calculate("2 +").startswith("error: SyntaxError")
    assert calculate(None) == "error: the expression must be a string, got NoneType"


@pytest.mark.parametrize("expression,message", [
    ("((10**1000)**1000)**1000", "would have more than 13000 bits"),  # passed the old exponent guard: hours
    ("(10**1000)**5", "would have more than 13000 bits"),  # str() of it raised ValueError outside the try
    ("9 ** 9 ** 9", "9 ** 387420489 would have more than 13000 bits"),
    ("3 ** 12000", "a number in it has more than 13000 bits"),  # the estimate is low; the result is checked
    ("(10**3000) * (10**3000)", "the product would have more than 13000 bits"),
    ("1+" * 3000 + "1", "6001 characters long, more than 2000"),  # raised RecursionError
    ("1+" * 900 + "1", "nests more than 100 operations deep"),
    ("-" * 1500 + "1", "nests more than 100 operations deep"),
    ("(" * 500 + "1" + ")" * 500, "error: SyntaxError"),
    ("1" * 5000, "5000 characters long"),
])
def test_the_calculator_is_bounded_by_operand_size(expression, message):
    t0 = time.perf_counter()
    answer = calculate(expression)
    assert answer.startswith("error: ") and message in answer, answer
    assert time.perf_counter() - t0 < 0.5


def test_the_calculator_has_a_deadline_between_steps():
    assert calculate("+".join(["(10**1000)"] * 50), timeout_s=0.0) == "error: TimeoutError: took longer than 0 s"


def test_the_calculator_runs_off_the_event_loop_with_a_deadline(monkeypatch):
    """A slow calculation leaves the event loop free (vLLM keeps generating); past its deadline the
    call answers with an error message."""
    monkeypatch.setattr(tools, "calculate", lambda e: (time.sleep(0.3), "slow")[1])
    env = ToolEnv(tools=["calculator"])
    ticks = []

    async def ticker():
        for _ in range(10):
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.02)

    async def main():
        return (await asyncio.gather(env.step(CALC.format("1+1")), ticker()))[0]

    r = asyncio.run(main())
    assert r.observation[0]["content"] == "slow" and len(ticks) == 10
    monkeypatch.setattr(tools, "CALC_CALL_TIMEOUT_S", 0.1)
    monkeypatch.setattr(tools, "calculate", lambda e: (time.sleep(0.5), "late")[1])
    r = asyncio.run(env.step(CALC.format("1+1")))
    assert r.observation[0]["content"] == "error: the calculator took longer than 0.1 s"


def test_tool_env_answers_calls_and_ends_without_one():
    env = ToolEnv(timeout_s=5.0)
    first = asyncio.run(env.reset({"prompt": "What is 2+3?"}))
    assert first == [{"role": "user", "content": "What is 2+3?"}] and len(env.tools) == 2
    r = asyncio.run(env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
                             '<tool_call>{"name": "python", "arguments": {"code": "print(2+3)"}}</tool_call>'))
    assert not r.done and [m["content"].strip() for m in r.observation] == ["5", "5"]
    assert all(m["role"] == "tool" for m in r.observation)
    bad = asyncio.run(env.step('<tool_call>{"name": "web", "arguments": {}}</tool_call>'))
    assert "no tool 'web'" in bad.observation[0]["content"]
    broken = asyncio.run(env.step("<tool_call>{oops</tool_call>"))
    assert broken.observation[0]["content"].startswith("error: tool call is not valid JSON")
    no_code = asyncio.run(env.step('<tool_call>{"name": "python", "arguments": {"code": [1]}}</tool_call>'))
    assert no_code.observation[0]["content"] == "error: python needs {\"code\": \"<string>\"}, got ['code']"
    assert asyncio.run(env.step("It is 5.")).done


def test_tool_env_runs_at_most_max_calls_per_turn():
    env = ToolEnv(tools=["calculator"], max_calls=2)
    r = asyncio.run(env.step(CALC.format("1+1") * 5))
    assert [m["content"] for m in r.observation] == ["2", "2", "error: 3 more tool call(s) not run: at most 2 per turn"]


@pytest.mark.parametrize("kwargs,message", [
    ({"tools": ["shell"]}, "rollout.episode.env_kwargs.tools.0: unknown tool 'shell'; built-in: ['calculator', "
                           "'python']"),
    ({"timeout": 5}, "rollout.episode.env_kwargs.timeout: unknown key for ToolEnv; allowed: ["),
    ({"timeout_s": 0}, "rollout.episode.env_kwargs.timeout_s: Input should be greater than 0 (got 0)"),
    ({"isolation": "docker"}, "rollout.episode.env_kwargs.isolation: Input should be 'bubblewrap' or 'none'"),
    ({"max_processes": 1}, "rollout.episode.env_kwargs.max_processes: Input should be greater than or equal to 2"),
])
def test_tool_env_rejects_bad_kwargs_naming_the_key(kwargs, message):
    with pytest.raises(ValueError) as e:
        ToolEnv(**kwargs)
    assert message in str(e.value)


# -- whole episodes: model output never ends the run -------------------------------------------


HOSTILE_TURNS = [
    CALC.format("((10**1000)**1000)**1000"),
    CALC.format("(10**1000)**5"),
    CALC.format("1+" * 3000 + "1"),
    "<tool_call>" + "[" * 100_000 + "</tool_call>",
    '{"name": "calculator", "arguments": ' + "[" * 100_000 + "}",
    '<tool_call>{"name": "calculator", "arguments": {"expression": ' + "[" * 50_000 + "]" * 50_000 + "}}</tool_call>",
    '<tool_call>{"name": "python", "arguments": {"code": "while True: pass"}}</tool_call>',
    "The answer is 5.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_policy):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy)


def test_hostile_model_output_is_an_observation_under_on_error_fail(tokenizer):
    """Each turn of the issue's inputs in one episode with the default on_error: fail: the episode
    goes on to its end (every answer an observation), nothing raises, nothing stalls."""
    turns = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in HOSTILE_TURNS]

    async def engine(ids, max_tokens):
        out = turns[min(engine.k, len(turns) - 1)]
        engine.k += 1
        return TurnOutput(out, [-0.1] * len(out), "stop")

    engine.k = 0
    env = ToolEnv(timeout_s=1.0)
    cfg = EpisodeConfig(max_turns=len(turns), max_total_tokens=10**7, step_timeout_s=20.0)
    t0 = time.perf_counter()
    r = asyncio.run(run_episode(env, {"prompt": "hi"}, [1, 2, 3], engine, ChatDelta(tokenizer), cfg, 10**6))
    assert r.error is None and r.episode.num_turns == len(turns) and time.perf_counter() - t0 < 15
    answers = [m["content"] for m in r.episode.messages if m["role"] == "tool"]
    assert len(answers) == len(turns) - 1
    assert all(a.startswith("error: ") for a in answers[:6]), answers
    assert "[timed out: killed]" in answers[6]


def test_a_broken_environment_step_follows_on_error(tokenizer):
    """What is not model output (here: the sandbox machinery failing) is an environment error:
    on_error: fail ends the run naming it; zero counts it (env_error)."""
    class Broken(ToolEnv):
        async def call(self, call):
            raise OSError("[Errno 24] Too many open files")

    ids = tokenizer(CALC.format("1+1"), add_special_tokens=False)["input_ids"]

    async def engine(prompt_ids, max_tokens):
        return TurnOutput(ids, [-0.1] * len(ids), "stop")

    def run(on_error):
        cfg = EpisodeConfig(max_turns=2, max_total_tokens=10**6, on_error=on_error)
        return asyncio.run(run_episode(Broken(tools=["calculator"]), {"prompt": "hi"}, [1, 2], engine,
                                       ChatDelta(tokenizer), cfg, 1000, name="episode 3"))

    with pytest.raises(EnvError, match=r"Broken in episode 3, step of turn 1: raised OSError: \[Errno 24\]"):
        run("fail")
    r = run("zero")
    assert r.finish_reason == "env_error" and "Too many open files" in r.error
