"""``fleetrl check``: what a run needs, checked in the driver before Ray, vLLM or DeepSpeed start.

The same checks open ``fleetrl train`` (``train.train`` calls :func:`check_run`), so a bad input ends
in seconds with one message instead of minutes later inside an actor. Checked, in order: the config
(by ``load_config``), the model (a local directory with config.json, the built-in tiny models, or a
hub id found in the local cache; no network wait when HF_HUB_OFFLINE is set), the tokenizer and the
chat template (every prompt is rendered), a teacher's or a given reference model's tokenizer (the
policy's), every data row (the first CHECK_SAMPLE_ROWS of streamed
data, and the report says so), the reward functions (rule files imported, the columns they name
present in the data; reward models reachable), the output location (writable, not an earlier run
unless run.resume) and, when joining an existing cluster (ray.address / RAY_ADDRESS), the resources
asked for against the cluster's. Each problem is one line naming the setting, file or column to fix.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetrl.run.config import OFFLINE_ALGORITHMS, ConfigError, RunConfig, did_you_mean, load_config

CHECK_SAMPLE_ROWS = 10_000  # rows read from streamed (large) data; files are read whole
HUB_PROBE_TIMEOUT_S = 10.0  # one metadata request for a hub model missing from the cache
RUN_FILES = frozenset({"config.yaml", "train.log"})  # what a start that failed before step 1 leaves
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckError(ConfigError):
    """One or more inputs of a run are wrong; the message has one line per problem."""


@dataclass
class CheckReport:
    cfg: RunConfig
    notes: list[str] = field(default_factory=list)  # what was checked, one line each

    def summary(self) -> str:
        return "\n".join(f"  ok  {n}" for n in self.notes)


def check_config(path: str | Path, overrides=(), cluster: bool = True) -> CheckReport:
    """``fleetrl check CONFIG [overrides]``: load and validate the config, then :func:`check_run`."""
    return check_run(load_config(path, overrides), path, cluster=cluster)


def check_run(cfg: RunConfig, config_path: str | Path | None = None, cluster: bool = True) -> CheckReport:
    """Every check of the module docstring; CheckError listing all problems found, else the report."""
    base_dir = Path(config_path).resolve().parent if config_path else Path.cwd()
    report, problems = CheckReport(cfg), []
    state: dict[str, Any] = {}

    def step(name: str, fn: Callable[[], str | None]) -> None:
        try:
            note = fn()
        except _SKIPPED:
            return
        except (ValueError, OSError, ImportError, TypeError, RuntimeError) as e:
            problems.append(f"{name}: {_one_line(e)}")
            return
        if note:
            report.notes.append(f"{name}: {note}")

    step("dependencies", lambda: _check_dependencies(cfg))
    step("model", lambda: _check_model_step(cfg, state))
    step("tokenizer", lambda: _check_tokenizer(cfg, state))
    if cfg.teacher is not None:
        step("teacher", lambda: check_teacher_tokenizer(cfg, state))
    if cfg.online_dpo.reference_model_path is not None:
        step("online_dpo.reference_model_path", lambda: check_reference_model(cfg, state))
    if cfg.learner.lora is not None:
        step("learner.lora", lambda: _check_lora(cfg, state))
    step("data", lambda: _check_data(cfg, state))
    if cfg.algorithm not in OFFLINE_ALGORITHMS:
        for i, fc in enumerate(cfg.reward.functions):
            step(f"reward.functions.{i} ({fc.name})", lambda fc=fc: _check_reward_function(fc, base_dir, state))
        if cfg.rollout.environment is not None:
            step("rollout.environment", lambda: _check_environment(cfg, base_dir, state))
    step("run.output_dir", lambda: check_output(cfg))
    if cluster:
        step("cluster", lambda: _check_cluster(cfg))
    if problems:
        head = f"{len(problems)} problem{'s' if len(problems) > 1 else ''} found before starting anything"
        raise CheckError(head + ":\n  " + "\n  ".join(problems))
    return report


class _Skipped(Exception):
    """A check that cannot run because an earlier one failed (that failure is already reported)."""


_SKIPPED = _Skipped


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# ---------------------------------------------------------------------------------------------
# Models and tokenizers


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model(path: str, setting: str, probe: Callable[[str], Any] | None = None) -> str:
    """Where ``path`` (the value of ``setting``) is found: a local directory, a built-in tiny model or
    the hub cache. ValueError naming the setting otherwise; with HF_HUB_OFFLINE set, one line and no
    network. ``probe`` (tests) replaces the hub metadata request."""
    from fleetrl.testing.pretrained import PRETRAINED_NAMES, ModelNotInstalled, describe_pretrained
    from fleetrl.testing.tiny import TINY_NAMES

    if path in TINY_NAMES:
        return f"{path} (built-in tiny model, built and cached on first use)"
    if path in PRETRAINED_NAMES:
        try:
            return describe_pretrained(path)
        except ModelNotInstalled as e:
            raise ValueError(f"{setting}: {e}") from None
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ValueError(f"{setting}={path!r} is not a model directory (no config.json in it); point "
                             "it at a Hugging Face model directory (save_pretrained) or a hub id")
        return f"{p.resolve()} (local directory)"
    if not _REPO_ID.match(path):
        raise ValueError(f"{setting}={path!r}: no such directory ({p.resolve()}), and it is not a hub id "
                         "(org/name); check the path")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return f"{path} (hub id, found in the local cache)"
    if hub_offline():
        raise ValueError(f"{setting}={path!r} is not in the local hub cache and HF_HUB_OFFLINE is set, so it "
                         "cannot be downloaded: download it where the hub is reachable (huggingface-cli "
                         "download), or point at a local directory")
    try:
        (probe or _probe_hub)(path)
    except Exception as e:  # noqa: BLE001 - any hub/network failure is one line
        raise ValueError(f"{setting}={path!r} is not in the local hub cache and the hub did not answer "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); with no "
                         "network, set HF_HUB_OFFLINE=1 and fill the cache first, or use a local directory") from None
    return f"{path} (hub id, downloaded at start)"


def _probe_hub(repo: str) -> None:
    from huggingface_hub import model_info

    model_info(repo, timeout=HUB_PROBE_TIMEOUT_S)


def _check_model_step(cfg: RunConfig, state: dict) -> str:
    note = check_model(cfg.model.path, "model.path")
    state["model"] = cfg.model.path
    if cfg.model.tokenizer:
        check_model_or_tokenizer(cfg.model.tokenizer)
    return note


def check_model_or_tokenizer(path: str) -> None:
    """A tokenizer directory needs no config.json: only that it exists (or is a hub id)."""
    if Path(path).expanduser().is_dir():
        return
    check_model(path, "model.tokenizer")


def _check_tokenizer(cfg: RunConfig, state: dict) -> str:
    if "model" not in state:
        raise _Skipped
    from fleetrl.run.runtime import load_tokenizer, resolve_model

    source = cfg.model.tokenizer or resolve_model(cfg.model.path)
    try:
        tok = load_tokenizer(source)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one line each
        raise ValueError(f"cannot load the tokenizer of {source} ({type(e).__name__}: {_one_line(e)[:200]}); "
                         "set model.tokenizer to a directory with tokenizer files") from None
    state["tokenizer"] = tok
    from fleetrl.data.rows import has_chat_template

    template = "with a chat template" if has_chat_template(tok) else "no chat template (prompts used as written)"
    return f"{type(tok).__name__}, {template}"


TOKENIZER_PROBE = "The teacher scores every token: 12 + 30 = 42, ünïcödé, <tag> \n\tend."


def _check_same_tokenizer(cfg: RunConfig, state: dict, setting: str, value: str, who: str, why: str) -> str:
    """The model at `value` (the value of `setting`) scores the policy's token ids: it must exist and its
    tokenizer must be the policy's (same vocabulary, same encoding of a probe text)."""
    if "tokenizer" not in state:
        raise _Skipped
    from fleetrl.run.runtime import load_tokenizer, resolve_model

    check_model(value, setting)
    path = resolve_model(value)
    try:
        theirs = load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one line each
        raise ValueError(f"cannot load the tokenizer of {setting}={value} "
                         f"({type(e).__name__}: {_one_line(e)[:200]})") from None
    ours = state["tokenizer"]
    same_vocab = theirs.get_vocab() == ours.get_vocab()
    if not same_vocab or theirs.encode(TOKENIZER_PROBE) != ours.encode(TOKENIZER_PROBE):
        what = "vocabulary" if not same_vocab else "encoding of a probe text"
        raise ValueError(
            f"{setting}={value} has a different tokenizer from the {who}'s (model.path={cfg.model.path}): its "
            f"{what} differs. {why}")
    return f"{path}, same tokenizer as the {who}"


def check_teacher_tokenizer(cfg: RunConfig, state: dict) -> str:
    """The teacher scores the student's token ids: its tokenizer must be the student's (same vocabulary,
    same encoding of a probe text). A teacher may be larger or another architecture."""
    return _check_same_tokenizer(
        cfg, state, "teacher.model_path", cfg.teacher.model_path, "student",
        "The teacher scores the student's token ids, so both must share one tokenizer (the teacher may be "
        "larger or another architecture)")


def check_reference_model(cfg: RunConfig, state: dict) -> str:
    """online_dpo.reference_model_path: the frozen reference scores the policy's pairs, so it needs the
    policy's tokenizer (it may be another size or architecture)."""
    return _check_same_tokenizer(
        cfg, state, "online_dpo.reference_model_path", cfg.online_dpo.reference_model_path, "policy",
        "The reference scores the policy's token ids, so both must share one tokenizer (the reference may be "
        "another size or architecture)")


def _check_lora(cfg: RunConfig, state: dict) -> str:
    """learner.lora against the model itself (its skeleton, no weights): the target modules exist,
    and an online run trains only what a weight sync can carry to the fleet."""
    if "model" not in state:
        raise _Skipped
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fleetrl.learner.lora import adapter_tensors, apply_lora
    from fleetrl.run.runtime import resolve_model

    kind = "seq_cls" if cfg.algorithm == "rm" else "causal_lm"
    model_cfg = AutoConfig.from_pretrained(resolve_model(cfg.model.path))
    if kind == "seq_cls":
        model_cfg.num_labels = 1
    loader = AutoModelForSequenceClassification if kind == "seq_cls" else AutoModelForCausalLM
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on tied embeddings: the error below says what matters
        model = loader.from_config(model_cfg)
        peft_model = apply_lora(model, cfg.learner.lora, kind)
    if cfg.algorithm not in OFFLINE_ALGORITHMS:
        n = len(adapter_tensors(peft_model))
        return f"{n} adapter matrices on {cfg.learner.lora.target_modules}, all carried by the weight sync"
    return f"adapters on {cfg.learner.lora.target_modules}"


def _check_dependencies(cfg: RunConfig) -> str | None:
    """Packages the config asks for that are optional extras of fleetrl: present, or one line
    saying which extra to install."""
    import importlib.util

    missing = []
    if cfg.algorithm not in OFFLINE_ALGORITHMS and importlib.util.find_spec("vllm") is None:
        missing.append(f"{cfg.algorithm} generates with vLLM, which is not installed: pip install "
                       "'fleetrl[cpu]' (CPU build) or 'fleetrl[gpu]'")
    if cfg.run.wandb is not None and importlib.util.find_spec("wandb") is None:
        missing.append("run.wandb is set but the wandb package is not installed: pip install 'fleetrl[wandb]' "
                       "or unset run.wandb")
    scheme, sep, _ = cfg.run.output_dir.partition("://")
    if sep and scheme != "file":
        import fsspec

        try:
            fsspec.get_filesystem_class(scheme)
        except ImportError as e:
            extra = " (pip install 'fleetrl[s3]')" if scheme in ("s3", "s3a") else ""
            missing.append(f"run.output_dir={cfg.run.output_dir!r} needs a package that is not installed{extra}: "
                           f"{_one_line(e)[:200]}")
        except ValueError:
            missing.append(f"run.output_dir={cfg.run.output_dir!r}: fsspec knows no storage '{scheme}://'; use "
                           "a local path, a shared mount, or s3://bucket/prefix")
    if missing:
        raise ValueError("; ".join(missing))
    return None


# ---------------------------------------------------------------------------------------------
# Data


def _check_data(cfg: RunConfig, state: dict) -> str:
    from fleetrl.data.rows import DataError, load_rows, load_train_eval, render_prompt

    online = cfg.algorithm not in OFFLINE_ALGORITHMS
    kind = "prompt" if online else None
    data, sampled = _bounded(cfg.data)
    rows, held = load_train_eval(data, kind=kind)
    if cfg.eval_data is not None:
        eval_cfg, eval_sampled = _bounded(cfg.eval_data)
        held = load_rows(eval_cfg, kind=kind)
        sampled = sampled or eval_sampled
    tok = state.get("tokenizer")
    too_long = 0
    for row in [*rows, *held]:
        if tok is None:
            continue
        text = render_prompt(row, tok, cfg.data.apply_chat_template)
        if online and len(tok(text, add_special_tokens=False)["input_ids"]) > cfg.rl.max_prompt_tokens:
            too_long += 1
    if online and rows and too_long >= len(rows) + len(held):
        raise DataError(f"every prompt is longer than rl.max_prompt_tokens={cfg.rl.max_prompt_tokens} tokens: "
                        "raise it or shorten the prompts")
    if not online:
        _check_numbers(cfg, [*rows, *held])
    columns: set[str] = set()
    for row in rows:
        columns |= set(row.extra)
    state["columns"] = columns
    state["row_kind"] = type(rows[0]).__name__ if rows else None
    text = (f"{len(rows)} rows" + (f" + {len(held)} held out" if held else "")
            + (f" (the first {CHECK_SAMPLE_ROWS} of streamed data only)" if sampled else "")
            + f", columns {sorted(columns) or 'none besides the prompt'}")
    if too_long:
        text += f"; {too_long} prompt(s) longer than rl.max_prompt_tokens will be skipped"
    return text


def _check_numbers(cfg: RunConfig, rows) -> None:
    """Score and margin columns an offline trainer reads: a finite number in every row (NaN or inf
    would reach the loss)."""
    from fleetrl.data.offline import row_number
    from fleetrl.data.rows import PreferenceRow

    section = getattr(cfg, cfg.algorithm, None)
    score_key, margin_key = getattr(section, "score_key", None), getattr(section, "margin_key", None)
    for row in rows:
        if score_key is not None and not isinstance(row, PreferenceRow):
            row_number(row, score_key, f"{cfg.algorithm}.score_key", f"unset {cfg.algorithm}.score_key")
        if margin_key is not None and isinstance(row, PreferenceRow):
            row_number(row, margin_key, f"{cfg.algorithm}.margin_key", f"unset {cfg.algorithm}.margin_key")


def _bounded(data):
    """Streamed data is checked on its first CHECK_SAMPLE_ROWS rows; files are read whole."""
    if data.streaming and (data.max_rows is None or data.max_rows > CHECK_SAMPLE_ROWS):
        return data.model_copy(update={"max_rows": CHECK_SAMPLE_ROWS}), True
    return data, False


# ---------------------------------------------------------------------------------------------
# Reward functions


def _check_reward_function(fc, base_dir: Path, state: dict) -> str:
    from fleetrl.reward.scorer import build_function

    if fc.kind == "http":
        return f"http {fc.url} (not contacted by the check)"
    if fc.kind == "model":
        return check_model(fc.model_path, f"reward.functions[{fc.name}].model_path")
    func = build_function(fc, base_dir)  # imports the rule file: RewardLoadError names file and line
    columns = state.get("columns")
    if columns is None:
        return f"{func.label} loaded (columns not checked: the data did not load)"
    if fc.kind == "rule":
        needed = sorted(func.fn.required_columns())
        code = getattr(func.fn.fn, "__code__", None)
        where = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else fc.path
        style = "TRL-style" if func.fn.trl_style else "fleetrl-style"
    else:
        key = next((k for k in ("answer_key", "letter_key") if hasattr(func.fn, k)), None)
        needed = [getattr(func.fn, key)] if key else []
        where, style = f"builtin {fc.builtin}", "builtin"
    missing = [c for c in needed if c not in columns]
    if missing:
        hints = "".join(did_you_mean(c, columns) for c in missing)
        raise ValueError(
            f"{where} reads data column(s) {missing}{hints} but the data's columns are {sorted(columns) or 'none'}; "
            "add the column to the data, rename the parameter"
            + (", or set the builtin's kwargs key" if fc.kind == "builtin" else "")
        )
    return f"{func.label} ({style}) reads {needed or 'no columns'}"


def _check_environment(cfg: RunConfig, base_dir: Path, state: dict) -> str:
    from fleetrl.env import load_environment, resolve_environment

    # Imports the file and builds the class with rollout.episode.env_kwargs (EnvLoadError names both).
    spec = resolve_environment(cfg.rollout.environment, base_dir, cfg.rollout.episode.env_kwargs)
    env = load_environment(spec)(**cfg.rollout.episode.env_kwargs)
    # What it needs on this machine (ToolEnv: a python sandbox that isolates, else it refuses to run).
    preflight = getattr(env, "preflight", None)
    note = preflight() if callable(preflight) else None
    if "tokenizer" in state:  # multi-turn episodes need a template that renders turns and tools
        from fleetrl.env.episode import ChatDelta

        delta = ChatDelta(state["tokenizer"])
        if getattr(env, "tools", None):
            delta.check_tools(env.tools)
    return f"{cfg.rollout.environment} loads and builds" + (f"; {note}" if note else "")


# ---------------------------------------------------------------------------------------------
# Output and cluster


def holds_run(path: Path) -> bool:
    """A directory an earlier run wrote into (anything beyond what a failed start leaves)."""
    return path.is_dir() and any(p.name not in RUN_FILES for p in path.iterdir())


def check_output(cfg: RunConfig) -> str:
    """The run directory can be written and is not an earlier run (unless run.resume)."""
    out = cfg.run.output_dir
    if "://" in out:
        return f"{out} is a URI: checked by its storage layer when the run starts"
    root = Path(out).expanduser()
    if cfg.run.name is not None:
        run_dir = root / cfg.run.name
        if holds_run(run_dir) and not cfg.run.resume:
            raise ValueError(f"run directory {run_dir} already holds a run; set run.resume=true to continue it, "
                             "or choose another run.name")
    existing = next((p for p in [root, *root.resolve().parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ValueError(f"{out}: {existing} is a file, not a directory; set run.output_dir to a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: {existing} is not writable by this user; set run.output_dir to a writable "
                         "directory (on a cluster: a shared mount or an object-store URI)")
    return f"{root.resolve()} writable"


def service_demands(cfg: RunConfig, cluster_has_gpus: bool) -> dict[str, tuple[int, dict[str, float], str]]:
    """Each kind of actor the run places: name -> (how many, the Ray resources of one, the keys that set
    them). Learner ranks always; rollout workers and reward actors for online algorithms."""
    ro, lc, rw = cfg.rollout, cfg.learner, cfg.reward
    gpu_default = 1.0 if cluster_has_gpus else 0.0
    rollout_gpus = ro.num_gpus_per_worker if ro.num_gpus_per_worker is not None else (
        float(ro.tensor_parallel_size) if cluster_has_gpus else 0.0)
    learner_gpus = lc.num_gpus_per_rank if lc.num_gpus_per_rank is not None else gpu_default

    def one(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
        return {k: float(v) for k, v in {"CPU": cpus, "GPU": gpus, **custom}.items() if v}

    demands = {"learner rank": (lc.num_ranks, one(lc.num_cpus_per_rank, learner_gpus, lc.resources_per_rank),
                                "learner.num_cpus_per_rank / num_gpus_per_rank / resources_per_rank")}
    if cfg.algorithm not in OFFLINE_ALGORITHMS:
        demands["rollout worker"] = (ro.num_workers, one(ro.num_cpus_per_worker, rollout_gpus, ro.resources),
                                     "rollout.num_cpus_per_worker / num_gpus_per_worker / resources")
        demands["reward actor"] = (rw.num_workers, one(rw.num_cpus, rw.num_gpus, rw.resources),
                                   "reward.num_cpus / num_gpus / resources")
        if cfg.teacher is not None:
            tc = cfg.teacher
            demands["teacher"] = (tc.num_actors, one(tc.num_cpus_per_actor, tc.num_gpus_per_actor, {}),
                                  "teacher.num_cpus_per_actor / num_gpus_per_actor")
    return {k: v for k, v in demands.items() if v[0] > 0}


def requested_resources(cfg: RunConfig, cluster_has_gpus: bool) -> dict[str, float]:
    """Ray resources the run's actors ask for in total (rollout workers, learner ranks, reward actors)."""
    total: dict[str, float] = {}
    for count, one, _ in service_demands(cfg, cluster_has_gpus).values():
        for k, v in one.items():
            total[k] = total.get(k, 0.0) + count * v
    return {k: v for k, v in total.items() if v}


def _node_label(node: dict) -> str:
    """'127.0.0.2 (CPU 4, rollout 1)': a node's address and what it offers (Ray's own node: keys left out)."""
    res = node.get("Resources", {})
    shown = [f"{k} {v:g}" for k, v in sorted(res.items())
             if not k.startswith("node:") and k not in ("memory", "object_store_memory") and v]
    return f"{node.get('NodeManagerAddress', '?')} [{str(node.get('NodeID', ''))[:8]}] ({', '.join(shown)})"


def nodes_that_fit(one: dict[str, float], nodes: list[dict], count: int) -> list[tuple[dict, int]]:
    """(node, how many such actors its total resources hold) for each node that holds at least one."""
    fits = []
    for node in nodes:
        res = node.get("Resources", {})
        if all(res.get(k, 0.0) + 1e-9 >= v for k, v in one.items()):
            fits.append((node, min((int(res.get(k, 0.0) / v + 1e-9) for k, v in one.items() if v), default=count)))
    return fits


def check_output_reach(cfg: RunConfig, demands: dict[str, tuple[int, dict[str, float], str]], nodes: list[dict],
                       driver_node: str | None) -> str | None:
    """A local run.output_dir is refused when a learner rank may be placed on a node other than the
    driver's: the checkpoints and final_model/ it writes would stay on that node, and a resume or the
    user would not find them. None when nothing is wrong."""
    if "://" in cfg.run.output_dir or cfg.run.output_dir_shared or "learner rank" not in demands:
        return None
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    if len(alive) < 2:  # one node: the ranks run where the driver does
        return None
    _, one, _ = demands["learner rank"]
    others = [node for node, _ in nodes_that_fit(one, alive, 1) if node.get("NodeID") != driver_node]
    if not others:
        return None
    return (f"run.output_dir={cfg.run.output_dir} is a local path, but learner ranks may run on other nodes "
            f"({'; '.join(_node_label(n) for n in others)}): the checkpoints and final_model/ they write would "
            "stay on those nodes. Use storage every node reaches: run.output_dir=s3://BUCKET/prefix (or another "
            "object store, with run.storage_options), or, if it is a shared filesystem mounted at the same path "
            "on every node, set run.output_dir_shared=true")


def placement_by_node(demands: dict[str, tuple[int, dict[str, float], str]], nodes: list[dict],
                      draining: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Which alive nodes can hold one actor of each service (by the node's total resources), as lines
    for the report, and a problem for each service no node can hold at all (it would wait, unplaced,
    for its deadline). Whether all actors fit at once is the total check's job (resource_shortfall).
    A draining node (``draining``: node ids) takes no new actor: it counts as gone, and is named."""
    draining = set(draining)
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True)) and n.get("NodeID") not in draining]
    lines, problems = [], []
    leaving = [n for n in nodes if n.get("NodeID") in draining]
    if leaving:
        lines.append(f"draining, so left out: {'; '.join(_node_label(n) for n in leaving)}")
    for name, (count, one, keys) in demands.items():
        asks = ", ".join(f"{k} {v:g}" for k, v in sorted(one.items())) or "nothing"
        fits = [f"{_node_label(node)} x{room}" for node, room in nodes_that_fit(one, alive, count)]
        if fits:
            lines.append(f"{count} {name}(s) (each {asks}) can go on: {'; '.join(fits)}")
        else:
            custom = json.dumps({k: v for k, v in one.items() if k not in ("CPU", "GPU")})
            how = f"`ray start --resources='{custom}'`" if custom != "{}" else "`ray start --num-cpus/--num-gpus`"
            problems.append(
                f"no node can hold a {name} (one asks for {asks}); the nodes have: "
                f"{'; '.join(_node_label(n) for n in alive) or 'none alive'}. Give a node those resources "
                f"({how}, or a KubeRay worker group's rayStartParams) or change {keys}")
    return lines, problems


def resource_shortfall(requested: dict[str, float], cluster: dict[str, float]) -> list[str]:
    """'GPU: asks 8, the cluster has 4' for each resource the cluster has too little of."""
    return [f"{k}: the run asks for {v:g}, the cluster has {cluster.get(k, 0):g}"
            for k, v in sorted(requested.items()) if v > cluster.get(k, 0) + 1e-9]


def local_ray_resources(cfg: RunConfig) -> tuple[dict[str, float], str]:
    """What the local Ray the run starts will have (CPU: ray.num_cpus, else this machine's cores; its
    GPUs; no custom resources), and where that comes from; the Ray of this process when one runs."""
    import ray

    if ray.is_initialized():
        try:
            return {k: float(v) for k, v in ray.cluster_resources().items()}, "the Ray this process already runs"
        except Exception:  # noqa: BLE001 - still starting (train starts it beside the checks): as configured
            pass
    cpus = cfg.ray.num_cpus if cfg.ray.num_cpus is not None else os.cpu_count() or 1
    have = {"CPU": float(cpus)}
    import torch

    if torch.cuda.is_available():
        have["GPU"] = float(torch.cuda.device_count())
    where = f"ray.num_cpus={cfg.ray.num_cpus}" if cfg.ray.num_cpus is not None else \
        f"ray.num_cpus unset: this machine's {cpus} cores"
    return have, f"a local Ray ({where}, {int(have.get('GPU', 0))} GPUs, no custom resources)"


def _check_local(cfg: RunConfig) -> str:
    """The run's actors fit the local Ray it starts (else they would wait, unplaced, until a deadline)."""
    have, where = local_ray_resources(cfg)
    want = requested_resources(cfg, have.get("GPU", 0) > 0)
    short = resource_shortfall(want, have)
    if short:
        hints = []
        if any(s.startswith("CPU:") for s in short):
            hints.append(f"set ray.num_cpus: {int(want['CPU'] + 0.999)} (logical CPUs may exceed the cores) or "
                         "lower the per-actor num_cpus")
        if any(s.startswith("GPU:") for s in short):
            hints.append("lower learner.num_gpus_per_rank / rollout.num_gpus_per_worker / reward.num_gpus")
        if any(not s.startswith(("CPU:", "GPU:")) for s in short):
            hints.append("custom resources (rollout.resources, learner.resources_per_rank, reward.resources) "
                         "exist only on cluster nodes that declare them: remove them, or join that cluster "
                         "(ray.address)")
        raise ValueError(f"{where} cannot give this config what it asks ({'; '.join(short)}): "
                         + "; ".join(hints))
    return f"{where}: {', '.join(f'{k} {v:g}' for k, v in sorted(want.items()))} of " \
           f"{', '.join(f'{k} {have.get(k, 0):g}' for k in sorted(want))}"


def _check_cluster(cfg: RunConfig) -> str | None:
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not address:
        return _check_local(cfg)
    import ray

    from fleetrl.run.runtime import connect_ray

    connect_ray(cfg.ray)
    have = {k: float(v) for k, v in ray.cluster_resources().items()}
    demands = service_demands(cfg, have.get("GPU", 0) > 0)
    want = requested_resources(cfg, have.get("GPU", 0) > 0)
    autoscaler = "(an autoscaler may add nodes: then ignore this with --no-cluster)"
    from fleetrl.core.nodes import draining_nodes

    placed, unplaceable = placement_by_node(demands, ray.nodes(), draining_nodes())
    if unplaceable:
        raise ValueError(f"cluster {address}: " + "; ".join(unplaceable) + f" {autoscaler}")
    short = resource_shortfall(want, have)
    if short:
        raise ValueError(f"cluster {address} is too small for this config ({'; '.join(short)}): lower "
                         "rollout.num_workers / learner.num_ranks / their per-actor resources, or add nodes "
                         f"{autoscaler}")
    driver_node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    unreachable = check_output_reach(cfg, demands, ray.nodes(), driver_node)
    if unreachable:
        raise ValueError(unreachable)
    return f"{address}: {', '.join(f'{k} {v:g}' for k, v in sorted(want.items()))} of " \
           f"{', '.join(f'{k} {have.get(k, 0):g}' for k in sorted(want))}\n    " + "\n    ".join(placed)
