"""The run config: one tree composed of each service's own pydantic model.

Loaded from YAML, then dotted command-line overrides (``learner.lr=1e-6``) are applied, then
the whole tree is validated. Unknown keys and bad values are errors that name the key, where it
came from (the file or the override) and what is allowed.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator, model_validator

# Importing the package (not .registry) registers every algorithm file.
from fleetrl.algos import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, OnlineAlgorithm
from fleetrl.algos import ONLINE_ALGORITHMS as ONLINE_REGISTRY
from fleetrl.core.secrets import has_env_ref
from fleetrl.core.strict import EnvStr, StrictModel
from fleetrl.data.rows import DataConfig, looks_like_dataset_name
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.critic_config import CriticConfig
from fleetrl.learner.offline_config import (
    OFFLINE_ALGORITHMS,
    PAPER_DEFAULTS,
    REFERENCE_ALGORITHMS,
    DPOConfig,
    IPOConfig,
    KTOConfig,
    OfflineConfig,
    OfflinePPOConfig,
    ORPOConfig,
    RMConfig,
    SFTConfig,
    SimPOConfig,
)
from fleetrl.learner.teacher_config import OPDConfig, TeacherConfig
from fleetrl.reward.config import RewardConfig
from fleetrl.rollout.config import RolloutConfig

# Online RL: samples come from the rollout fleet and are scored by the reward service. Each online
# algorithm is declared in fleetrl.algos next to its pieces (advantage estimator, policy loss,
# critic or not, its defaults): grpo, drgrpo, rloo, gspo, cispo (one advantage per sample from its
# group) and ppo, reinforce_pp, reinforce_pp_baseline (per-token advantages of KL-shaped rewards).
ONLINE_ALGORITHMS = ONLINE_REGISTRY.names()
# Offline: fixed data, no rollouts (SFT, reward model, DPO/cDPO, IPO, KTO, ORPO, SimPO, offline PPO with
# binary rewards); see learner/offline.py.
# Known algorithms whose trainers are not in this version yet: naming one is a clear error.
PLANNED_ALGORITHMS: tuple[str, ...] = ()
ALGORITHMS = ONLINE_ALGORITHMS + OFFLINE_ALGORITHMS + PLANNED_ALGORITHMS
# Used when an rm config names no model.path: the built-in tiny sequence-classification model.
DEFAULT_RM_MODEL = "tiny-reward"


class ConfigError(ValueError):
    """A config that cannot run; the message says where and what to change."""


class ModelConfig(StrictModel):
    # "tiny" builds (once, cached) the project's own random-init tiny model; else an HF dir or hub id.
    path: str = "tiny"
    tokenizer: str | None = None  # default: the model's own


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]{0,199}$")


class RunSection(StrictModel):
    # A local path (on a cluster: a mount every node shares) or an object-store URI (s3://bucket/prefix,
    # S3 and compatible through s3fs). Checkpoints, logs and the final model go there from every node.
    output_dir: str = "runs"
    # A local output_dir on a cluster whose learner ranks may run on other nodes is refused by the
    # check (what a rank writes there would stay on its node) unless it is a shared mount at the same
    # path on every node: then say so here.
    output_dir_shared: bool = False
    # fsspec/s3fs options for output_dir (endpoint_url, key, secret, client_kwargs, ...); default: the
    # usual AWS environment variables. Secret values are redacted wherever the config is shown or saved.
    storage_options: dict[str, Any] = {}
    name: str | None = None  # default: <algorithm>-<timestamp>
    seed: int = 0
    # Online: training iterations (rollout batch -> update -> weight sync), 100 when unset.
    # Offline: optimizer steps, overriding offline.epochs when set.
    steps: int | None = Field(None, ge=1, description="training iterations / optimizer steps")
    # On by default: a long run that dies loses at most this many steps. `save_every` is the old name.
    checkpoint_every: int = Field(50, ge=0, validation_alias=AliasChoices("checkpoint_every", "save_every"),
                                  description="checkpoint every N steps (and at the end); 0 = only at the end")
    # Complete checkpoints kept; an older one is deleted only once a newer one is complete. 0 = keep all.
    keep_last: int = Field(2, ge=0)
    resume: bool = False  # continue the run in output_dir/name from its last checkpoint (needs run.name)
    # Online: a fault the loop cannot absorb (a dead learner rank, a sync that timed out) restarts the
    # services from the last complete checkpoint, at most this many times (online/supervisor.py).
    max_restarts: int = Field(3, ge=0, description="automatic restarts from the last checkpoint")
    # Write every sample (prompt, completion, reward, worker, weight version) to samples.jsonl.
    log_samples: bool = False
    tensorboard: bool = True  # event files in <run dir>/tensorboard
    # Weights & Biases: keyword arguments of wandb.init (project, entity, ...); needs fleetrl[wandb].
    wandb: dict | None = None
    # The console shows fleetrl's lines and real warnings/errors; library noise (progress bars, known
    # harmless warnings) goes to train.log only. true (or `fleetrl train --verbose`): all of it.
    verbose: bool = False

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        """The run directory is output_dir/name (and, for object stores, a local mirror of that name
        is cleared at start): a name must be one plain path component."""
        if v is None:
            return v
        if not _RUN_NAME.match(v) or ".." in v:
            raise ValueError(
                f"run.name={v!r} must be one plain directory name: letters, digits and . _ - + = @ only, "
                "starting with a letter or digit, no '/' or '\\', no '..', not absolute (it is joined to "
                "run.output_dir; put the parent directories in run.output_dir instead)")
        return v

    @field_validator("output_dir")
    @classmethod
    def _uri_has_a_bucket(cls, v: str) -> str:
        scheme, sep, rest = v.partition("://")
        if sep and scheme != "file" and not rest.split("/", 1)[0]:
            raise ValueError(
                f"run.output_dir={v!r} names no bucket: write {scheme}://BUCKET/prefix (a URI without a "
                "bucket would not reach the object store)")
        if not v.strip():
            raise ValueError("run.output_dir is empty: set a directory (default: runs) or an object-store URI")
        return v

    @model_validator(mode="after")
    def _resume_needs_a_name(self) -> RunSection:
        if self.resume and not self.name:
            raise ValueError("run.resume=true needs run.name (the run directory output_dir/name to continue); "
                             "or resume by directory: fleetrl train --resume RUN_DIR")
        return self


class RLConfig(StrictModel):
    """Online RL (GRPO family): how prompts become groups, groups become advantages and updates."""

    group_size: int = Field(8, ge=1, description="samples per prompt")
    prompts_per_step: int = Field(32, ge=1)
    # Sequences per optimizer step; None = the whole rollout batch in one step.
    mini_batch_size: int | None = Field(None, ge=1)
    epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    # Std scaling of group-relative advantages; None = the algorithm's own (grpo: group, drgrpo: none).
    advantage_std: Literal["group", "batch", "none"] | None = None
    max_prompt_tokens: int = Field(1024, ge=1, description="longer prompts are skipped and counted")
    # Prompts per generate call. Each worker's engine batches all its calls in flight continuously,
    # so one group per call costs nothing and every group comes back as soon as it is done.
    prompts_per_request: int = Field(1, ge=1, description="prompts per generate call sent to one worker")
    # Asynchronous training: the fleet generates up to this many learner steps ahead, while the
    # learner trains; no group staler than this (learner version - the oldest weights any of its
    # tokens came from) is trained on (it is dropped, counted, and its prompt generated again).
    # 0 = synchronous: a step's prompts start only under the weights that step trains. Default 1:
    # generation of the next step overlaps this step's training and weight sync, which is most of
    # the gain when the two take similar time, at the smallest lag, corrected by
    # learner.loss.importance_sampling.
    max_staleness: int = Field(1, ge=0, description="how many learner versions a trained sample may lag")
    # Drop groups whose rewards are all equal (their advantages are 0): fewer wasted updates.
    skip_constant_groups: bool = False
    # Held-out prompts (eval_data, data.eval_path or data.eval_fraction) are generated and scored
    # before the first step and after the last; eval_every N > 0 also every N steps.
    eval_every: int = Field(0, ge=0)
    eval_temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    eval_max_prompts: int | None = Field(None, ge=1, description="use at most this many held-out prompts")

    @property
    def samples_per_step(self) -> int:
        return self.group_size * self.prompts_per_step


class TokenRewardConfig(StrictModel):
    """Per-token rewards (ppo, reinforce_pp*): the sequence's score at its last token, and minus
    kl_coef * KL(policy || reference) on every token when learner.loss.kl_in is 'reward'.

    The KL coefficient starts at learner.loss.kl_coef, its estimator is learner.loss.kl_estimator.
    """

    gamma: float = Field(1.0, ge=0.0, le=1.0, description="discount over tokens")
    # Clip each sequence's score to [-reward_clip, reward_clip] before the KL shaping; None = off.
    reward_clip: float | None = Field(None, gt=0)
    # fixed: the coefficient stays learner.loss.kl_coef. adaptive: steered towards kl_target
    # (Ziegler et al. 2019): coef *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * batch / kl_horizon.
    kl_control: Literal["fixed", "adaptive"] = "fixed"
    kl_target: float = Field(6.0, gt=0, description="nats per sequence (summed over its tokens)")
    kl_horizon: int = Field(10000, ge=1, description="samples over which the adaptive coefficient moves")


class PPOConfig(TokenRewardConfig):
    """PPO with a critic (critic section): GAE advantages, values regressed on the GAE returns."""

    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda")
    whiten_advantages: bool = True  # over the valid tokens of the rollout batch
    # The first N steps train only the critic (the policy stays put) so advantages start from
    # a fitted value function; useful when the critic starts from the policy (a fresh head).
    critic_warmup_steps: int = Field(0, ge=0)


class ReinforcePPConfig(TokenRewardConfig):
    """REINFORCE++ (reinforce_pp) and REINFORCE++ with a group-mean baseline (reinforce_pp_baseline):
    discounted returns of the per-token rewards, whitened over the batch; no critic."""


class OnlineDPOConfig(StrictModel):
    """Online DPO (algorithm: online_dpo): each prompt's best vs worst sample is a preference pair."""

    # The pair loss (a PREFERENCE_LOSSES name: dpo, ipo, simpo, orpo, ...); its hyperparameters come
    # from that loss's own section (dpo.beta, ipo.beta, simpo.beta, ...).
    loss: str = "dpo"
    # The frozen reference of the pair loss: null = the starting policy (model.path); else a model
    # given by path (a local directory, a hub id, or `tiny`) with the policy's tokenizer, loaded on
    # every learner rank in place of the copy of the starting policy (with LoRA too).
    reference_model_path: str | None = None

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from fleetrl.algos import PREFERENCE_LOSSES

        if v not in PREFERENCE_LOSSES:
            try:
                PREFERENCE_LOSSES.entry(v)
            except KeyError as e:  # names the known pair losses and the closest
                raise ValueError(e.args[0]) from None
        return v


class RayConfig(StrictModel):
    address: str | None = None  # None: start a local Ray (or join RAY_ADDRESS when set)
    num_cpus: int | None = None  # logical CPUs of a local Ray
    namespace: str = "fleetrl"
    # A local Ray's dashboard, on 127.0.0.1 only (`fleetrl train` prints its URL). None: on where Ray's
    # dashboard dependencies are installed (ray[default]). Joining a cluster, the head's own is used.
    dashboard: bool | None = None
    # None: 8265, or the next free port when another Ray holds it; a port named here must be free.
    dashboard_port: int | None = Field(None, ge=1, le=65535, description="local dashboard port")


class RunConfig(StrictModel):
    algorithm: Literal[ALGORITHMS]  # type: ignore[valid-type]
    run: RunSection = RunSection()
    model: ModelConfig = ModelConfig()
    data: DataConfig
    eval_data: DataConfig | None = None
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    learner: LearnerConfig = LearnerConfig()
    rl: RLConfig = RLConfig()
    ray: RayConfig = RayConfig()
    # Per-token online algorithms (reinforce_pp and reinforce_pp_baseline share their section).
    ppo: PPOConfig = PPOConfig()
    reinforce_pp: ReinforcePPConfig = ReinforcePPConfig()
    online_dpo: OnlineDPOConfig = OnlineDPOConfig()
    opd: OPDConfig = OPDConfig()
    teacher: TeacherConfig | None = None  # the frozen teacher of opd (learner/teacher.py)
    critic: CriticConfig = CriticConfig()
    # Offline trainers: what they share, then one section per algorithm.
    offline: OfflineConfig = OfflineConfig()
    sft: SFTConfig = SFTConfig()
    rm: RMConfig = RMConfig()
    dpo: DPOConfig = DPOConfig()
    ipo: IPOConfig = IPOConfig()
    kto: KTOConfig = KTOConfig()
    orpo: ORPOConfig = ORPOConfig()
    simpo: SimPOConfig = SimPOConfig()
    offline_ppo: OfflinePPOConfig = OfflinePPOConfig()

    @property
    def paper_defaults_applied(self) -> dict[str, Any]:
        """{dotted key: value} of the algorithm's defaults that this config took (keys it left unset)."""
        out = {}
        for dotted, value in algorithm_defaults(self.algorithm).items():
            node, key = self._node_of(dotted)
            if key not in node.model_fields_set:
                out[dotted] = value
        return out

    def _node_of(self, dotted: str) -> tuple[Any, str]:
        """("learner.loss.clip_low") -> (self.learner.loss, "clip_low")."""
        *path, key = dotted.split(".")
        node: Any = self
        for part in path:
            node = getattr(node, part)
        return node, key

    @model_validator(mode="after")
    def _apply_paper_defaults(self) -> RunConfig:
        """The algorithm's paper hyperparameters (algorithm_defaults) for every key the config leaves
        unset; a key written in the file or an override (even to the global default) wins."""
        for dotted, value in algorithm_defaults(self.algorithm).items():
            node, key = self._node_of(dotted)
            if key not in node.model_fields_set:
                try:
                    setattr(node, key, value)
                except ValidationError as e:
                    raise ValueError(
                        f"{dotted}={value} is the {self.algorithm} paper default (the config leaves it unset) "
                        f"but clashes with the rest of the config: {e.errors()[0]['msg']}. Set {dotted} "
                        "explicitly"
                    ) from None
                node.model_fields_set.discard(key)  # still "unset": the config did not say it
        return self

    @model_validator(mode="after")
    def _offline_shapes(self) -> RunConfig:
        if self.algorithm not in OFFLINE_ALGORITHMS:
            return self
        oc, lc = self.offline, self.learner
        per_step = lc.num_ranks * lc.micro_batch_size
        if oc.batch_size % per_step:
            origin = (f" ({oc.batch_size} is the {self.algorithm} paper default: set offline.batch_size)"
                      if "offline.batch_size" in self.paper_defaults_applied else "")
            raise ValueError(
                f"offline.batch_size={oc.batch_size} must be a multiple of learner.num_ranks * "
                f"learner.micro_batch_size = {lc.num_ranks} * {lc.micro_batch_size} = {per_step} "
                f"(every rank runs whole micro-batches){origin}"
            )
        if self.algorithm == "kto" and lc.micro_batch_size < 2:
            raise ValueError(
                f"kto needs learner.micro_batch_size >= 2 (got {lc.micro_batch_size}): its KL reference "
                "point pairs each prompt with the next example's completion inside a micro-batch, and with "
                "1 an example would be paired with itself"
            )
        has_eval = self.eval_data is not None or self.data.eval_path is not None or self.data.eval_fraction > 0
        if oc.eval_every and not has_eval:
            raise ValueError(
                f"offline.eval_every={oc.eval_every} needs held-out data: set data.eval_fraction, "
                "data.eval_path or eval_data (or offline.eval_every: 0)"
            )
        if self.algorithm in REFERENCE_ALGORITHMS and not lc.reference:
            raise ValueError(
                f"{self.algorithm} compares the policy with a frozen reference model, but learner.reference "
                "is false: set learner.reference: true (offline.reference_logps: precompute frees it after "
                "scoring the data once)"
            )
        if self.algorithm == "rm" and "path" not in self.model.model_fields_set:
            self.model.path = DEFAULT_RM_MODEL
        return self

    @model_validator(mode="after")
    def _lora_adapter_rank(self) -> RunConfig:
        if self.learner.lora is not None and self.rollout.lora_sync == "adapter":
            from fleetrl.rollout.config import vllm_lora_rank

            vllm_lora_rank(self.learner.lora.r)  # above vLLM's largest rank: a clear error now, not at start
        return self

    @model_validator(mode="after")
    def _batch_shapes(self) -> RunConfig:
        if self.algorithm in ONLINE_ALGORITHMS and self.run.steps is None:
            self.run.steps = 100
        if self.algorithm in ONLINE_ALGORITHMS:
            n = self.rl.samples_per_step
            mini = self.rl.mini_batch_size or n
            if self.pairs_per_step:
                pass  # its learner trains pairs, not sequences: _check_pair_algorithm checks their shapes
            elif n % mini:
                raise ValueError(
                    f"rl.mini_batch_size={mini} must divide the samples per step "
                    f"(rl.group_size * rl.prompts_per_step = {n})"
                )
            per_rank, rem = divmod(mini, self.learner.num_ranks)
            if not self.pairs_per_step and (rem or per_rank % self.learner.micro_batch_size):
                raise ValueError(
                    f"each optimizer step's {mini} sequences split over learner.num_ranks="
                    f"{self.learner.num_ranks} must be a multiple of learner.micro_batch_size="
                    f"{self.learner.micro_batch_size} per rank"
                )
            if not self.reward.functions and self.rollout.environment is None:
                raise ValueError(
                    f"{self.algorithm} scores its samples: add at least one entry to reward.functions "
                    "(kind: rule | builtin | model | http), or set rollout.environment (its turn rewards)"
                )
            if not self.reward.functions and (self.eval_data is not None or self.data.eval_path is not None
                                              or self.data.eval_fraction > 0):
                raise ValueError(
                    "held-out evaluation scores single completions with reward.functions, and there are none "
                    "(the environment's turn rewards only score episodes): add a reward function or remove "
                    "the held-out data")
            self._check_online_algorithm()
        return self

    def _check_online_algorithm(self) -> None:
        algo = self.online_algorithm
        estimator = ADVANTAGE_ESTIMATORS.meta(algo.advantage)
        if self.rl.group_size < algo.min_group_size:
            reason = estimator.get("min_group_reason")
            raise ValueError(f"{self.algorithm} needs rl.group_size >= {algo.min_group_size}"
                             + (f" ({reason})" if reason else ""))
        sampling = self.rollout.sampling
        if sampling.temperature == 0 or sampling.top_k == 1:
            setting = "rollout.sampling.temperature=0" if sampling.temperature == 0 else "rollout.sampling.top_k=1"
            raise ValueError(
                f"{setting} is greedy decoding, but {self.algorithm} learns from sampled completions: every sample "
                "of a prompt would be the same (advantage 0) and the policy's log-probs of a greedy choice are not "
                "what it sampled with. Set rollout.sampling.temperature > 0 (e.g. 1.0) and top_k -1 or >= 2; "
                "greedy decoding is for evaluation (rl.eval_temperature: 0)")
        steps = self.run.steps or 0
        if "max_staleness" in self.rl.model_fields_set and self.rl.max_staleness > steps:
            raise ValueError(
                f"rl.max_staleness={self.rl.max_staleness} is above the run's length (run.steps={steps}), so it "
                "bounds nothing: no sample can lag more versions than the run has steps. Use a small bound "
                "(0 = synchronous, 1-4 = asynchronous) or leave it unset")
        if self.rl.advantage_std is not None and "scale" not in estimator.get("options", ()):
            raise ValueError(
                f"rl.advantage_std={self.rl.advantage_std} does not apply to {self.algorithm} (its advantage "
                f"estimator '{algo.advantage}' has no std scaling): remove rl.advantage_std"
            )
        loss = self.learner.loss
        if loss.dual_clip is not None and not POLICY_LOSSES.meta(loss.policy_loss).get("dual_clip", True):
            raise ValueError(
                f"learner.loss.dual_clip={loss.dual_clip} but the '{loss.policy_loss}' policy loss has no "
                "dual clip: set learner.loss.dual_clip: null"
            )
        if algo.per_token:
            self._check_token_algorithm()
        if algo.objective == "pairs":
            self._check_pair_algorithm()
        elif self.online_dpo.reference_model_path is not None:
            raise ValueError(f"online_dpo.reference_model_path is for online_dpo; {self.algorithm} does not read it: "
                             "remove it")
        if algo.teacher and self.teacher is None:
            raise ValueError(f"{self.algorithm} distills a teacher: set teacher.model_path (a frozen model with the "
                             "student's tokenizer; teacher.num_actors / num_gpus_per_actor place it)")
        if not algo.teacher and self.teacher is not None:
            raise ValueError(f"the teacher section is for opd; {self.algorithm} uses no teacher: remove it")
        if algo.teacher and self.opd.reward_weight > 0 and self.rl.group_size < 2:
            raise ValueError(f"opd.reward_weight={self.opd.reward_weight} mixes in the task reward's group "
                             "advantage, which needs rl.group_size >= 2 (set opd.reward_weight: 0 for pure "
                             "distillation)")

    def _check_pair_algorithm(self) -> None:
        loss = self.online_dpo.loss
        if self.rl.mini_batch_size is not None:
            raise ValueError(
                f"rl.mini_batch_size does not apply to {self.algorithm}: each step trains its preference pairs "
                f"(one per prompt at most, rl.prompts_per_step={self.rl.prompts_per_step}) in one optimizer step "
                "per epoch; remove rl.mini_batch_size")
        per_step = self.learner.num_ranks * self.learner.micro_batch_size
        if self.rl.prompts_per_step % per_step:
            raise ValueError(
                f"{self.algorithm} trains up to rl.prompts_per_step={self.rl.prompts_per_step} pairs per step, "
                f"which must be a multiple of learner.num_ranks * learner.micro_batch_size = {per_step} "
                "(every rank runs whole micro-batches of pairs)")
        from fleetrl.algos import PREFERENCE_LOSSES

        needs_reference = PREFERENCE_LOSSES.meta(loss).get("needs_reference")
        if needs_reference and not self.learner.reference:
            raise ValueError(
                f"online_dpo.loss={loss} compares the policy with a frozen reference, but "
                "learner.reference is false: set learner.reference: true (or a reference-free loss: simpo, orpo)")
        if self.online_dpo.reference_model_path is not None and not needs_reference:
            raise ValueError(
                f"online_dpo.reference_model_path is set, but online_dpo.loss={loss} uses no reference model: "
                "remove online_dpo.reference_model_path, or pick a loss with a reference (dpo, ipo, ...)")

    def _check_token_algorithm(self) -> None:
        loss = self.learner.loss
        if self.token_rl.kl_control == "adaptive" and loss.kl_in != "reward":
            raise ValueError(
                f"{self.algorithm}.kl_control is 'adaptive' but learner.loss.kl_in is 'loss': the controller "
                "steers the KL penalty in the reward; set learner.loss.kl_in: reward or kl_control: fixed"
            )
        if self.token_rl.kl_control == "adaptive" and loss.kl_coef == 0:
            raise ValueError(
                f"{self.algorithm}.kl_control is 'adaptive' but learner.loss.kl_coef is 0, and an adaptive "
                "coefficient moves by multiplication: start it above 0 (e.g. learner.loss.kl_coef: 0.05)"
            )
        if not self.online_algorithm.critic:
            return
        critic = self.critic.learner_config(self.learner)  # raises on a bad colocation
        mini = self.mini_batch_size
        per_rank, rem = divmod(mini, critic.num_ranks)
        if rem or per_rank % critic.micro_batch_size:
            raise ValueError(
                f"each optimizer step's {mini} sequences split over critic.num_ranks={critic.num_ranks} "
                f"must be a multiple of critic.micro_batch_size={critic.micro_batch_size} per rank"
            )
        if self.critic.model_path is None and self.critic.init == "reward_model":
            models = [f for f in self.reward.functions if f.kind == "model"]
            if len(models) != 1:
                raise ValueError(
                    f"critic.init is 'reward_model' but reward.functions has {len(models)} reward models "
                    "(kind: model): name the critic's starting point with critic.model_path, or use "
                    "critic.init: policy"
                )

    @property
    def online_algorithm(self) -> OnlineAlgorithm:
        """The declaration of this run's online algorithm (fleetrl.algos.registry.OnlineAlgorithm)."""
        if self.algorithm not in ONLINE_REGISTRY:
            raise ValueError(f"{self.algorithm} is not an online algorithm; online: "
                             f"{', '.join(ONLINE_ALGORITHMS)}")
        return ONLINE_REGISTRY.get(self.algorithm)

    @property
    def token_rl(self) -> TokenRewardConfig:
        """The per-token reward settings of this run's algorithm (its section: ppo or reinforce_pp)."""
        section = self.online_algorithm.section
        if section is None:
            raise ValueError(f"{self.algorithm} has no per-token reward settings (no config section)")
        return getattr(self, section)

    @property
    def critic_warmup_steps(self) -> int:
        """Steps that train only the critic (ppo.critic_warmup_steps); 0 without a critic."""
        return self.ppo.critic_warmup_steps if self.online_algorithm.critic else 0

    def critic_init_path(self) -> str:
        """Where the critic starts: critic.model_path, the reward model, or the policy (model.path)."""
        if self.critic.model_path is not None:
            return self.critic.model_path
        if self.critic.init == "reward_model":
            return next(f.model_path for f in self.reward.functions if f.kind == "model")
        return self.model.path

    @property
    def pairs_per_step(self) -> bool:
        """Whether the learner trains on preference pairs (online_dpo) rather than advantages."""
        return self.algorithm in ONLINE_REGISTRY and self.online_algorithm.objective == "pairs"

    @property
    def mini_batch_size(self) -> int:
        if self.pairs_per_step:
            return self.rl.prompts_per_step  # pairs: at most one per prompt, padded with weight 0
        return self.rl.mini_batch_size or self.rl.samples_per_step

    @property
    def optimizer_steps_per_step(self) -> int:
        if self.pairs_per_step:
            return self.rl.epochs
        return self.rl.epochs * (self.rl.samples_per_step // self.mini_batch_size)


# ---------------------------------------------------------------------------------------------
# Loading, overrides, error messages


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML, so 1e-6, true, [1,2] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. learner.lr=1e-6)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    # YAML reads 1e-6 as a string (no dot); accept what a user means.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and value.strip() else value
        except ValueError:
            pass
    return key.strip().split("."), value


def _set_dotted(tree: dict, keys: list[str], value: Any, origin: str) -> None:
    """Set tree[k0][k1]... = value; a key that meets a list is an index (reward.functions.0.weight)."""
    node: Any = tree
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            k = _list_index(node, k, ".".join(keys[:i]), origin)
        elif not last:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            elif not isinstance(nxt, (dict, list)):
                raise ConfigError(f"{origin}: {'.'.join(keys[: i + 1])} is a value, not a section")
        if last:
            node[k] = value
        else:
            node = node[k]


def _list_index(items: list, key: str, where: str, origin: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(
            f"{origin}: {where} is a list of {len(items)} entries; name one by its index "
            f"0..{len(items) - 1} (e.g. {where}.0.<key>=...)" if items else f"{origin}: {where} is an empty list"
        )
    return int(key)


def _model_at(loc: tuple) -> type | None:
    """The pydantic model class found by walking ``loc`` from RunConfig (None if not a model). A tag
    after a list index (reward.functions.0.builtin) picks that member of a discriminated union."""
    cls: Any = RunConfig
    union: tuple = ()
    for part in loc:
        if isinstance(part, int):
            continue
        tagged = [m for m in union if _tag_of(m) == part]
        if tagged:
            cls, union = tagged[0], ()
            continue
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        union = tuple(_models_in(annotation))
        cls = _unwrap_model(annotation)
    return cls


def _models_in(annotation: Any) -> list[type]:
    out = []
    for arg in typing.get_args(annotation) or ():
        if isinstance(arg, type) and hasattr(arg, "model_fields"):
            out.append(arg)
        else:
            out.extend(_models_in(arg))
    return out


def _tag_of(model: type) -> str | None:
    field = getattr(model, "model_fields", {}).get("kind")
    args = typing.get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 and isinstance(args[0], str) else None


def _unwrap_model(annotation: Any) -> Any:
    """Optional[Model] / list[Model] / Model -> Model; anything else unchanged."""
    for arg in typing.get_args(annotation) or ():
        if isinstance(arg, type) and hasattr(arg, "model_fields"):
            return arg
        inner = _unwrap_model(arg)
        if inner is not arg:
            return inner
    return annotation


def _origin(dotted: str, overrides: dict[str, str], source: str, lines: dict[str, int] | None = None) -> str:
    """Who set ``dotted``: the override that wrote it (or wrote inside it, or above it), else the
    file, with the line of the nearest key written there when known."""
    for key, origin in overrides.items():
        if key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."):
            return origin
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        line = (lines or {}).get(".".join(parts[:n]))
        if line is not None:
            return f"{source}:{line}"
    return source


def _clean_loc(loc: tuple) -> tuple:
    """The error location as config keys: without pydantic's union/validator labels and the tag of a
    discriminated union (reward.functions.0.builtin.kwargs -> reward.functions.0.kwargs)."""
    out: list = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        if i and isinstance(loc[i - 1], int) and any(_tag_of(m) == part for m in _union_at(loc[:i])):
            continue
        out.append(part)
    return tuple(out)


def _union_at(loc: tuple) -> list[type]:
    parent = _model_at(tuple(p for p in loc if not isinstance(p, int))[:-1])
    name = next((p for p in reversed(loc) if isinstance(p, str)), None)
    fields = getattr(parent, "model_fields", {})
    return _models_in(fields[name].annotation) if name in fields else []


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'learner'?)' for a close match among ``choices``, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe(err: dict, overrides: dict[str, str], source: str, lines: dict[str, int] | None = None) -> str:
    raw_loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    loc = _clean_loc(err["loc"])
    dotted = ".".join(str(p) for p in loc)
    origin = _origin(dotted, overrides, source, lines) if dotted else source
    if err["type"] == "extra_forbidden":
        parent = _model_at(raw_loc[:-1])
        allowed = list(parent.model_fields) if parent is not None else []
        return (f"{origin}: unknown key '{dotted}'{did_you_mean(loc[-1], allowed)}. "
                f"Allowed keys here: {', '.join(allowed) or '?'}")
    if err["type"] == "missing":
        return f"{origin}: '{dotted}' is required"
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err["type"] == "union_tag_invalid":
        tag = (err.get("ctx") or {}).get("tag", "")
        expected = re.findall(r"'([^']+)'", (err.get("ctx") or {}).get("expected_tags", ""))
        msg += did_you_mean(tag, expected)
    if not dotted:  # a rule across keys: its message names them; blame the overrides it names
        named = [o for key, o in overrides.items() if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", msg)]
        return f"{', '.join(named) if named else origin}: {msg}"
    got = err.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    if err["type"] == "literal_error" and isinstance(got, str):
        got_text += did_you_mean(got, re.findall(r"'([^']+)'", msg))
    return f"{origin}: '{dotted}': {msg}{got_text}"


def _key_lines(text: str) -> dict[str, int]:
    """{dotted key: 1-based line} of every mapping key in a YAML document (for file:line in errors)."""
    out: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                out[key] = k.start_mark.line + 1
                walk(v, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[f"{prefix}{i}"] = v.start_mark.line + 1
                walk(v, f"{prefix}{i}.")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return out


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML at ``path``, apply ``overrides``, validate. Raises ConfigError with every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (algorithm, model, data, ...)")
    _resolve_relative_paths(tree, path.resolve().parent)
    return config_from_dict(tree, overrides, source=str(path), lines=_key_lines(path.read_text()))


def _resolve_relative_paths(tree: dict, base: Path) -> None:
    """Data paths written in a config file are relative to that file (overrides: to the CWD)."""
    for section in ("data", "eval_data"):
        node = tree.get(section)
        if not isinstance(node, dict):
            continue
        for key in ("path", "eval_path"):
            value = node.get(key)
            # A hub dataset name (org/name, not a file next to the config) stays as written.
            if isinstance(value, str) and value and not Path(value).is_absolute() and (
                    (base / value).exists() or not looks_like_dataset_name(value)):
                node[key] = str(base / value)
        files, rel = node.get("data_files"), _relative_to(base)
        if isinstance(files, (str, list)):
            node["data_files"] = rel(files) if isinstance(files, str) else [rel(f) for f in files]
        elif isinstance(files, dict):
            node["data_files"] = {k: rel(v) if isinstance(v, str) else [rel(f) for f in v] for k, v in files.items()}
    model = tree.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str) and (base / model["path"]).exists():
        model["path"] = str(base / model["path"])
    functions = (tree.get("reward") or {}).get("functions") if isinstance(tree.get("reward"), dict) else None
    for fn in functions if isinstance(functions, list) else []:
        path = fn.get("model_path") if isinstance(fn, dict) else None
        if isinstance(path, str) and path and not Path(path).is_absolute() and (base / path).exists():
            fn["model_path"] = str(base / path)


def with_absolute_file_specs(cfg: RunConfig, base: Path) -> RunConfig:
    """A copy whose rule files ('file.py:function') and environment ('env.py:Class') that lie under
    ``base`` (the config file's directory) are absolute: the run's saved config.yaml, which
    `fleetrl train --resume RUN_DIR` reads from any working directory. The config as written keeps
    them relative (checks and messages name them as the user wrote them)."""
    out = cfg.model_copy(deep=True)
    for fn in out.reward.functions:
        if fn.kind == "rule":
            fn.path = _file_spec_relative_to(base, fn.path)
    if out.rollout.environment is not None:
        out.rollout.environment = _file_spec_relative_to(base, out.rollout.environment)
    return out


def _file_spec_relative_to(base: Path, spec):
    """'file.py:name' with the file made absolute when it lies next to the config; else unchanged."""
    if not isinstance(spec, str) or ":" not in spec:
        return spec
    file, _, name = spec.rpartition(":")
    if file and not Path(file).is_absolute() and (base / file).is_file():
        return f"{base / file}:{name}"
    return spec


def _relative_to(base: Path):
    def rel(f):
        return f if not isinstance(f, str) or Path(f).is_absolute() or "://" in f else str(base / f)
    return rel


def config_from_dict(tree: dict, overrides=(), source: str = "<config>",
                     lines: dict[str, int] | None = None) -> RunConfig:
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy of plain data
    origins: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _is_env_value(keys):
            value = text.partition("=")[2].strip()  # FOO=1e3 or FOO=010 stays as written, like a shell's
        _set_dotted(tree, keys, value, f"override {text!r}")
        origins[".".join(keys)] = f"override {text!r}"
    hidden = _redacted_keys(tree)
    if hidden:
        raise ConfigError(
            f"{source}: {', '.join(hidden)} {'is' if len(hidden) == 1 else 'are'} {REDACTED!r}: this config was "
            "saved by fleetrl with its secrets hidden (a run directory's config.yaml, or `fleetrl config show`); "
            "put the real values back, or train from your own config file. Better: write secrets as "
            "'${env:NAME}' references (HTTP headers, run.storage_options), read from the environment where they "
            "are used and saved as written, so a resume needs nothing back and no secret reaches a command line"
        )
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        found = [_describe(err, origins, source, lines) for err in e.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(found)) from None


def _is_env_value(keys: list[str]) -> bool:
    """Whether dotted ``keys`` name one variable of an environment-variable mapping (``EnvStr``
    values, e.g. rollout.env_vars.FOO), found by walking RunConfig's fields."""
    model: type[BaseModel] = RunConfig
    for k in keys[:-2]:
        ann = model.model_fields[k].annotation if k in model.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return False
        model = ann
    field = model.model_fields.get(keys[-2]) if len(keys) >= 2 else None
    return field is not None and typing.get_args(field.annotation)[1:] == (EnvStr,)


def _redacted_keys(tree: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is the redaction marker (a saved config fed back in)."""
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _redacted_keys(v, f"{prefix}{key}.")]
    if isinstance(tree, list):
        return [k for i, v in enumerate(tree) for k in _redacted_keys(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if isinstance(tree, str) and REDACTED in tree else []


def algorithm_defaults(algorithm: str) -> dict[str, Any]:
    """{dotted run-config key: value} an algorithm uses when the config leaves the key unset: the
    offline papers' PAPER_DEFAULTS, or what an online algorithm declares (its policy loss, e.g.
    GSPO's clip range)."""
    if algorithm in ONLINE_REGISTRY:
        return ONLINE_REGISTRY.get(algorithm).config_defaults()
    return dict(PAPER_DEFAULTS.get(algorithm, {}))


REDACTED = "<redacted>"
# Keys of free-form mappings (env vars, engine/DeepSpeed kwargs, run.wandb) whose values are secrets.
SECRET_KEY = re.compile(r"TOKEN(?!IZER|S)|KEY|SECRET|PASSW|AUTH|CREDENTIAL|COOKIE|SESSION", re.IGNORECASE)
# ... except names of data columns and counts (a builtin's answer_key, an engine's max_num_batched_tokens).
_NOT_SECRET = re.compile(r"(answer|letter|prompt|label|score|margin|chosen|rejected|completion|messages|text|"
                         r"sort|group|input|output|id)_key$", re.IGNORECASE)


def looks_secret(name: str) -> bool:
    """Whether a free-form key names a secret (HF_TOKEN, api_key, secret, password, ...)."""
    return bool(SECRET_KEY.search(name)) and not _NOT_SECRET.search(name)


def redacted_config(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as JSON-ready data with secrets replaced by ``<redacted>``: what is printed or saved
    (``fleetrl config show``, the run directory's config.yaml, the W&B run config). The running config
    keeps the real values. Redacted: every HTTP header value, values of secret-looking keys (TOKEN, KEY,
    SECRET, PASSWORD, AUTH, CREDENTIAL) anywhere inside a free-form mapping such as rollout.env_vars,
    rollout.engine_kwargs, learner.deepspeed_config or run.wandb, and the password in a URL."""
    tree = cfg.model_dump(mode="json")
    _redact_model(cfg, tree)
    return tree


def _redact_model(model: BaseModel, tree: dict) -> None:
    for name in type(model).model_fields:
        if name not in tree:
            continue
        value = getattr(model, name)
        if name == "headers" and isinstance(tree[name], dict):  # ${env:NAME} references hold no secret
            tree[name] = {k: REDACTED if v and not has_env_ref(v) else v for k, v in tree[name].items()}
        elif isinstance(value, BaseModel) and isinstance(tree[name], dict):
            _redact_model(value, tree[name])
        elif isinstance(value, (list, tuple)) and isinstance(tree[name], list):
            for item, node in zip(value, tree[name]):
                if isinstance(item, BaseModel) and isinstance(node, dict):
                    _redact_model(item, node)
        elif isinstance(tree[name], (dict, list)):
            tree[name] = _redact_free_form(tree[name])
        elif isinstance(tree[name], str) and name.endswith("url"):
            tree[name] = _redact_url(tree[name])


def _redact_free_form(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: REDACTED if looks_secret(str(k)) and v not in (None, "") and not has_env_ref(v)
                else _redact_free_form(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact_free_form(v) for v in node]
    if isinstance(node, str) and "://" in node:
        return _redact_url(node)
    return node


def _redact_url(url: str) -> str:
    """``scheme://user:password@host/...?api_key=...`` without the password and secret query values."""
    url = re.sub(r"(://[^/@:\s]*):[^/@\s]*@", r"\1:" + REDACTED + "@", url)
    return re.sub(r"([?&][^=&#]*(?:token|key|secret|passw|auth|signature)[^=&#]*=)[^&#]*", r"\1" + REDACTED, url,
                  flags=re.IGNORECASE)


def dump_config(cfg: RunConfig, redact: bool = True) -> str:
    """The resolved config as YAML, secrets redacted (see :func:`redacted_config`); a comment on top
    names the paper defaults it took."""
    tree = redacted_config(cfg) if redact else cfg.model_dump(mode="json")
    text = yaml.safe_dump(tree, sort_keys=False)
    if redact and REDACTED in text:
        text = (f"# secrets are shown as {REDACTED}: put the real values back before reusing this file\n") + text
    applied = cfg.paper_defaults_applied
    if applied:
        keys = ", ".join(f"{k}={v}" for k, v in applied.items())
        text = (f"# {cfg.algorithm} paper defaults used (unset in the config; set a key to override): "
                f"{keys}\n") + text
    return text
