"""Held-out evaluation: the reward the policy gets on prompts it never trains on."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import ray

from fleetrl.core.waits import wait_all
from fleetrl.data.rows import render_prompt
from fleetrl.rollout.fleet import RolloutFleet
from fleetrl.run.config import RunConfig


class HeldOutEval:
    """Completions of held-out prompts (one each, at rl.eval_temperature: 0 = greedy) from the
    fleet, scored by the reward service: the reward a policy gets on prompts it never trains on."""

    def __init__(self, cfg: RunConfig, fleet: RolloutFleet, reward_actors, rows, tokenizer,
                 reward_calls_ahead: Callable[[], int] = lambda: 0):
        """``reward_calls_ahead()``: score calls already queued at the reward actors (the collector's),
        which the evaluation's calls wait behind."""
        self.cfg, self.fleet, self.reward_actors = cfg, fleet, reward_actors
        self.reward_calls_ahead = reward_calls_ahead
        self.sampling = {**cfg.rollout.sampling.model_dump(), "temperature": cfg.rl.eval_temperature}
        self.prompts: list[tuple[Any, str, list[int]]] = []
        self.skipped_too_long = 0
        for row in rows:
            text = render_prompt(row, tokenizer)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > cfg.rl.max_prompt_tokens:
                self.skipped_too_long += 1
                continue
            self.prompts.append((row, text, ids))
        self.prompts = self.prompts[: cfg.rl.eval_max_prompts]
        self.tokenizer = tokenizer

    def _generate(self) -> list[Any]:
        """One completion per prompt, in prompt order (a call lost with its worker is sent again)."""
        size = self.cfg.rl.prompts_per_request
        queue = [list(range(i, min(i + size, len(self.prompts)))) for i in range(0, len(self.prompts), size)]
        pending: dict[Any, list[int]] = {}
        out: list[Any] = [None] * len(self.prompts)
        while queue or pending:
            while queue and self.fleet.idle_capacity() > 0:
                chunk = queue.pop(0)
                ref = self.fleet.submit([self.prompts[i][2] for i in chunk], n=1, sampling=self.sampling,
                                        request_ids=[f"eval-{i}" for i in chunk])
                pending[ref] = chunk
            timeout = self.cfg.rollout.generate_timeout_s
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not ready:
                late = sorted({w.worker_index for r in pending if (w := self.fleet.work_of(r)) is not None})
                raise TimeoutError(
                    f"evaluation: rollout worker(s) {late} did not answer a generate call within "
                    f"rollout.generate_timeout_s={timeout:.0f}s (their engines look hung)")
            for ref in ready:
                chunk = pending.pop(ref)
                finished = self.fleet.finish(ref)
                if finished.lost:  # its worker died (and left the fleet): send the prompts again
                    queue.append(chunk)
                    if self.fleet.num_workers == 0:
                        raise RuntimeError("every rollout worker died during evaluation") from None
                    continue
                completions = finished.completions
                for c in completions:
                    out[int(str(c.request_id).removeprefix("eval-"))] = c
        return out

    def run(self) -> dict[str, float]:
        start = time.perf_counter()
        completions = self._generate()
        texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        prompts = [text for _, text, _ in self.prompts]
        columns: dict[str, list] = defaultdict(list)
        for key in {k for row, _, _ in self.prompts for k in row.extra}:
            columns[key] = [row.extra.get(key) for row, _, _ in self.prompts]
        # Split the scoring over the reward actors.
        k = len(self.reward_actors)
        bounds = [round(i * len(prompts) / k) for i in range(k + 1)]
        raw = [row.prompt for row, _, _ in self.prompts]  # as written in the data, for TRL-style functions
        refs = [a.score.remote(prompts[lo:hi], texts[lo:hi], {c: v[lo:hi] for c, v in columns.items()}, raw[lo:hi])
                for a, lo, hi in zip(self.reward_actors, bounds, bounds[1:]) if hi > lo]
        per_call = self.cfg.reward.call_deadline_s()
        timeout = per_call * (1 + self.reward_calls_ahead())
        results = wait_all(
            refs, [f"reward actor {i}" for i in range(len(refs))], timeout,
            "evaluation: scoring the held-out completions",
            f"every reward function has a deadline of its own ({per_call:.0f}s per call in all: reward.timeout_s, "
            "functions[i].timeout_s), so that actor is hung, e.g. in code that holds the GIL; fix that function")
        rewards = [r for res in results for r in res.rewards]
        per_function: dict[str, list[float]] = defaultdict(list)
        for res in results:
            for name, vals in res.per_function.items():
                per_function[name].extend(vals)
        lengths = [len(c.token_ids) for c in completions]
        return {
            "eval/reward/mean": sum(rewards) / len(rewards),
            **{f"eval/reward/{name}": sum(v) / len(v) for name, v in per_function.items()},
            "eval/reward/errors": sum(len(res.errors) for res in results),
            "eval/response_length/mean": sum(lengths) / len(lengths),
            "eval/prompts": len(prompts),
            "time/eval": time.perf_counter() - start,
        }
