"""Collection: keep the rollout fleet busy from the prompt stream, score each group as soon as it
is complete, and hand back scored groups (the first step of every online iteration).

Scored groups wait in a ``StalenessBuffer`` (online/buffer.py) and prompts start under its
``Admission`` rule: with ``rl.max_staleness`` K the fleet generates up to K steps ahead of the
learner, and ``pump`` keeps it doing so while the learner trains (K = 0: the synchronous loop).
Nothing is lost: a call lost with a dead worker, a group dropped as too stale, and (on resume)
every prompt started but not trained before the checkpoint are generated again.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from fleetrl.data.rows import DataError, PromptStream, render_prompt
from fleetrl.online.batch import Group, Sample
from fleetrl.online.buffer import Admission, StalenessBuffer
from fleetrl.rollout.fleet import RolloutFleet
from fleetrl.run.config import RunConfig

log = logging.getLogger("fleetrl")

Prompt = tuple[int, Any, str, list[int]]  # (prompt index, data row, rendered text, token ids)
IDLE_WAKE_S = 60.0  # a wait with no deadline of its own wakes up this often (and the loop waits again)


@dataclass
class RolloutStats:
    """What happened while one step's groups were collected; lands in the metrics."""

    reward_wait_s: float = 0.0  # from the last completion back to the last score back
    reward_s: float = 0.0  # scoring time summed over reward actors (overlaps generation)
    generated_tokens: int = 0
    prompts_skipped_too_long: int = 0
    groups_skipped_constant: int = 0
    reward_errors: int = 0
    reward_skipped: int = 0  # values a TRL-style function returned None for (left out of the sum)
    reward_hung_calls: int = 0  # reward function calls past reward.timeout_s still running (most seen)
    max_prompts_in_flight: int = 0  # prompts at the fleet whose completions had not come back
    max_reward_queue: int = 0  # scoring calls waiting at the reward actors
    reward_error_examples: list[str] = field(default_factory=list)
    groups_dropped_stale: int = 0  # too stale to train (their prompts are generated again)
    staleness: list[int] = field(default_factory=list)  # of each group handed to the learner
    learner_wait_s: float = 0.0  # the learner waiting for groups (collect)
    fleet_idle_s: float = 0.0  # no generation in flight while the learner trained and synced (pump)
    start: float = 0.0  # when the step's collection began
    last_generated: float = 0.0  # when the last completion came back (during collect or pump)

    @property
    def generate_s(self) -> float:
        """From the start of collection to the last completion back (pump included)."""
        return max(0.0, self.last_generated - self.start)


def _episode_text(c) -> str:
    """What reward functions get as the completion of an episode: its last policy turn (the whole
    episode reaches them as the ``messages`` column)."""
    turns = [m["content"] for m in c.episode["messages"] if m["role"] == "assistant"]
    return turns[-1] if turns else ""


class GroupCollector:
    """Keeps the fleet busy from the prompt stream and hands back fully scored groups.

    Each generate call carries rl.prompts_per_request prompts (default 1) with n = group_size, so a
    prompt's group is complete when its call returns; it goes to the reward service at once (no
    barrier on the slowest call), then to the buffer.
    """

    def __init__(self, cfg: RunConfig, fleet: RolloutFleet, reward_actors, stream: PromptStream, tokenizer,
                 fleet_version: Callable[[], int] = lambda: 0):
        """``fleet_version()``: the weight version the fleet holds now (admission reads it)."""
        self.cfg = cfg
        self.fleet = fleet
        self.reward_actors = reward_actors
        self.stream = stream
        self.tokenizer = tokenizer
        self.fleet_version = fleet_version
        self.sampling = cfg.rollout.sampling.model_dump()
        self._gen_refs: dict[Any, list[Prompt]] = {}
        self._reward_refs: dict[Any, list[Group]] = {}
        self._scored_by: dict[Any, tuple[int, Any]] = {}  # score ref -> (reward actor index, its handle)
        # score ref -> when it is overdue (time.time()): the actor's calls ahead of it and its own, each
        # at its worst case (reward.RewardConfig.call_deadline_s); past that the actor is hung.
        self._reward_deadline: dict[Any, float] = {}
        self._call_deadline_s = cfg.reward.call_deadline_s()
        self._next_reward_actor = 0
        self.buffer: StalenessBuffer[Group] = StalenessBuffer(cfg.rl.max_staleness, lambda g: g.min_version)
        self.admission = Admission(cfg.rl.max_staleness, cfg.rl.prompts_per_step)
        self._retry: list[list[Prompt]] = []  # admitted prompts to generate (again): lost calls, stale groups
        self._row_of: dict[int, int] = {}  # prompt index -> its data row, while the prompt is not trained
        self._prompts_submitted = 0
        self.workers_lost = 0
        self.workers_drained = 0  # left a draining node (online/draining.py), their calls finished or requeued
        self.restore_fleet = None  # set by the loop: brings a fleet that lost every worker back
        # Set by the loop: restart_reward_actor(index, dead handle) starts a reward actor in its place.
        self.restart_reward_actor: Callable[[int, Any], Any] | None = None
        self.reward_restarts = 0
        self.rescored_groups = 0  # groups whose reward actor died while scoring them (scored again)

    def _prompt(self, row_index: int, stats: RolloutStats | None = None,
                prompt_index: int | None = None) -> Prompt | None:
        """Prompt (index, row, text, ids) of data row ``row_index``, a new index unless given; None
        if it is too long."""
        row = self.stream.rows[row_index]
        text = render_prompt(row, self.tokenizer)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.cfg.rl.max_prompt_tokens:
            if stats is not None:
                stats.prompts_skipped_too_long += 1
            return None
        if prompt_index is None:
            prompt_index = self._prompts_submitted
            self._prompts_submitted += 1
        self._row_of[prompt_index] = row_index
        return prompt_index, row, text, ids

    def _next_prompts(self, k: int, stats: RolloutStats) -> list[Prompt]:
        out: list[Prompt] = []
        skipped_in_a_row = 0
        while len(out) < k:
            _epoch, index, _row = next(self.stream)
            prompt = self._prompt(index, stats)
            if prompt is not None:
                out.append(prompt)
                skipped_in_a_row = 0
                continue
            skipped_in_a_row += 1
            if skipped_in_a_row >= len(self.stream.rows):  # a whole epoch: no prompt will ever fit
                raise DataError(
                    f"none of the {len(self.stream.rows)} prompts fits rl.max_prompt_tokens="
                    f"{self.cfg.rl.max_prompt_tokens} (after the chat template): raise rl.max_prompt_tokens "
                    "or shorten the prompts"
                )
        return out

    def _can_submit(self) -> bool:
        return self.fleet.idle_capacity() > 0 and (
            bool(self._retry) or self.admission.allowed(self.fleet_version()) > 0)

    def _submit_generation(self, stats: RolloutStats) -> None:
        if self._retry:
            batch = self._retry.pop(0)  # admitted already
        else:
            k = min(self.cfg.rl.prompts_per_request, self.admission.allowed(self.fleet_version()))
            batch = self._next_prompts(k, stats)
            self.admission.start(len(batch))
        ref = self.fleet.submit(
            [ids for _, _, _, ids in batch],
            n=self.cfg.rl.group_size,
            sampling=self.sampling,
            request_ids=[i for i, _, _, _ in batch],
            # Multi-turn: the worker's environment starts each episode from the data row.
            rows=[{"prompt": row.prompt, **row.extra} for _, row, _, _ in batch]
            if self.cfg.rollout.environment is not None else None,
        )
        self._gen_refs[ref] = batch

    def _remove_hung_workers(self) -> None:
        """Workers with a generate call past rollout.generate_timeout_s are hung: removed, their
        prompts generated again by the others; replaced at the next step like dead ones."""
        for index, works in self.fleet.remove_hung_workers():
            self.requeue(works)
            self.workers_lost += 1
            log.warning("rollout worker %s did not answer a generate call within rollout.generate_timeout_s="
                        "%.0fs; it was removed, its prompts go to the other workers and it is replaced at the "
                        "next step", index, self.cfg.rollout.generate_timeout_s)
        if self.fleet.num_workers == 0 and self.restore_fleet is not None:
            self.restore_fleet()

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
                        # An episode's environment may start from its own first observation.
                        prompt_ids=list(c.prompt_token_ids) if c.episode is not None else list(ids),
                        completion_ids=list(c.token_ids),
                        logprobs=list(c.logprobs),
                        finish_reason=c.finish_reason,
                        weight_version=c.weight_version,
                        last_weight_version=c.last_weight_version,
                        # The fleet returns token ids only; reward functions read text.
                        completion_text=_episode_text(c) if c.episode is not None
                        else self.tokenizer.decode(c.token_ids, skip_special_tokens=True),
                        worker_index=c.worker_index,
                        completion_mask=c.loss_mask,
                        episode=c.episode,
                    )
                )
                stats.generated_tokens += len(c.token_ids)
            groups.append(Group(prompt_index, row, samples))
        if not self.reward_actors:  # multi-turn with no reward functions: the environment scores
            self.buffer.put(self._scored(groups, None, stats))
            return
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
        if samples and samples[0][1].episode is not None:
            columns["messages"] = [s.episode["messages"] for _, s in samples]  # the whole episode
        index = self._next_reward_actor % len(self.reward_actors)
        actor = self.reward_actors[index]
        self._next_reward_actor += 1
        ahead = sum(1 for i, _ in self._scored_by.values() if i == index)
        ref = actor.score.remote(
            [s.prompt_text for _, s in samples], [s.completion_text for _, s in samples], dict(columns),
            [g.row.prompt for g, _ in samples],  # as written in the data, for TRL-style functions
        )
        self._reward_refs[ref] = groups
        self._scored_by[ref] = (index, actor)
        self._reward_deadline[ref] = time.time() + (ahead + 1) * self._call_deadline_s

    def reward_calls_in_flight(self) -> int:
        """Score calls sent to the reward actors and not collected yet."""
        return len(self._reward_refs)

    def _check_reward_deadlines(self) -> None:
        """A score call past its deadline means its reward actor is hung (every function has a
        deadline of its own, so a working actor always answers): fail, naming the actor."""
        now = time.time()
        for ref, due in self._reward_deadline.items():
            if due < now and ref in self._reward_refs:
                index, _ = self._scored_by[ref]
                raise TimeoutError(
                    f"reward actor {index} did not answer a score call within its deadline "
                    f"({self._call_deadline_s:.0f}s per call, the reward functions' own deadlines summed: "
                    "reward.timeout_s, functions[i].timeout_s): the actor is hung, e.g. in code that holds "
                    "the GIL (a regular expression that backtracks, a C extension). Fix that function; "
                    "the message of the Ray dashboard's stack dump (`ray stack`) shows where it is")

    def _reward_actor_died(self, ref, groups: list[Group], error: BaseException) -> None:
        """A reward actor died while scoring ``groups``: start a new one in its place (once per
        death, whichever of its calls shows it first) and score the groups again."""
        index, actor = self._scored_by.pop(ref)
        self._reward_deadline.pop(ref, None)
        if self.restart_reward_actor is None:
            raise error
        if self.reward_actors[index] is actor:
            self.reward_restarts += 1
            log.warning("reward actor %d died (%s); restarting it (restart %d of this run) and scoring its "
                        "groups again", index, type(error).__name__, self.reward_restarts)
            self.reward_actors[index] = self.restart_reward_actor(index, actor)
        self.rescored_groups += len(groups)
        self._score(groups)

    def _on_scored(self, ref, stats: RolloutStats) -> list[Group]:
        groups = self._reward_refs.pop(ref)
        try:
            result = ray.get(ref)  # a RewardError (on_error: fail) surfaces here with its message
        except ray.exceptions.RayActorError as e:
            self._reward_actor_died(ref, groups, e)
            return []
        self._scored_by.pop(ref, None)
        self._reward_deadline.pop(ref, None)
        return self._scored(groups, result, stats)

    def _scored(self, groups: list[Group], result, stats: RolloutStats) -> list[Group]:
        """Rewards onto the samples (``result`` None: the environment's turn rewards alone)."""
        samples = [s for g in groups for s in g.samples]
        for i, s in enumerate(samples):
            s.reward = 0.0 if result is None else float(result.rewards[i])
            s.reward_parts = {} if result is None else {n: float(v[i]) for n, v in result.per_function.items()}
            if s.episode is not None:
                # Episode reward: the reward functions' score plus the environment's turn rewards;
                # an episode its environment failed (rollout.episode.on_error: zero) scores 0.
                s.reward = 0.0 if s.episode["env_error"] else \
                    s.reward + sum(r for r in s.episode["turn_rewards"] if r is not None)
        if result is None:
            return self._keep_varied(groups, stats)
        stats.reward_s += sum(result.seconds.values())
        stats.reward_errors += len(result.errors)
        stats.reward_skipped += sum(result.skipped.values())
        stats.reward_hung_calls = max(stats.reward_hung_calls, sum(result.hung_calls.values()))
        for e in result.errors[:3]:
            stats.reward_error_examples.append(f"{e.function}: {e.message}")
        return self._keep_varied(groups, stats)

    def _keep_varied(self, groups: list[Group], stats: RolloutStats) -> list[Group]:
        if not self.cfg.rl.skip_constant_groups:
            return groups
        kept = [g for g in groups if len(set(g.rewards)) > 1]
        stats.groups_skipped_constant += len(groups) - len(kept)
        self._forget([g for g in groups if g not in kept])
        self.admission.give_back(len(groups) - len(kept))  # their places go to new prompts
        return kept

    def _forget(self, groups: list[Group]) -> None:
        for g in groups:
            self._row_of.pop(g.prompt_index, None)

    def _drop_stale(self, groups: list[Group], stats: RolloutStats) -> None:
        """Groups too stale to train: their prompts are generated again, inside the same admission."""
        for g in groups:
            first = g.samples[0]
            self._retry.append([(g.prompt_index, g.row, first.prompt_text, first.prompt_ids)])
        stats.groups_dropped_stale += len(groups)

    def _submit_admitted(self, stats: RolloutStats) -> None:
        """Start every generate call admission and the fleet allow now."""
        while self._can_submit():
            self._submit_generation(stats)
        stats.max_prompts_in_flight = max(stats.max_prompts_in_flight,
                                          sum(len(b) for b in self._gen_refs.values()))
        stats.max_reward_queue = max(stats.max_reward_queue, len(self._reward_refs))

    def _wait_once(self, stats: RolloutStats, until: list, until_deadline: float | None = None) -> list:
        """Submit what admission allows, then handle one finished generate or score call (or return
        the finished ones of ``until``, due by ``until_deadline``, time.time()). Never waits past the
        first deadline of what is in flight."""
        self._submit_admitted(stats)
        pending = list(self._gen_refs) + list(self._reward_refs) + list(until)
        if not pending:
            raise RuntimeError("the collector has nothing in flight and admission starts nothing: "
                               "rl.prompts_per_step or rl.max_staleness leaves no room for a prompt")
        # Wake up by the first deadline at the latest: the oldest generate call's (a hung engine never
        # answers), a score call's, or the caller's.
        deadlines = [d for d in (self.fleet.next_deadline() if self._gen_refs else None, until_deadline,
                                 *(self._reward_deadline[r] for r in self._reward_refs)) if d is not None]
        timeout = max(0.1, min(deadlines) - time.time()) if deadlines else IDLE_WAKE_S
        ready, _ = ray.wait(pending, num_returns=1, timeout=timeout)
        self._remove_hung_workers()
        if not ready:
            self._check_reward_deadlines()
        for ref in ready:
            if ref in self._gen_refs:
                self._on_generated(ref, stats)
                stats.last_generated = time.perf_counter()
            elif ref in self._reward_refs:
                self.buffer.put(self._on_scored(ref, stats))
        return [r for r in ready if r in until]

    def collect(self, num_groups: int, learner_version: int = 0) -> tuple[list[Group], RolloutStats]:
        """``num_groups`` scored groups, none staler than rl.max_staleness at ``learner_version``
        (the version the learner holds: the step's number)."""
        stats = RolloutStats()
        done: list[Group] = []
        start = stats.start = stats.last_generated = time.perf_counter()
        while True:
            taken = self.buffer.take(num_groups - len(done), learner_version)
            self._drop_stale(taken.dropped, stats)
            done.extend(taken.groups)
            stats.staleness.extend(taken.staleness)
            if len(done) == num_groups:
                break
            self._wait_once(stats, until=[])
        self._forget(done)
        stats.learner_wait_s = time.perf_counter() - start
        stats.reward_wait_s = time.perf_counter() - max(start, stats.last_generated)
        return done, stats

    def pump(self, refs: list, stats: RolloutStats, timeout_s: float, names: list[str] | None = None) -> None:
        """Keep generating and scoring (as admission allows) until every ref in ``refs`` is done:
        the fleet works for the coming steps while the learner trains (rl.max_staleness > 0).

        The first ref that fails raises its error at once (the other ranks may be waiting on it in a
        collective); refs not done within ``timeout_s`` (learner.call_timeout_s) raise a TimeoutError
        naming them (``names[i]`` says who answers ``refs[i]``)."""
        left = list(refs)
        deadline = time.time() + timeout_s
        while left:
            self._submit_admitted(stats)  # first: what starts now is not idle time
            idle = not self._gen_refs
            t = time.perf_counter()
            for ref in self._wait_once(stats, until=left, until_deadline=deadline):
                left.remove(ref)
                ray.get(ref)  # ready: raises the rank's own error if it failed
            if idle:
                stats.fleet_idle_s += time.perf_counter() - t
            if left and time.time() >= deadline:
                late = [names[refs.index(r)] if names else f"call {refs.index(r)}" for r in left]
                raise TimeoutError(
                    f"the learner's train call did not finish within {timeout_s:.0f}s (learner.call_timeout_s): "
                    f"no answer from {', '.join(late)}. A rank stuck in a collective holds up the others: "
                    "check that actor in the Ray dashboard, or raise learner.call_timeout_s for very long steps")

    def pending_prompts(self) -> list[list[int]]:
        """[prompt index, data row] of every prompt started but not trained yet: in flight, being
        scored, buffered, waiting to be generated again (a checkpoint records them; a resume
        generates them first, under the same prompt index)."""
        return [[i, self._row_of[i]] for i in sorted(self._row_of)]

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "prompts_submitted": self._prompts_submitted,
                "pending": self.pending_prompts(), "admitted": self.admission.started}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self._prompts_submitted = state["prompts_submitted"]
        for prompt_index, row_index in state.get("pending", []):
            prompt = self._prompt(row_index, prompt_index=prompt_index)
            if prompt is not None:
                self._retry.append([prompt])
        # Pending prompts were admitted before the checkpoint: they start again without new room.
        self.admission.started = state.get("admitted", 0)
