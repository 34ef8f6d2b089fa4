"""Collection: keep the rollout fleet busy from the prompt stream, score each group as soon as it
is complete, and hand back scored groups (the first step of every online iteration)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import ray

from fleetrl.data.rows import PromptStream, render_prompt
from fleetrl.online.batch import Group, Sample
from fleetrl.rollout.fleet import RolloutFleet
from fleetrl.run.config import RunConfig

log = logging.getLogger("fleetrl")


@dataclass
class RolloutStats:
    """What happened while one step's groups were collected; lands in the metrics."""

    generate_s: float = 0.0  # from the first request to the last completion back
    reward_wait_s: float = 0.0  # from the last completion back to the last score back
    reward_s: float = 0.0  # scoring time summed over reward actors (overlaps generation)
    generated_tokens: int = 0
    prompts_skipped_too_long: int = 0
    groups_skipped_constant: int = 0
    reward_errors: int = 0
    max_prompts_in_flight: int = 0  # prompts at the fleet whose completions had not come back
    max_reward_queue: int = 0  # scoring calls waiting at the reward actors
    reward_error_examples: list[str] = field(default_factory=list)
    per_function: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


class GroupCollector:
    """Keeps the fleet busy from the prompt stream and hands back fully scored groups.

    Each generate call carries a few prompts with n = group_size, so a prompt's group is complete
    when its call returns; it goes to the reward service at once (no barrier on the slowest call).
    """

    def __init__(self, cfg: RunConfig, fleet: RolloutFleet, reward_actors, stream: PromptStream, tokenizer):
        self.cfg = cfg
        self.fleet = fleet
        self.reward_actors = reward_actors
        self.stream = stream
        self.tokenizer = tokenizer
        self.sampling = cfg.rollout.sampling.model_dump()
        self._gen_refs: dict[Any, list[tuple[int, Any, str, list[int]]]] = {}
        self._reward_refs: dict[Any, list[Group]] = {}
        self._next_reward_actor = 0
        self._carry: list[Group] = []  # scored groups beyond what a step needed: used next step
        self._retry: list[list[tuple[int, Any, str, list[int]]]] = []  # prompts of calls that were lost
        self._prompts_submitted = 0
        self.workers_lost = 0
        self.restore_fleet = None  # set by the loop: brings a fleet that lost every worker back

    def _next_prompts(self, k: int, stats: RolloutStats) -> list[tuple[int, Any, str, list[int]]]:
        out = []
        while len(out) < k:
            _epoch, _index, row = next(self.stream)
            text = render_prompt(row, self.tokenizer)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.cfg.rl.max_prompt_tokens:
                stats.prompts_skipped_too_long += 1
                continue
            out.append((self._prompts_submitted, row, text, ids))
            self._prompts_submitted += 1
        return out

    def _submit_generation(self, stats: RolloutStats) -> None:
        if self._retry:
            batch = self._retry.pop(0)
        else:
            batch = self._next_prompts(self.cfg.rl.prompts_per_request, stats)
        ref = self.fleet.submit(
            [ids for _, _, _, ids in batch],
            n=self.cfg.rl.group_size,
            sampling=self.sampling,
            request_ids=[i for i, _, _, _ in batch],
        )
        self._gen_refs[ref] = batch

    def requeue(self, works) -> None:
        """Calls a worker handed back unfinished: their prompts are generated again elsewhere."""
        for work in works:
            for ref, batch in list(self._gen_refs.items()):
                if [i for i, _, _, _ in batch] == list(work.request_ids):
                    self._retry.append(self._gen_refs.pop(ref))

    def _on_generated(self, ref, stats: RolloutStats) -> None:
        batch = self._gen_refs.pop(ref)
        finished = self.fleet.finish(ref)
        if finished.lost:
            # A dead worker loses no prompt: its calls go to the others (each of its calls lands here).
            self._retry.append(batch)
            if finished.dead_worker is not None:
                self.workers_lost += 1
                log.warning("rollout worker %s died (%s); its prompts go to the other workers and it is "
                            "replaced at the next step", finished.dead_worker, type(finished.error).__name__)
            if self.fleet.num_workers == 0 and self.restore_fleet is not None:
                self.restore_fleet()
            return
        completions = finished.completions
        by_request: dict[int, list] = defaultdict(list)
        for c in completions:
            by_request[c.request_id].append(c)
        groups = []
        for prompt_index, row, text, ids in batch:
            samples = []
            for c in sorted(by_request[prompt_index], key=lambda c: c.sample_index):
                samples.append(
                    Sample(
                        prompt_index=prompt_index,
                        prompt_text=text,
                        prompt_ids=list(ids),
                        completion_ids=list(c.token_ids),
                        logprobs=list(c.logprobs),
                        finish_reason=c.finish_reason,
                        weight_version=c.weight_version,
                        # The fleet returns token ids only; reward functions read text.
                        completion_text=self.tokenizer.decode(c.token_ids, skip_special_tokens=True),
                        worker_index=c.worker_index,
                    )
                )
                stats.generated_tokens += len(c.token_ids)
            groups.append(Group(prompt_index, row, samples))
        self._score(groups)

    def _score(self, groups: list[Group]) -> None:
        samples = [(g, s) for g in groups for s in g.samples]
        columns: dict[str, list] = defaultdict(list)
        for g, _ in samples:
            for k, v in g.row.extra.items():
                columns[k].append(v)
        # Every row of a call must carry the same extra columns; pad missing ones with None.
        for k in columns:
            if len(columns[k]) != len(samples):
                columns[k] = [g.row.extra.get(k) for g, _ in samples]
        actor = self.reward_actors[self._next_reward_actor % len(self.reward_actors)]
        self._next_reward_actor += 1
        ref = actor.score.remote(
            [s.prompt_text for _, s in samples], [s.completion_text for _, s in samples], dict(columns)
        )
        self._reward_refs[ref] = groups

    def _on_scored(self, ref, stats: RolloutStats) -> list[Group]:
        groups = self._reward_refs.pop(ref)
        result = ray.get(ref)  # a RewardError (on_error: fail) surfaces here with its message
        samples = [s for g in groups for s in g.samples]
        for i, s in enumerate(samples):
            s.reward = float(result.rewards[i])
            s.reward_parts = {name: float(vals[i]) for name, vals in result.per_function.items()}
        for name, vals in result.per_function.items():
            stats.per_function[name].extend(float(v) for v in vals)
        stats.reward_s += sum(result.seconds.values())
        stats.reward_errors += len(result.errors)
        for e in result.errors[:3]:
            stats.reward_error_examples.append(f"{e.function}: {e.message}")
        if not self.cfg.rl.skip_constant_groups:
            return groups
        kept = [g for g in groups if len(set(g.rewards)) > 1]
        stats.groups_skipped_constant += len(groups) - len(kept)
        return kept

    def collect(self, num_groups: int) -> tuple[list[Group], RolloutStats]:
        stats = RolloutStats()
        done: list[Group] = self._carry[:num_groups]
        self._carry = self._carry[num_groups:]
        start = time.perf_counter()
        last_generated = start

        def groups_pending() -> int:
            generating = sum(len(b) for b in self._gen_refs.values())
            return generating + sum(len(g) for g in self._reward_refs.values())

        while len(done) < num_groups:
            # Keep the fleet busy, but never ask for more prompts than the step still needs.
            while self.fleet.idle_capacity() > 0 and len(done) + groups_pending() < num_groups:
                self._submit_generation(stats)
            stats.max_prompts_in_flight = max(stats.max_prompts_in_flight,
                                              sum(len(b) for b in self._gen_refs.values()))
            stats.max_reward_queue = max(stats.max_reward_queue, len(self._reward_refs))
            pending = list(self._gen_refs) + list(self._reward_refs)
            ready, _ = ray.wait(pending, num_returns=1)
            for ref in ready:
                if ref in self._gen_refs:
                    self._on_generated(ref, stats)
                    last_generated = time.perf_counter()
                else:
                    done.extend(self._on_scored(ref, stats))
        # Whole calls may bring more groups than needed: keep the rest for the next step.
        self._carry.extend(done[num_groups:])
        stats.generate_s = last_generated - start
        stats.reward_wait_s = time.perf_counter() - last_generated
        return done[:num_groups], stats

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "prompts_submitted": self._prompts_submitted}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self._prompts_submitted = state["prompts_submitted"]
