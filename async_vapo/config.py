"""Typed, validated run configuration: one YAML per recipe in ``configs/``, dotted overrides on top.

Every field is checked at load time (types, ``Literal`` choices, unknown fields); an error names the
field, e.g. ``config error at train.actor_lr: Expected float, got str``.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from async_vapo.weight_sync.adapter import VLLM_LORA_RANKS


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ModelConfig(_Section, frozen=True):
    """Policy and value model sources."""

    path: str = ""  # HF directory of the policy; "" = the built-in tiny model (built on first use)
    value_path: str = ""  # reward-model / value checkpoint to start the critic from; "" = policy backbone
    # the learner's weights; auto: bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32.
    # CPU engines sample in fp32 either way (from the learner's bf16-valued weights)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # the learner's attention kernel (transformers' attn_implementation). auto: flash_attention_2 on GPUs
    # when the flash-attn package is installed (packed rows as variable-length sequences), else sdpa
    # (packed rows through a dense block-diagonal mask: tokens^2 bytes, and attention over the whole pack)
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    # LoRA (learner/lora.py): > 0 trains rank-r adapters on the policy's lora_target_modules instead of
    # its weights (the engines get the merged weights or the adapter: lora_publish; checkpoints also hold
    # the adapters in PEFT's layout); critic_lora_rank likewise for the critic's backbone, whose value
    # head is always trained. Needs train.zero_stage <= 2
    lora_rank: int = 0
    critic_lora_rank: int = 0
    lora_alpha: float = 32.0  # adapters scaled by lora_alpha / rank
    lora_target_modules: list[str] = msgspec.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # what the engines get under a policy LoRA: "merged" weights (the model's bytes, through the bucketed
    # reload every backend supports) or the "adapter" alone (its bytes; the engines serve it with vLLM's
    # LoRA support, each update replacing it in place: rollout/weights.py receive_adapter)
    lora_publish: Literal["merged", "adapter"] = "merged"

    @property
    def uses_lora(self) -> bool:
        return self.lora_rank > 0 or self.critic_lora_rank > 0


class DataConfig(_Section, frozen=True):
    """Where prompts come from. ``task: addition`` is the built-in procedurally generated task."""

    task: Literal["addition", "math"] = "addition"
    train_file: str = ""  # JSONL, Parquet, or what Hugging Face `datasets` loads (math); unused for addition
    eval_file: str = ""
    train_split: str = "train"  # the split of a `datasets` source with several
    eval_split: str = "test"
    prompt_field: str = "problem"
    answer_field: str = "answer"
    prompt_template: str = "{problem}"  # str.format template over the row's fields
    # the held-out file's own layout when it differs from the training file's (DAPO-Math-17k trains, AIME
    # 2024 evaluates); "" = the training file's field / template
    eval_prompt_field: str = ""
    eval_answer_field: str = ""
    eval_prompt_template: str = ""
    verifier: str = ""  # "" = the task's own (addition / math-verify); or a registry name or "module:factory"
    # several verifiers (instead of ``verifier``): the reward is the weighted sum of theirs, the first decides
    # "correct" (rewards/base.py has the interface: bool, graded float within a declared range, or Verdict)
    verifiers: list[str] = []
    verifier_weights: list[float] = []  # one per verifier ([] = 1 each)
    # the row's fields a verifier receives as keyword arguments (besides ``prompt``); dotted names are
    # reached into; they travel with the prompt (at most 16 KiB of JSON per row)
    extra_fields: list[str] = []
    # prompts through the tokenizer's chat template (apply_chat_template, generation prompt added): "auto"
    # = when the tokenizer has one; a prompt field holding a message list ([{role, content}], the DAPO
    # layout's "prompt") is taken as the conversation, a text one becomes the user message
    chat_template: bool | Literal["auto"] = "auto"
    system_prompt: str = ""  # chat: a system message put first ("" = none, or the data's own)
    n_train: int = 100_000  # addition: size of the generated training set
    n_eval: int = 256  # held-out problems for periodic evaluation
    # addition: fewest digits of the longer operand (1..7; the prompt format is the same, 7-digit operands).
    # 5 keeps only responses of ~45-72 tokens: the long-response setting of the built-in task
    min_digits: int = 1
    seed: int = 0


# what rollout.engine_kwargs cannot change: the weight receiver, the behaviour log-probs, the model
ENGINE_OWNED_ARGS = frozenset(
    {"model", "tokenizer", "worker_extension_cls", "logprobs_mode", "tensor_parallel_size"}
    | {"enable_lora", "max_lora_rank", "max_loras"}  # model.lora_publish=adapter's
)
MAX_ENGINE_LORA_RANK = max(VLLM_LORA_RANKS)


class RolloutConfig(_Section, frozen=True):
    """vLLM sampling (Group-Sampling: ``n_samples`` responses per prompt)."""

    n_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 96
    max_model_len: int = 256
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    # sequences an engine decodes at once (vLLM's max_num_seqs); the staleness bound caps what is in flight
    # at (max_staleness + 1) x groups_per_step x n_samples, so more than that is never used
    max_num_seqs: int = 256
    num_workers: int = 1  # engines; on GPUs rollout_gpus // tensor_parallel_size
    verifier_processes: int = 1
    verifier_timeout_s: float = 5.0
    correct_reward: float = 1.0
    wrong_reward: float = 0.0
    eval_temperature: float = 1.0
    eval_top_p: float = 0.7
    eval_samples: int = 4
    # weight updates: "keep" continues requests in flight under the new weights (a response may span
    # versions), "drain" lets them finish under the old weights first
    weight_update: Literal["drain", "keep"] = "keep"
    # CPU: an engine's compute threads are always bound to its own cores (VLLM_CPU_OMP_THREADS_BIND); its
    # other processes (the rollout worker, vLLM's scheduler, the verifiers) are pinned to those cores too
    # ("own") or free to run on any core of the node ("all": on a core the learner leaves idle)
    frontend_cores: Literal["own", "all"] = "own"
    # vLLM engine settings that differ between the CPU backend and CUDA. enforce_eager: "auto" = eager on
    # CPU, CUDA graphs on GPUs. async_scheduling off and model_runner "v1" keep GPU engines on the code
    # path every CPU test runs (vLLM 0.32 on CUDA would otherwise pick Model Runner V2 with asynchronous
    # scheduling: processed log-probs, version spans and keep-mode updates are untested there)
    enforce_eager: Literal["auto", "on", "off"] = "auto"
    async_scheduling: bool = False
    model_runner: Literal["v1", "auto"] = "v1"
    # more vLLM AsyncEngineArgs fields, passed through (e.g. {enable_chunked_prefill: true}); the model,
    # tokenizer, TP size, worker extension and log-probs mode are the engine's own and refused here
    engine_kwargs: dict[str, Any] = {}


class AlgoConfig(_Section, frozen=True):
    """The VAPO objective. Each of the paper's components is a switch (Table 1 ablations)."""

    estimator: Literal["gae", "group_norm"] = "gae"  # group_norm = value-free GRPO/DAPO baseline
    value_pretrain_steps: int = 50  # 1. Value-Pretraining (0 = off)
    decoupled_gae: bool = True  # 2. Decoupled-GAE (False: the critic's targets use the policy's lambda)
    lam_critic: float = 1.0  # critic lambda when decoupled
    lam_policy: float = 0.95  # policy lambda when length_adaptive is off
    length_adaptive: bool = True  # 3. Length-adaptive GAE
    alpha: float = 0.05
    eps_low: float = 0.2  # 4. Clip-Higher: eps_high > eps_low
    eps_high: float = 0.28
    loss_agg: Literal["token", "sample"] = "token"  # 5. token-level loss
    nll_coef: float = 0.1  # 6. positive-example LM loss (0 = off)
    gamma: float = 1.0
    value_clip: float = 0.5
    whiten_advantages: bool = True
    iw_cap: float = 2.0  # off-policy: truncation of pi_prox / mu
    decoupled: bool = True  # off-policy: AReaL's decoupled objective (False: ratio against mu directly)
    drop_truncated: bool = False  # truncated responses: False = terminal with their reward
    # off-policy correction of the critic's targets: "vtrace" weights each token's TD error and trace by
    # truncated pi_prox / mu (algo.vtrace); "none" = plain GAE on stale samples
    value_correction: Literal["none", "vtrace"] = "none"
    vtrace_rho_bar: float = 1.0  # truncation of the TD-error weight
    vtrace_c_bar: float = 1.0  # truncation of the trace weight


class TrainConfig(_Section, frozen=True):
    """Learner schedule, optimisers and asynchrony."""

    total_steps: int = 60
    groups_per_step: int = 32  # prompts per policy step (7. Group-Sampling: few prompts, many samples)
    mini_batches: int = 1  # optimiser steps per batch
    ppo_epochs: int = 1
    micro_batch_size: int = 64  # sequences per forward/backward (padded layout)
    # > 0: packed micro-batches instead: whole sequences up to this many tokens per forward/backward, no
    # padding between them (learner/forward.py); micro_batch_size is then not used by the learner
    max_tokens_per_micro: int = 0
    logit_chunk: int = 0  # > 0: response tokens per LM-head chunk (never a whole micro-batch's fp32 logits)
    # one epoch and one mini-batch: old values and proximal log-probs come from the updates' own forwards
    # instead of a separate no-grad pass over the batch (learner/update.py fused_update)
    fused_targets: bool = True
    actor_lr: float = 1e-6
    critic_lr: float = 2e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 1
    # DeepSpeed's ZeRO-Offload, for full fine-tuning on few GPUs: offload_optimizer keeps the fp32 master
    # weights and Adam moments in host memory and runs the step there with DeepSpeed's CPU Adam (needs
    # zero_stage >= 1); offload_params also keeps the parameters there between uses (needs zero_stage 3)
    offload_optimizer: bool = False
    offload_params: bool = False
    # the launcher builds DeepSpeed's CPU Adam (C++, compiled on first use and cached; about a minute on two
    # cores) in a child process before anything starts; a build not done by then is a launch error (a
    # lock left in the extensions directory by a killed build would otherwise block it forever)
    op_build_timeout_s: float = 900.0
    seed: int = 0
    max_staleness: int = 1  # 0 = synchronous
    # DAPO dynamic sampling: groups whose rewards are all equal are dropped; filter_patience of them in a
    # row stop the run with an error (the policy solves or fails every prompt; 0 = never stop)
    filter_uniform_rewards: bool = False
    filter_patience: int = 1000
    broadcast_every: int = 1
    bucket_mb: float = 64.0
    # how new weights leave the learner: "snapshot" copies the whole model once on rank 0 and sends it
    # while training goes on (one extra model copy); "stream" gathers, sends and frees one bucket at a
    # time inside the step (about 2 x bucket_mb extra); "auto" streams with ZeRO-3, snapshots otherwise
    publish: Literal["auto", "snapshot", "stream"] = "auto"
    # streamed publish: engines are fed by all learner ranks in turn (engine k by its owner rank), not
    # all by rank 0; False = rank 0 feeds every engine
    weight_fanout: bool = True

    @property
    def streams_publish(self) -> bool:
        """Whether new weights leave the learner bucket by bucket (``publish``: auto = under ZeRO-3)."""
        return self.publish == "stream" or (self.publish == "auto" and self.zero_stage == 3)

    weight_sync_timeout_s: float = 60.0  # a sync not finished by then drops the worker (it is restarted)
    worker_timeout_s: float = 30.0  # a worker silent (no heartbeat) this long is dropped and restarted
    # a prompt not answered this long after it was sent is retried elsewhere (a failed attempt), and its
    # worker, if it sent no group at all since, is dropped as stalled; 0 = derived from rollout.max_tokens
    # (controller/admission.py prompt_timeout_s: at least 5 minutes, 5 tokens/s at the slowest)
    prompt_timeout_s: float = 0.0
    gradient_checkpointing: bool = False  # recompute activations in backward (long sequences)
    checkpoint_every: int = 20
    # checkpoints kept on disk: the newest keep_last (0 = every one; a 32B checkpoint is about a terabyte)
    # and, with keep_best, also the one with the best held-out accuracy at its save
    keep_last: int = 2
    keep_best: bool = False
    # false: checkpoints hold the trained weights (model dtype) and the LR schedule but no optimizer state
    # (about 12 bytes per parameter: 400 GB at 32B); a resume starts Adam's moments from zero
    save_optimizer: bool = True
    eval_every: int = 10
    # every this many steps the batch's first group goes to <output_dir>/samples.jsonl (prompt, each
    # response, its reward and verdict, the policy versions that sampled it), one of its responses to the
    # console and, with W&B on, the group to a table; 0 = never
    log_samples_every: int = 10
    # an evaluation round ends (partial, logged) after this long; 0 = derived from the round's work: its
    # samples x rollout.max_tokens at the engines' measured generation rate, times a margin, with a floor
    # (controller/evaluation.py eval_timeout_s)
    eval_timeout_s: float = 0.0
    # the learner world's collective timeout: a rank waiting longer in one collective is ended (NCCL's
    # watchdog). Waits for data and evaluations go in one-second rounds (learner/main.py), so this bounds
    # only real work: the longest update, save or publish of a step
    collective_timeout_s: float = 1800.0
    # a learner rank that dies restarts the learner world from its latest checkpoint (the launcher,
    # when every learner rank is on its node), at most this many times per run; 0 = the run ends
    learner_restarts: int = 2
    # a rollout worker that dies (or is dropped) is restarted by its node's launcher, at most this many
    # times within any worker_restart_window_s; past that the run stops with the reason
    worker_restarts: int = 5
    worker_restart_window_s: float = 3600.0
    # CPU: torch threads per learner rank; 0 = its cores divided by the learner ranks on the node
    learner_threads: int = 0
    # CPU: the learner ranks are pinned to their own half of the node's cores ("own") or to every core
    # ("all": their threads also use the cores the rollout engines leave idle; measured in
    # bench/update_modes.py)
    learner_cores: Literal["own", "all"] = "own"


class TrackingConfig(_Section, frozen=True):
    """Experiment tracking beside ``metrics.jsonl`` (``async_vapo.tracking``; extra ``tracking``)."""

    tensorboard: bool = False  # event files in <output_dir>/tensorboard
    wandb: bool = False  # a Weights & Biases run in <output_dir>/wandb
    wandb_project: str = "async_vapo"
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: no network; `wandb sync` later
    run_name: str = ""  # "" = the output directory's name


class Config(_Section, frozen=True):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    algo: AlgoConfig = AlgoConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = "runs/default"
    insecure: bool = False  # allow binding beyond loopback without CURVE keys
    curve_dir: str = ""  # CURVE key directory for multi-node runs ("" = <output_dir>/.curve, made by node 0)

    def validate(self) -> Config:
        checks = [
            (self.algo.eps_low >= 0 and self.algo.eps_high >= 0, "algo.eps_low/eps_high must be >= 0"),
            (
                0 <= self.algo.lam_critic <= 1 and 0 <= self.algo.lam_policy <= 1,
                "algo lambdas must lie in [0, 1]",
            ),
            (self.algo.alpha > 0, "algo.alpha must be > 0"),
            (self.algo.iw_cap > 0, "algo.iw_cap must be > 0"),
            (
                self.algo.vtrace_rho_bar > 0 and self.algo.vtrace_c_bar > 0,
                "algo.vtrace_rho_bar and algo.vtrace_c_bar must be > 0",
            ),
            (1 <= self.data.min_digits <= 7, "data.min_digits must be between 1 and 7"),
            (
                1 <= self.rollout.n_samples <= 1024 and 1 <= self.rollout.eval_samples <= 1024,
                "rollout.n_samples and rollout.eval_samples must be between 1 and 1024 (protocol.messages"
                ".MAX_RESPONSES: a larger group is refused on the wire)",
            ),
            (self.rollout.max_num_seqs >= 1, "rollout.max_num_seqs must be >= 1"),
            (
                1 <= self.rollout.tensor_parallel_size <= 64,
                "rollout.tensor_parallel_size must be between 1 and 64",
            ),
            (
                self.rollout.temperature > 0 and 0 < self.rollout.top_p <= 1,
                "rollout.temperature must be > 0 and rollout.top_p in (0, 1] (the learner's policy is "
                "softmax(logits / temperature); greedy sampling has no log-probs to correct with)",
            ),
            (self.train.groups_per_step >= 1, "train.groups_per_step must be >= 1"),
            (
                self.train.learner_restarts >= 0
                and self.train.worker_restarts >= 0
                and self.train.worker_restart_window_s > 0,
                "train.learner_restarts and train.worker_restarts must be >= 0, "
                "train.worker_restart_window_s > 0",
            ),
            (self.train.max_staleness >= 0, "train.max_staleness must be >= 0"),
            (self.train.mini_batches >= 1, "train.mini_batches must be >= 1"),
            (
                self.train.max_tokens_per_micro >= 0 and self.train.logit_chunk >= 0,
                "train.max_tokens_per_micro and train.logit_chunk must be >= 0 (0 = off)",
            ),
            (
                1 <= self.train.broadcast_every <= self.train.max_staleness + 1,
                "train.broadcast_every must be between 1 and train.max_staleness + 1 (engines more than "
                "max_staleness versions behind get no prompts, so a rarer broadcast would stall the run)",
            ),
            (
                self.algo.estimator == "gae" or self.rollout.n_samples > 1,
                "group_norm needs rollout.n_samples > 1",
            ),
            (
                not self.train.filter_uniform_rewards or self.rollout.n_samples > 1,
                "train.filter_uniform_rewards needs rollout.n_samples > 1 (a group of one is always uniform)",
            ),
            (
                not (self.data.verifier and self.data.verifiers),
                "set data.verifier (one) or data.verifiers (several), not both",
            ),
            (
                not self.data.verifier_weights
                or (
                    len(self.data.verifier_weights) == len(self.data.verifiers)
                    and all(math.isfinite(w) and w >= 0 for w in self.data.verifier_weights)
                ),
                "data.verifier_weights needs one finite weight >= 0 per entry of data.verifiers",
            ),
            (
                all(SPEC_SAFE.fullmatch(v) for v in [self.data.verifier, *self.data.verifiers] if v),
                "a verifier is a registry name or module:factory (letters, digits, _ . : -)",
            ),
            (self.train.keep_last >= 0, "train.keep_last must be >= 0 (0 = keep every checkpoint)"),
            (
                not self.train.offload_optimizer or self.train.zero_stage >= 1,
                "train.offload_optimizer needs train.zero_stage >= 1 (DeepSpeed offloads ZeRO's partitions)",
            ),
            (
                not self.train.offload_params or self.train.zero_stage == 3,
                "train.offload_params needs train.zero_stage=3 (only ZeRO-3 partitions the parameters)",
            ),
            (
                self.model.lora_rank >= 0 and self.model.critic_lora_rank >= 0 and self.model.lora_alpha > 0,
                "model.lora_rank and model.critic_lora_rank must be >= 0 (0 = off), model.lora_alpha > 0",
            ),
            (
                not self.model.uses_lora or self.train.zero_stage <= 2,
                "LoRA (model.lora_rank / critic_lora_rank) needs train.zero_stage <= 2 (the adapted layers'"
                " merged weights are computed from whole parameters)",
            ),
            (
                not self.model.uses_lora or bool(self.model.lora_target_modules),
                "model.lora_target_modules is empty",
            ),
            (
                self.model.lora_publish == "merged" or 0 < self.model.lora_rank <= MAX_ENGINE_LORA_RANK,
                f"model.lora_publish=adapter needs a policy LoRA (model.lora_rank in 1..{MAX_ENGINE_LORA_RANK})",
            ),
            (self.train.log_samples_every >= 0, "train.log_samples_every must be >= 0 (0 = never)"),
            (self.train.filter_patience >= 0, "train.filter_patience must be >= 0 (0 = never stop)"),
            (self.train.eval_timeout_s >= 0, "train.eval_timeout_s must be >= 0 (0 = derived)"),
            (self.train.collective_timeout_s > 0, "train.collective_timeout_s must be > 0"),
            (self.train.op_build_timeout_s > 0, "train.op_build_timeout_s must be > 0"),
            (self.train.prompt_timeout_s >= 0, "train.prompt_timeout_s must be >= 0 (0 = derived)"),
            (
                not ENGINE_OWNED_ARGS & self.rollout.engine_kwargs.keys(),
                f"rollout.engine_kwargs may not set {sorted(ENGINE_OWNED_ARGS)}: the engine depends on them",
            ),
            (
                self.data.task == "addition" or bool(self.data.train_file),
                "data.train_file is required for task math",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


class ConfigError(ValueError):
    pass


SPEC_SAFE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*")  # a verifier name (no "@" / "|": rewards.base.Scoring)


def verifier_names(cfg: Config) -> list[str]:
    """The run's verifiers by name ([]: each prompt's task's own)."""
    return list(cfg.data.verifiers) or ([cfg.data.verifier] if cfg.data.verifier else [])


def check_learner_split(cfg: Config, learner_world: int) -> None:
    """A step's groups must split evenly: whole groups over the learner ranks, then into
    ``mini_batches`` per rank; otherwise ranks would run different numbers of optimiser steps and one
    would wait alone in a collective. Checked by the launcher and again by every learner rank."""
    t = cfg.train
    if t.groups_per_step % (learner_world * t.mini_batches):
        raise ConfigError(
            f"train.groups_per_step ({t.groups_per_step}) must be a multiple of the learner ranks "
            f"({learner_world}) x train.mini_batches ({t.mini_batches}) = {learner_world * t.mini_batches}"
        )


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def field_docs() -> dict[tuple[str, str], str]:
    """Each field's documentation, from this module's own comments: the comment lines right above the
    field and its trailing comment, keyed by (section class name, field name)."""
    import ast
    import inspect
    import sys

    src = inspect.getsource(sys.modules[__name__])
    lines = src.splitlines()
    docs: dict[tuple[str, str], str] = {}
    for node in ast.parse(src).body:
        if not (isinstance(node, ast.ClassDef) and node.name.endswith("Config")):
            continue
        for st in node.body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                i = st.lineno - 1
                above: list[str] = []
                while i > 0 and lines[i - 1].strip().startswith("#"):
                    i -= 1
                    above.insert(0, lines[i].strip().lstrip("#").strip())
                trailing = lines[st.lineno - 1].split("  # ", 1)[1:]
                docs[(node.name, st.target.id)] = " ".join(above + trailing)
    return docs


def describe(cfg: Config) -> str:
    """The resolved config as YAML, every field with its documentation as a comment above it."""
    docs = field_docs()
    out: list[str] = []

    def emit(struct: Any, indent: str) -> None:
        for name in struct.__struct_fields__:
            value = getattr(struct, name)
            if doc := docs.get((type(struct).__name__, name)):
                out.extend(f"{indent}# {line}" for line in _wrap(doc, 100 - len(indent)))
            if isinstance(value, msgspec.Struct):
                out.append(f"{indent}{name}:")
                emit(value, indent + "  ")
            else:
                dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=10**6).strip()
                out.append(f"{indent}{dumped.removeprefix('{').removesuffix('}')}")

    emit(cfg, "")
    return "\n".join(out) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, max(40, width)) or [text]


def _field_type(dotted: str) -> Any:
    """The declared type of ``section.field`` (None when there is no such field)."""
    cls: Any = Config
    for k in dotted.split("."):
        hints = (
            typing.get_type_hints(cls) if isinstance(cls, type) and issubclass(cls, msgspec.Struct) else {}
        )
        if k not in hints:
            return None
        cls = hints[k]
    return cls


def _override_value(key: str, raw: str) -> Any:
    """A command-line value: as a string for a ``str`` field (``data.answer_field=yes`` is the string
    "yes", a template with ": " is not YAML), else parsed as a YAML scalar (numbers, booleans, lists)."""
    if _field_type(key) is str:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _did_you_mean(msg: str, where: str) -> str:
    """msgspec's "unknown field `x`" at ``where`` (a dotted section or ""), with the closest valid names."""
    m = re.search(r"unknown field `([^`]*)`", msg)
    section = _field_type(where) if where else Config
    if m is None or section is None:
        return ""
    valid = list(typing.get_type_hints(section))
    close = difflib.get_close_matches(m.group(1), valid, n=3, cutoff=0.6)
    name = f"{where}.{m.group(1)}" if where else m.group(1)
    hint = f"; did you mean {' or '.join(f'{where}.{c}' if where else c for c in close)}?" if close else ""
    return f"config error: unknown field {name}{hint} (valid here: {', '.join(valid)})"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (or defaults) + ``key.sub=value`` overrides (``_override_value``). Every error, a missing
    file or broken YAML included, is a ``ConfigError`` with a one-line message."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise ConfigError(f"{path}{at}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _override_value(key.strip(), raw))
    try:
        cfg = msgspec.convert(tree, Config, strict=False)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        where = msg.rsplit("at `$.", 1)
        section = where[1].rstrip("`") if len(where) == 2 else ""
        if unknown := _did_you_mean(msg, section):
            raise ConfigError(unknown) from None
        if len(where) == 2:
            raise ConfigError(f"config error at {section}: {where[0].strip(' -')}") from None
        raise ConfigError(f"config error: {msg}") from None
    return cfg.validate()
