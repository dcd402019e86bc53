"""The learner process (one per training device; rank 0 also runs the controller).

value pretraining (policy frozen, version 0)  ->  loop: batch -> targets -> value update -> policy
update -> version += 1 -> publish weights -> metrics / eval / checkpoint
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.distributed as dist

from async_vapo.buffer import PromptLedger
from async_vapo.config import Config, check_learner_split
from async_vapo.learner import checkpoint
from async_vapo.learner.batch import Batch, collate
from async_vapo.learner.controller import Controller, ControllerConfig
from async_vapo.learner.models import init_distributed, load_policy, load_value, make_engine, torch_dtype
from async_vapo.learner.step import (
    Timer,
    UpdateSchedule,
    batch_metrics,
    compute_targets,
    policy_update,
    value_update,
)
from async_vapo.metrics import MetricsWriter
from async_vapo.protocol import Prompt, Sampling
from async_vapo.weight_sync.broadcast import snapshot
from async_vapo.weight_sync.fanout import RankLinks, gather_status, share_plan
from async_vapo.weight_sync.publish import StreamPlan, stream_publish

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LearnerArgs:
    cfg: Config
    model_path: str
    data_endpoint: str
    control_endpoint: str
    resume: bool = False
    cpu_affinity: tuple[int, ...] = ()
    weight_host: str = "127.0.0.1"  # where rollout workers reach this rank's weight-sync stores
    store_address: str = ""  # the run's rendezvous store (host:port or file:path): rank 0 reports drops there
    store_key_dir: str = ""  # multi-node: where the run store's signing key is
    world_store: str = ""  # one machine: the learner world meets in this FileStore (no TCP listener)
    group_store_dir: str = ""  # one machine: weight groups meet in FileStores in this directory


class _Cmd:
    """What rank 0 tells the other learner ranks while it waits for data."""

    WAIT, BATCH, PUBLISH, STOP = range(4)


def build_prompts(cfg: Config, tokenizer: Any) -> tuple[list[Prompt], list[Prompt]]:
    """Training and held-out prompts; ``data.verifier`` (if set) names the verifier of every prompt."""
    train, evals = _task_prompts(cfg, tokenizer)
    if cfg.data.verifier:
        train = [Prompt(p.uid, p.token_ids, p.answer, cfg.data.verifier) for p in train]
        evals = [Prompt(p.uid, p.token_ids, p.answer, cfg.data.verifier) for p in evals]
    return train, evals


def _task_prompts(cfg: Config, tokenizer: Any) -> tuple[list[Prompt], list[Prompt]]:
    from async_vapo.tasks.datasets import addition_prompts, load_prompts

    d = cfg.data
    if d.task == "addition":
        return (
            addition_prompts(tokenizer, d.n_train, d.seed, "train-"),
            addition_prompts(tokenizer, d.n_eval, d.seed + 99_991, "eval-"),
        )
    train = load_prompts(d.train_file, tokenizer, d.prompt_template, d.prompt_field, d.answer_field, "math")
    evals = (
        load_prompts(d.eval_file, tokenizer, d.prompt_template, d.prompt_field, d.answer_field, "math")
        if d.eval_file
        else train[: d.n_eval]
    )
    return train, evals


class Trainer:
    def __init__(self, args: LearnerArgs) -> None:
        from transformers import AutoTokenizer

        self.args = args
        cfg = self.cfg = args.cfg
        self.on_gpu = torch.cuda.is_available()
        if self.on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.device = torch.device("cuda") if self.on_gpu else torch.device("cpu")
        init_distributed("nccl" if self.on_gpu else "gloo", args.world_store)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_learner_split(cfg, self.world)  # before any collective of the training loop
        self.comm_device = self.device  # gloo on CPU, NCCL (device tensors) on GPUs
        torch.manual_seed(cfg.train.seed + self.rank)
        self.out = Path(cfg.output_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(args.model_path)
        dtype = torch_dtype(cfg.model.dtype, self.on_gpu)
        bf16 = dtype == torch.bfloat16
        t = cfg.train
        per_rank = max(1, t.groups_per_step * cfg.rollout.n_samples // (self.world * t.mini_batches))
        micro = min(t.micro_batch_size, per_rank)
        self.micro = micro
        self.stream_publish = t.streams_publish
        self._stream_plan: StreamPlan | None = None
        self.links = RankLinks(self.rank)  # the engines this rank feeds (streamed publish)

        def engine(model: Any, lr: float) -> Any:
            if t.gradient_checkpointing:
                getattr(model, "backbone", model).gradient_checkpointing_enable()
            return make_engine(
                model, lr, t.warmup_steps, t.weight_decay, t.grad_clip, t.zero_stage, bf16, micro
            )

        self.policy = engine(load_policy(args.model_path, dtype), t.actor_lr)
        self.value = None
        if cfg.algo.estimator == "gae":
            self.value = engine(load_value(args.model_path, cfg.model.value_path, dtype), t.critic_lr)
        self.train_prompts, self.eval_prompts = build_prompts(cfg, self.tokenizer)
        self.ledger = PromptLedger(self.train_prompts, seed=cfg.data.seed)
        self.step = 0
        self.version = 0
        self.value_pretrained = cfg.algo.value_pretrain_steps == 0 or self.value is None
        if args.resume and (ck := checkpoint.latest(self.out / "checkpoints")) is not None:
            state = checkpoint.load(ck, self.policy, self.value)
            self.step, self.version = int(state["step"]), int(state["version"])
            self.ledger.load_state_dict(state["ledger"])
            self.value_pretrained = bool(state["value_pretrained"])
            log.info("resumed", checkpoint=str(ck), next_step=self.step, version=self.version)
        self.controller: Controller | None = None
        if self.rank == 0:
            self.controller = Controller(
                ControllerConfig(
                    data_endpoint=args.data_endpoint,
                    control_endpoint=args.control_endpoint,
                    groups_per_step=t.groups_per_step,
                    max_staleness=t.max_staleness,
                    filter_uniform_rewards=t.filter_uniform_rewards,
                    weight_backend="nccl" if self.on_gpu else "gloo",
                    weight_sync_timeout_s=t.weight_sync_timeout_s,
                    worker_timeout_s=t.worker_timeout_s,
                    weight_host=args.weight_host,
                    insecure=cfg.insecure,
                    curve_dir=cfg.curve_dir,
                    store_address=args.store_address,
                    store_key_dir=args.store_key_dir,
                    store_dir=args.group_store_dir,
                    fanout_ranks=self.world if self.stream_publish and t.weight_fanout else 1,
                ),
                self.ledger,
                self.version,
            )
            self.controller.start()
        if self.version > 0 and not self.stream_publish:  # resumed: the snapshot for (re)joining engines
            self._publish()  # (every rank: ZeRO-3 gathers are collectives)
        self.metrics = MetricsWriter(self.out, t.total_steps) if self.rank == 0 else None
        if self.metrics is not None and args.resume:
            self.metrics.rewind(self.step)
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)

    def schedule(self, seed: int) -> UpdateSchedule:
        t = self.cfg.train
        return UpdateSchedule(t.ppo_epochs, t.mini_batches, self.micro, seed)

    def _on_term(self, *_: Any) -> None:
        self.stop_requested = True

    # ---- data ------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[Batch, list[Any]]:
        """Rank 0 takes whole groups from the buffer and sends every other rank its share of them.

        While it waits, rank 0 tells every rank once a second what comes next (``_Cmd``): a batch, a
        stop, or a streamed publish for engines that have no current weights (a restarted or resumed
        run's engines: a streamed publish is a collective, so it cannot happen on rank 0 alone)."""
        while True:
            cmd, got = self._poll() if self.rank == 0 else (_Cmd.WAIT, None)
            cmd = self._share(cmd)
            if cmd == _Cmd.STOP:
                raise KeyboardInterrupt
            if cmd == _Cmd.PUBLISH:
                self._publish()
            if cmd == _Cmd.BATCH:
                break
        if self.rank != 0:
            return _recv_batch(self.comm_device).to(self.device), []
        assert got is not None
        groups = got
        # group i goes to rank i % world; each share is padded to its own longest row
        shares = [collate(groups[r :: self.world], self.tokenizer.pad_token_id) for r in range(self.world)]
        for r in range(1, self.world):
            _send_batch(shares[r], r, self.comm_device)
        return shares[0].to(self.device), groups

    def _poll(self) -> tuple[int, list[Any] | None]:
        assert self.controller is not None
        got = self.controller.take_batch(self.cfg.train.groups_per_step, timeout_s=1.0)
        if got is not None:
            return _Cmd.BATCH, got
        if self.stop_requested:
            return _Cmd.STOP, None
        if self.stream_publish and self.controller.engines_behind():
            return _Cmd.PUBLISH, None
        return _Cmd.WAIT, None

    def _share(self, cmd: int) -> int:
        if self.world == 1:
            return cmd
        t = torch.tensor([cmd], dtype=torch.long, device=self.comm_device)
        dist.broadcast(t, 0)
        return int(t.item())

    # ---- phases ----------------------------------------------------------------------------------
    def value_pretrain(self) -> None:
        a, t = self.cfg.algo, self.cfg.train
        for k in range(a.value_pretrain_steps):
            t0 = time.perf_counter()
            b, groups = self.next_batch()
            targets = compute_targets(self.policy, self.value, b, a, self.cfg.rollout.temperature, self.micro)
            m = value_update(self.value, b, targets, a, self.schedule(t.seed + k))
            if self.controller is not None:
                self.controller.mark_trained(groups)
            row = {
                "phase": "value_pretrain",
                "step": k - a.value_pretrain_steps,
                "policy_version": self.version,
                **batch_metrics(b, self.cfg.rollout.max_tokens, self.version),
                **targets.metrics,
                **m,
                "step_seconds": time.perf_counter() - t0,
            }
            if self.metrics is not None:
                self.metrics.write(row)
                log.info(
                    "value pretraining",
                    step=k + 1,
                    of=a.value_pretrain_steps,
                    value_loss=round(m["value_loss"], 4),
                    explained_variance=round(targets.metrics.get("explained_variance", 0.0), 3),
                )
        self.value_pretrained = True
        if self.value is not None:
            self._save_value(self.out / "value_pretrained")

    def train(self) -> None:
        a, t = self.cfg.algo, self.cfg.train
        first = self.step
        if self.step == 0 and t.eval_every:
            self.evaluate()  # the starting point of the learning curve
        busy0 = self._rollout_busy()
        while self.step < t.total_steps and not self.stop_requested:
            timer = Timer()
            t0 = time.perf_counter()
            with timer("wait_data"):
                b, groups = self.next_batch()
            with timer("targets"):
                targets = compute_targets(
                    self.policy, self.value, b, a, self.cfg.rollout.temperature, self.micro
                )
            m: dict[str, Any] = dict(targets.metrics)
            m["trained_sequences"] = int(b.mask.shape[0]) * self.world
            with timer("value_update"):
                if self.value is not None:
                    m |= value_update(self.value, b, targets, a, self.schedule(t.seed + self.step))
            with timer("policy_update"):
                m |= policy_update(
                    self.policy,
                    b,
                    targets,
                    a,
                    self.cfg.rollout.temperature,
                    self.schedule(t.seed + self.step),
                )
            stats = batch_metrics(b, self.cfg.rollout.max_tokens, self.version)
            self.version += 1
            if self.controller is not None:  # staleness is judged against the learner, not the engines
                self.controller.set_version(self.version)
            with timer("broadcast"):
                if self.version % t.broadcast_every == 0:
                    self._publish()
            if self.controller is not None:
                self.controller.mark_trained(groups)
            wall = time.perf_counter() - t0
            busy1 = self._rollout_busy()
            self._log_step(stats, m, timer, wall, int(b.mask.sum()) * self.world, busy0, busy1)
            busy0 = busy1
            if t.eval_every and (self.step + 1) % t.eval_every == 0:
                self.evaluate()
            self.step += 1
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.total_steps:
                self.save()
        log.info(
            "training finished" if not self.stop_requested else "stopping on request", step=self.step - first
        )

    def _rollout_busy(self) -> tuple[float, float, int]:
        return self.controller.rollout_busy() if self.controller is not None else (0.0, 0.0, 0)

    def _log_step(self, stats, m, timer, wall, tokens, busy0, busy1) -> None:
        if self.metrics is None or self.controller is None:
            return
        d_busy, d_alive = busy1[0] - busy0[0], busy1[1] - busy0[1]
        cm = self.controller.metrics()
        row = {
            "phase": "train",
            "step": self.step,
            "policy_version": self.version,
            **stats,
            **m,
            "learner_idle_frac": timer.spent["wait_data"] / wall,
            "rollout_idle_frac": (1 - d_busy / d_alive) if d_alive > 0 else None,
            "trained_tokens": tokens,
            "trained_tokens_per_s": tokens / wall,
            "generated_tokens_total": busy1[2],
            "step_seconds": wall,
            **{f"time_{k}": v for k, v in timer.spent.items()},
            "staleness_hist": cm["buffer/staleness_hist"],
            "buffer_queue_depth": cm["buffer/queue_depth"],
            "rejected_stale": cm["buffer/rejected_stale"],
            "filtered": cm["buffer/filtered"],
            "rejected_frames": sum(cm["rejected_frames"].values()),
            "rejected_frames_by_reason": cm["rejected_frames"],
            "weight_syncs": cm["weight_sync_count"],
            "worker_versions": cm["workers"],
            "worker_owners": cm["worker_owners"],  # the learner rank feeding each engine (fan-out)
            "groups_by_worker": cm["groups_by_worker"],
            "controller_counters": cm["counters"],
            "ledger": cm["ledger"],
            "weight_sync_s_per_MB": cm["weight_sync_seconds_total"]
            / max(1e-9, cm["weight_sync_bytes_total"] / 2**20),
            "time": time.time(),
        }
        self.metrics.write(row)
        self.metrics.progress(row, 0)
        if self.step % 5 == 0:
            self.metrics.plot()

    def evaluate(self) -> dict[str, Any] | None:
        if self.controller is None or self.metrics is None:
            return None
        r = self.cfg.rollout
        groups = self.controller.evaluate(
            self.eval_prompts, Sampling(r.eval_samples, r.eval_temperature, r.eval_top_p, r.max_tokens)
        )
        correct = [[resp.correct for resp in g.responses] for g in groups]
        row: dict[str, Any] = {
            "phase": "eval",
            "step": self.step,
            "policy_version": self.version,
            "eval_accuracy": sum(map(sum, correct)) / max(1, sum(map(len, correct))),
            f"eval_pass@{r.eval_samples}": sum(any(c) for c in correct) / max(1, len(correct)),
            "eval_problems": len(groups),
            "eval_samples": r.eval_samples,
            "time": time.time(),
        }
        self.metrics.write(row)
        log.info("evaluation", step=self.step, accuracy=round(row["eval_accuracy"], 4), problems=len(groups))
        return row

    def _publish(self) -> None:
        """New weights to the engines, the way ``train.publish`` says (every rank takes part: ZeRO-3
        gathers are collectives)."""
        if self.controller is None and self.world == 1:
            return
        if self.stream_publish:
            self._publish_streamed()
            return
        import deepspeed

        params = list(self.policy.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.controller is not None:
                snap = snapshot(
                    self.version, self.policy.module.named_parameters(), int(self.cfg.train.bucket_mb * 2**20)
                )
                self.controller.publish(snap)

    def _publish_streamed(self) -> None:
        """Every rank walks the bucket plan; each sends the gathered buckets to the engines it owns
        (``weight_sync.fanout``)."""
        if self._stream_plan is None:
            self._stream_plan = StreamPlan.of(
                self.policy.module.named_parameters(), int(self.cfg.train.bucket_mb * 2**20)
            )
        ctl = self.controller
        targets, plan = ctl.begin_stream(self.version, self._stream_plan.buckets) if ctl else ([], None)
        plan = share_plan(plan, self.comm_device)
        if not plan.targets:  # no engine can take it now (joining ones get the next publish)
            return
        if ctl is not None:  # rank 0's groups are the controller's links
            own = {t.worker.worker_id: t.worker.link for t in targets}
            self.links.lookup = own.get
        self.links.prepare(plan)
        stream_publish(self._stream_plan, self.links.send if self.links.sending else None, self.device)
        outcomes = gather_status(plan, self.links.outcomes, self.comm_device)
        if ctl is not None:
            ctl.end_stream(self.version, targets, outcomes)

    def save(self) -> Path:
        """Checkpoint; ``step`` in it is the next step to run."""
        state = {
            "ledger": self.ledger.state_dict() if self.rank == 0 else {},
            "value_pretrained": self.value_pretrained,
        }
        with self._ledger_lock():
            path = checkpoint.save(
                self.out / "checkpoints",
                self.step,
                self.version,
                self.policy,
                self.value,
                state,
                self.args.model_path,
            )
        log.info("checkpoint saved", path=str(path), step=self.step)
        return path

    def _ledger_lock(self):
        import contextlib

        return self.controller.lock if self.controller is not None else contextlib.nullcontext()

    def _save_value(self, out: Path) -> None:
        import deepspeed

        assert self.value is not None
        params = list(self.value.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.rank == 0:
                self.value.module.save(out)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.plot()
        if self.controller is not None:
            self.controller.stop()


_FIELDS: dict[str, tuple[torch.dtype, int]] = {  # Batch field -> (dtype, number of dimensions)
    "input_ids": (torch.long, 2),
    "attention_mask": (torch.long, 2),
    "resp_index": (torch.long, 2),
    "response_ids": (torch.long, 2),
    "mask": (torch.bool, 2),
    "behaviour_logprobs": (torch.float32, 2),
    "versions": (torch.long, 2),
    "scores": (torch.float32, 1),
    "correct": (torch.bool, 1),
    "truncated": (torch.bool, 1),
    "group_ids": (torch.long, 1),
}


def _send_batch(b: Batch, dst: int, device: torch.device) -> None:
    """Rank 0 -> rank ``dst``: shapes first, then every tensor (on the communication device: NCCL
    cannot send host tensors). Only the two ranks take part; the others go on."""
    shapes = torch.zeros(len(_FIELDS), 2, dtype=torch.long)
    for i, n in enumerate(_FIELDS):
        t = getattr(b, n)
        shapes[i, : t.dim()] = torch.tensor(t.shape)
    dist.send(shapes.to(device), dst)
    for n in _FIELDS:
        t = getattr(b, n).contiguous()
        dist.send((t.to(torch.uint8) if t.dtype == torch.bool else t).to(device), dst)


def _recv_batch(device: torch.device) -> Batch:
    shapes = torch.zeros(len(_FIELDS), 2, dtype=torch.long, device=device)
    dist.recv(shapes, 0)
    out = {}
    for i, (n, (dtype, dim)) in enumerate(_FIELDS.items()):
        shape = [int(x) for x in shapes[i, :dim].tolist()]
        t = torch.empty(shape, dtype=torch.uint8 if dtype == torch.bool else dtype, device=device)
        dist.recv(t, 0)
        out[n] = t.bool() if dtype == torch.bool else t
    return Batch(**out)


def learner_main(args: LearnerArgs) -> None:
    from async_vapo.logging import configure_logging

    configure_logging()
    if args.cpu_affinity and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(args.cpu_affinity))
    if not torch.cuda.is_available():
        torch.set_num_threads(args.cfg.train.learner_threads)
    trainer = Trainer(args)
    try:
        if not trainer.value_pretrained:
            trainer.value_pretrain()
        trainer.train()
        t = args.cfg.train
        if not trainer.stop_requested and t.eval_every and t.total_steps % t.eval_every:
            trainer.evaluate()  # the final model is always evaluated
        trainer.save()
    except KeyboardInterrupt:
        trainer.save()
    finally:
        trainer.close()
