"""What a learner rank builds before its first step, one function per job.

``Trainer.__init__`` (``learner/main.py``) calls them in order: join the learner world (``init_rank``),
build the policy and value engines (``build_models``), the prompts and the ledger (``build_prompts``),
restore a checkpoint (``restore``) and, on rank 0, start the controller (``start_controller``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog
import torch
import torch.distributed as dist

from async_vapo.config import Config, check_learner_split
from async_vapo.controller import Controller, GroupSettings, Wiring
from async_vapo.controller.admission import GroupRules, prompt_fits
from async_vapo.learner import checkpoint
from async_vapo.learner.lora import apply_lora
from async_vapo.learner.models import (
    attention_kernel,
    ds_config,
    init_distributed,
    load_policy,
    load_value,
    make_engine,
    torch_dtype,
)
from async_vapo.protocol import Prompt

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class LearnerArgs:
    """One learner rank's recipe and wiring (built by the launcher's node plan)."""

    cfg: Config
    model_path: str
    data_endpoint: str  # rank 0 binds the controller's sockets here
    control_endpoint: str
    resume: bool = False
    cpu_affinity: tuple[int, ...] = ()
    threads: int = 0  # CPU: torch threads (0: train.learner_threads)
    weight_host: str = "127.0.0.1"  # where rollout workers reach this rank's weight-sync stores
    store_address: str = ""  # the run's rendezvous store (host:port or file:path): rank 0 reports drops there
    store_key_dir: str = ""  # multi-node: where the run store's signing key is
    world_store: str = ""  # one machine: the learner world meets in this FileStore (no TCP listener)
    group_store_dir: str = ""  # one machine: weight groups meet in FileStores in this directory
    ranks_per_node: int = 0  # learner ranks on each learner node (fan-out owners spread over nodes)
    rollout_engines: int = 0  # engines in the launcher's plan: only their workers may join (0: any)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    device: torch.device  # also the device of every tensor sent between ranks (NCCL needs the GPU's)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Progress:
    """Where training stands (restored from a checkpoint, or the start)."""

    step: int = 0  # the next step to run
    version: int = 0  # the policy version (one per policy update)
    value_pretrained: bool = False


def init_rank(args: LearnerArgs) -> RankInfo:
    """Join the learner world (NCCL on GPUs, gloo on CPU) and check the step splits over it."""
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_distributed("nccl" if on_gpu else "gloo", args.world_store, args.cfg.train.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    check_learner_split(args.cfg, world)  # before any collective of the training loop
    torch.manual_seed(args.cfg.train.seed + rank)
    return RankInfo(rank, world, torch.device("cuda" if on_gpu else "cpu"))


def micro_batch_size(cfg: Config, world: int) -> int:
    """``train.micro_batch_size``, capped at the sequences one rank gets per mini-batch."""
    t = cfg.train
    per_rank = max(1, t.groups_per_step * cfg.rollout.n_samples // (world * t.mini_batches))
    return min(t.micro_batch_size, per_rank)


def build_models(cfg: Config, model_path: str, on_gpu: bool, micro: int) -> tuple[Any, Any | None]:
    """The policy engine and, for the GAE estimator, the value engine (each with its own optimiser)."""
    dtype = torch_dtype(cfg.model.dtype, on_gpu)
    bf16 = dtype == torch.bfloat16
    t = cfg.train
    ds = ds_config(t, bf16, micro)  # ZeRO-3: each model is built partitioned, never whole on a rank
    attn = attention_kernel(cfg.model.attn_implementation, on_gpu)
    m = cfg.model
    actor = load_policy(model_path, dtype, ds, attn)
    if m.lora_rank:
        apply_lora(actor, m.lora_rank, m.lora_alpha, m.lora_target_modules)
    policy = make_engine(actor, t.actor_lr, t, bf16, micro)
    value = None
    if cfg.algo.estimator == "gae":
        critic = load_value(model_path, m.value_path, dtype, ds, attn)
        if m.critic_lora_rank:  # the backbone adapted and frozen, the value head trained in full
            apply_lora(critic.backbone, m.critic_lora_rank, m.lora_alpha, m.lora_target_modules)
        value = make_engine(critic, t.critic_lr, t, bf16, micro)
    log.info(
        "learner models built",
        dtype=str(dtype).removeprefix("torch."),
        zero_stage=t.zero_stage,
        gradient_checkpointing=t.gradient_checkpointing,
        attention=attn,
        critic=value is not None,
        optimizer=type(policy.basic_optimizer).__name__,
        offload_optimizer=policy.zero_offload_optimizer() is not None,
        offload_params=policy.zero_offload_param() is not None,
        trained_params={"policy": _trained(policy.module), "critic": _trained(value.module) if value else 0},
    )
    return policy, value


def _trained(module: Any) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def declared_ranges(cfg: Config) -> dict[str, tuple[float, float]]:
    """The reward range each of the run's own verifiers declares (loaded in a child process, as the
    launcher's pre-flight does; the built-in ones are binary and need no load)."""
    from async_vapo.config import verifier_names
    from async_vapo.rewards.pool import check_verifier
    from async_vapo.rewards.verifiers import REGISTRY

    out = {}
    for name in verifier_names(cfg):
        if name not in REGISTRY:
            check = check_verifier(name, cfg.rollout.verifier_timeout_s + 60)
            if check.error is not None:
                raise ValueError(f"verifier {name!r} cannot be used: {check.error}")
            out[name] = check.reward_range
    return out


def build_prompts(cfg: Config, tokenizer: Any) -> tuple[list[Prompt], list[Prompt]]:
    """Training and held-out prompts; the run's verifiers (if set) name the verifier of every prompt."""
    train, evals = _task_prompts(cfg, tokenizer)
    return _scored(_fitting(train, cfg, "train"), cfg), _scored(_fitting(evals, cfg, "eval"), cfg)


def held_out_prompts(cfg: Config, tokenizer: Any) -> list[Prompt]:
    """The held-out prompts alone (``python -m async_vapo.eval --config``): the training data is not read
    when the run has a held-out file of its own."""
    if cfg.data.task == "addition" or not cfg.data.eval_file:
        return build_prompts(cfg, tokenizer)[1]
    return _scored(_fitting(_eval_file_prompts(cfg, tokenizer), cfg, "eval"), cfg)


def _scored(prompts: list[Prompt], cfg: Config) -> list[Prompt]:
    from async_vapo.config import verifier_names
    from async_vapo.rewards.base import Scoring

    if names := verifier_names(cfg):
        spec = Scoring.spec(names, list(cfg.data.verifier_weights))
        return [msgspec.structs.replace(p, task=spec) for p in prompts]
    return prompts


def _fitting(prompts: list[Prompt], cfg: Config, split: str) -> list[Prompt]:
    """The prompts an engine can answer: at least one token, and shorter than ``rollout.max_model_len``
    (vLLM refuses longer ones, and the prompt would stay outstanding forever). The rest are counted and
    logged; none left is an error."""
    keep = [p for p in prompts if prompt_fits(p, cfg.rollout.max_model_len)]
    if dropped := len(prompts) - len(keep):
        log.warning(
            "prompts too long for rollout.max_model_len (or empty) were left out",
            split=split,
            dropped=dropped,
            kept=len(keep),
            max_model_len=cfg.rollout.max_model_len,
        )
    if prompts and not keep:
        raise ValueError(
            f"no {split} prompt fits rollout.max_model_len={cfg.rollout.max_model_len} (all {len(prompts)} "
            "are empty or at least that long)"
        )
    return keep


def _task_prompts(cfg: Config, tokenizer: Any) -> tuple[list[Prompt], list[Prompt]]:
    from async_vapo.tasks.datasets import addition_prompts, chat_format, load_prompts

    d = cfg.data
    if d.task == "addition":
        return (
            addition_prompts(tokenizer, d.n_train, d.seed, "train-", d.min_digits),
            addition_prompts(tokenizer, d.n_eval, d.seed + 99_991, "eval-", d.min_digits),
        )
    train = load_prompts(
        d.train_file,
        tokenizer,
        d.prompt_template,
        d.prompt_field,
        d.answer_field,
        "math",
        split=d.train_split,
        chat=chat_format(d.chat_template, tokenizer, d.system_prompt),
        extra_fields=tuple(d.extra_fields),
    )
    return train, _eval_file_prompts(cfg, tokenizer) if d.eval_file else train[: d.n_eval]


def _eval_file_prompts(cfg: Config, tokenizer: Any) -> list[Prompt]:
    from async_vapo.tasks.datasets import chat_format, load_prompts

    d = cfg.data
    return load_prompts(
        d.eval_file,
        tokenizer,
        d.eval_prompt_template or d.prompt_template,
        d.eval_prompt_field or d.prompt_field,
        d.eval_answer_field or d.answer_field,
        "math",
        split=d.eval_split,
        chat=chat_format(d.chat_template, tokenizer, d.system_prompt),
        extra_fields=tuple(d.extra_fields),
    )


def restore(cfg: Config, resume: bool, policy: Any, value: Any | None, ledger: Any) -> Progress:
    """The latest checkpoint under ``<output_dir>/checkpoints`` when resuming, else the start."""
    pretrained = cfg.algo.value_pretrain_steps == 0 or value is None
    if not resume or (ck := checkpoint.latest(Path(cfg.output_dir) / "checkpoints")) is None:
        return Progress(value_pretrained=pretrained)
    state = checkpoint.load(ck, policy, value)
    ledger.load_state_dict(state["ledger"])
    progress = Progress(int(state["step"]), int(state["version"]), bool(state["value_pretrained"]))
    log.info("resumed", checkpoint=str(ck), next_step=progress.step, version=progress.version)
    return progress


def start_controller(
    args: LearnerArgs, rank: RankInfo, ledger: Any, version: int, vocab_size: int, snapshot_at_start: bool
) -> Controller:
    """Rank 0's controller thread, listening on the run's endpoints; groups are checked against the
    config's bounds and the policy's vocabulary (``controller.admission``). ``snapshot_at_start``: the
    learner publishes a snapshot of its weights before its first step."""
    t = args.cfg.train
    wiring = Wiring(
        data_endpoint=args.data_endpoint,
        control_endpoint=args.control_endpoint,
        groups=GroupSettings(args.weight_host, "nccl" if rank.on_gpu else "gloo", args.group_store_dir),
        insecure=args.cfg.insecure,
        curve_dir=args.cfg.curve_dir,
        store_address=args.store_address,
        store_key_dir=args.store_key_dir,
        fanout_ranks=rank.world if t.streams_publish and t.weight_fanout else 1,
        ranks_per_node=args.ranks_per_node,
    )
    controller = Controller(
        t,
        wiring,
        ledger,
        version,
        rules=GroupRules.of(args.cfg, vocab_size, args.rollout_engines, declared_ranges(args.cfg)),
        snapshot_at_start=snapshot_at_start,
    )
    controller.start()
    return controller
