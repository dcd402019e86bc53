"""The learner process (one per training device; rank 0 also runs the controller).

value pretraining (policy frozen, version 0)  ->  loop: batch -> targets -> value update -> policy
update -> version += 1 -> publish weights -> metrics / eval / checkpoint

Batches reach the ranks through ``learner/feed.py`` (rank 0's commands), weights leave them through
``learner/publisher.py`` (snapshot or streamed), the update is ``learner/targets.py``
(its constants) and ``learner/update.py`` (the optimiser steps, on ``learner/schedule.py``'s schedule).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import structlog
import torch

from async_vapo import rows
from async_vapo.buffer import PromptLedger
from async_vapo.controller import ControllerMetrics, RolloutTotals
from async_vapo.controller.evaluation import EVAL_GRACE_S, eval_timeout_s
from async_vapo.learner import checkpoint
from async_vapo.learner.batch import Batch
from async_vapo.learner.feed import RankFeed, StopRun
from async_vapo.learner.publisher import make_publisher
from async_vapo.learner.schedule import UpdateSchedule
from async_vapo.learner.setup import (
    LearnerArgs,
    build_models,
    build_prompts,
    init_rank,
    micro_batch_size,
    restore,
    start_controller,
)
from async_vapo.learner.targets import compute_targets
from async_vapo.learner.timing import Timer, batch_metrics
from async_vapo.learner.update import can_fuse, fused_update, policy_update, value_update
from async_vapo.metrics import MetricsWriter, sample_rows
from async_vapo.protocol import Sampling
from async_vapo.tracking import make_sinks

log = structlog.get_logger(__name__)
SHOWN_CHARS = 300  # of a logged sample's prompt (its end) and response (its start) on the console
__all__ = ["LearnerArgs", "Trainer", "learner_main"]


class Trainer:
    """One learner rank's training loop (set-up in ``learner/setup.py``)."""

    def __init__(self, args: LearnerArgs) -> None:
        from transformers import AutoTokenizer

        self.args, self.cfg = args, args.cfg
        self.out = Path(self.cfg.output_dir)
        r = self.placement = init_rank(args)
        self.rank, self.world, self.device = r.rank, r.world, r.device
        self.micro = micro_batch_size(self.cfg, self.world)
        self.tokenizer = AutoTokenizer.from_pretrained(args.model_path)
        self.policy, self.value = build_models(self.cfg, args.model_path, r.on_gpu, self.micro)
        self.train_prompts, self.eval_prompts = build_prompts(self.cfg, self.tokenizer)
        self.ledger = PromptLedger(self.train_prompts, seed=self.cfg.data.seed)
        self.progress = restore(self.cfg, args.resume, self.policy, self.value, self.ledger)
        vocab = int(self.policy.module.config.vocab_size)
        t = self.cfg.train
        # resumed (a restarted learner world too, from the start included): engines kept across the restart
        # may hold other weights, so in snapshot mode the learner publishes its own before its first step
        snapshot_at_start = not t.streams_publish and (self.version > 0 or args.resume)
        self.controller = (
            start_controller(args, r, self.ledger, self.version, vocab, snapshot_at_start)
            if self.rank == 0
            else None
        )
        self.publisher = make_publisher(
            t.streams_publish,
            self.cfg.model.lora_publish == "adapter",
            self.policy.module,
            int(t.bucket_mb * 2**20),
            self.controller,
            self.rank,
            self.world,
            self.device,
        )
        if snapshot_at_start:  # for (re)joining engines
            self._publish()  # (every rank: ZeRO-3 gathers are collectives)
        self.feed = RankFeed(
            self.rank,
            self.world,
            self.device,
            self.controller,
            t.groups_per_step,
            self.tokenizer.pad_token_id,
        )
        self.metrics = None
        if self.rank == 0:
            self.metrics = MetricsWriter(self.out, self.cfg.train.total_steps, make_sinks(self.cfg, self.out))
        if self.metrics is not None and args.resume:
            self.metrics.rewind(self.step, self.progress.value_pretrained)
        self.evaluated: tuple[int, float] | None = None  # (step, held-out accuracy) of the last evaluation
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def version(self) -> int:
        return self.progress.version

    @property
    def stop_requested(self) -> bool:
        return self.feed.stop_requested

    @property
    def failure(self) -> BaseException | None:
        """The controller's failure, if that is why the run stops (raised after every rank saved)."""
        return self.feed.failure

    def schedule(self, seed: int) -> UpdateSchedule:
        t = self.cfg.train
        return UpdateSchedule(
            t.ppo_epochs, t.mini_batches, self.micro, seed, 0, t.max_tokens_per_micro, t.logit_chunk
        )

    def _on_term(self, *_: Any) -> None:
        self.feed.stop_requested = True

    # ---- data ------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[Batch, list[Any]]:
        """This rank's share of the next batch (``learner/feed.py``); a streamed publish for engines that
        hold no current weights happens while waiting for it. Raises ``StopRun``."""
        return self.feed.next_batch(self._publish, self.publisher.engines_behind)

    # ---- phases ----------------------------------------------------------------------------------
    def value_pretrain(self) -> None:
        a, t = self.cfg.algo, self.cfg.train
        for k in range(a.value_pretrain_steps):
            t0 = time.perf_counter()
            b, groups = self.next_batch()
            targets = compute_targets(
                self.policy, self.value, b, a, self.cfg.rollout.temperature, self.schedule(0).micro
            )
            m = value_update(self.value, b, targets, a, self.schedule(t.seed + k))
            if self.controller is not None:
                self.controller.mark_trained(groups)
            if self.metrics is not None:
                fields = {
                    "step": k - a.value_pretrain_steps,
                    "policy_version": self.version,
                    **batch_metrics(b, self.cfg.rollout.max_tokens, self.version),
                    **targets.metrics,
                    **m,
                    "step_seconds": time.perf_counter() - t0,
                }
                self.metrics.write(rows.make(rows.PretrainRow, fields))
                ev = targets.metrics.get("explained_variance", 0.0)
                log.info(
                    "value pretraining",
                    step=k + 1,
                    of=a.value_pretrain_steps,
                    value_loss=round(m["value_loss"], 4),
                    explained_variance=round(ev, 3),
                )
        self.progress.value_pretrained = True
        if self.value is not None:
            self._save_value(self.out / "value_pretrained")

    def train(self) -> None:
        t = self.cfg.train
        first = self.step
        if self.controller is not None:
            self.controller.start_filtering()  # dynamic sampling is for the policy phase
        if self.step == 0 and t.eval_every:
            self.evaluate()  # the starting point of the learning curve
        busy0 = self._rollout_totals()
        while self.step < t.total_steps and not self.stop_requested:
            timer, t0 = Timer(), time.perf_counter()
            with timer("wait_data"):
                b, groups = self.next_batch()
            stats = batch_metrics(b, self.cfg.rollout.max_tokens, self.version)
            m = self._update(b, timer)
            self.progress.version += 1
            if self.controller is not None:  # staleness is judged against the learner, not the engines
                self.controller.set_version(self.version)
            with timer("broadcast"):
                if self.version % t.broadcast_every == 0:
                    self._publish()
            if self.controller is not None:
                self.controller.mark_trained(groups)
            busy1 = self._rollout_totals()
            self._log_step(
                stats | m, timer, time.perf_counter() - t0, int(b.mask.sum()) * self.world, busy0, busy1
            )
            busy0 = busy1
            if t.log_samples_every and self.step % t.log_samples_every == 0 and groups:
                self._log_samples(groups[0])
            if t.eval_every and (self.step + 1) % t.eval_every == 0:
                self.evaluate()
            self.progress.step += 1
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.total_steps:
                self.save()
        done = "training finished" if not self.stop_requested else "stopping on request"
        log.info(done, step=self.step - first)

    def _update(self, b: Batch, timer: Timer) -> dict[str, Any]:
        """Targets, then the value update, then the policy update, on one batch (fused when the schedule
        allows: ``train.fused_targets``)."""
        a, seed, temperature = self.cfg.algo, self.cfg.train.seed + self.step, self.cfg.rollout.temperature
        sched = self.schedule(seed)
        m: dict[str, Any] = {"trained_sequences": int(b.mask.shape[0]) * self.world}
        if self.cfg.train.fused_targets and can_fuse(sched, a):
            with timer("fused_update"):
                return m | fused_update(self.policy, self.value, b, a, temperature, sched)
        with timer("targets"):
            targets = compute_targets(self.policy, self.value, b, a, temperature, sched.micro)
        m |= targets.metrics
        with timer("value_update"):
            if self.value is not None:
                m |= value_update(self.value, b, targets, a, sched)
        with timer("policy_update"):
            m |= policy_update(self.policy, b, targets, a, temperature, sched)
        return m

    def _rollout_totals(self) -> RolloutTotals:
        return self.controller.rollout_totals() if self.controller is not None else RolloutTotals()

    def _log_step(
        self,
        m: dict[str, Any],
        timer: Timer,
        wall: float,
        tokens: int,
        busy0: RolloutTotals,
        busy1: RolloutTotals,
    ) -> None:
        if self.metrics is None or self.controller is None:
            return
        d_busy, d_alive = busy1.busy_s - busy0.busy_s, busy1.alive_s - busy0.alive_s
        fields = {
            "step": self.step,
            "policy_version": self.version,
            **m,
            "learner_idle_frac": timer.spent["wait_data"] / wall,
            "rollout_idle_frac": (1 - d_busy / d_alive) if d_alive > 0 else None,
            "trained_tokens": tokens,
            "trained_tokens_per_s": tokens / wall,
            "generated_tokens_total": busy1.tokens,
            "step_seconds": wall,
            **{f"time_{k}": v for k, v in timer.spent.items()},
            **_controller_fields(self.controller.metrics()),
            "time": time.time(),
        }
        row = rows.make(rows.TrainRow, fields)
        self.metrics.write(row)
        self.metrics.progress(rows.to_dict(row), 0)
        if self.step % 5 == 0:
            self.metrics.plot()

    def _log_samples(self, group: Any) -> None:
        """Rank 0: one trained group to ``samples.jsonl`` (and the trackers' tables), one of its responses
        (a rewarded one if there is one) to the console."""
        if self.metrics is None:
            return
        rows = sample_rows(group, self.tokenizer, self.step, self.version)
        self.metrics.samples(rows, self.step)
        shown = max(rows, key=lambda r: r["reward"])
        log.info(
            "sample",
            step=self.step,
            uid=shown["uid"],
            reward=shown["reward"],
            verdict=shown["verdict"],
            versions=shown["versions"],
            prompt=shown["prompt"][-SHOWN_CHARS:],
            response=shown["response"][:SHOWN_CHARS],
        )

    def evaluate(self) -> rows.EvalRow | None:
        """One evaluation round on the engines (rank 0's controller). Every rank waits for it in
        one-second rounds of ``feed.share``, so none sits in a collective longer than that, however long the
        round takes; a round that runs out of time is partial (``eval_missing``), never an error."""
        r = self.cfg.rollout
        sampling = Sampling(r.eval_samples, r.eval_temperature, r.eval_top_p, r.max_tokens)
        fut, deadline = None, 0.0
        if self.controller is not None:
            timeout = eval_timeout_s(self.cfg, len(self.eval_prompts), self.controller.generation_rate())
            fut = self.controller.start_evaluation(self.eval_prompts, sampling, timeout)
            # the round ends itself at its timeout; this bound holds even if the controller's loop is gone
            deadline = time.monotonic() + timeout + EVAL_GRACE_S
        while not self.feed.share(int(fut is None or fut.done() or time.monotonic() > deadline)):
            if fut is not None:
                concurrent.futures.wait([fut], timeout=1.0)
        if fut is None or self.metrics is None:
            return None
        groups = []
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            groups = fut.result()
        else:  # the controller failed or never answered: an empty round (its failure stops the run next)
            fut.cancel()
            log.error("evaluation round got no answer from the controller", step=self.step)
        correct = [[resp.correct for resp in g.responses] for g in groups]
        row = rows.EvalRow(
            step=self.step,
            policy_version=self.version,
            eval_accuracy=sum(map(sum, correct)) / max(1, sum(map(len, correct))),
            eval_pass_at_k=sum(any(c) for c in correct) / max(1, len(correct)),
            eval_problems=len(groups),
            eval_missing=len(self.eval_prompts) - len(groups),
            eval_samples=r.eval_samples,
            time=time.time(),
        )
        self.metrics.write(row)
        self.evaluated = (self.step, row.eval_accuracy)
        log.info("evaluation", step=self.step, accuracy=round(row.eval_accuracy, 4), problems=len(groups))
        return row

    # ---- weights out ---------------------------------------------------------------------------------
    def _publish(self) -> None:
        """New weights to the engines, the way ``train.publish`` says (every rank takes part)."""
        self.publisher.publish(self.version)

    # ---- state out -----------------------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint; ``step`` in it is the next step to run. The ledger is copied under the controller's
        lock (the controller thread changes it); the writing happens outside it, so the controller keeps
        serving (heartbeats, weight-sync acks) however long the save takes."""
        lock = self.controller.lock if self.controller is not None else contextlib.nullcontext()
        with lock:
            state = {
                "ledger": self.ledger.state_dict() if self.rank == 0 else {},
                "value_pretrained": self.progress.value_pretrained,
            }
        if self.evaluated is not None and self.evaluated[0] == self.step:  # for train.keep_best
            state["eval_accuracy"] = self.evaluated[1]
        t = self.cfg.train
        path = checkpoint.save(
            self.out / "checkpoints",
            self.step,
            self.version,
            self.policy,
            self.value,
            state,
            self.args.model_path,
            retention=checkpoint.Retention(t.keep_last, t.keep_best),
            save_optimizer=t.save_optimizer,
        )
        log.info("checkpoint saved", path=str(path), step=self.step)
        return path

    def _save_value(self, out: Path) -> None:
        """The critic after Value-Pretraining (every rank: parameters are gathered one at a time)."""
        assert self.value is not None
        self.value.module.save(out, writer=self.rank == 0)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.controller is not None:
            self.controller.stop()


def _controller_fields(cm: ControllerMetrics) -> dict[str, Any]:
    """The controller's side of a step's metrics row."""
    return {
        "staleness_hist": cm.staleness_hist,
        "buffer_queue_depth": cm.queue_depth,
        "rejected_stale": cm.rejected_stale,
        "filtered": cm.filtered,
        "rejected_frames": sum(cm.rejected_frames.values()),
        "rejected_frames_by_reason": cm.rejected_frames,
        "weight_syncs": cm.syncs.count,
        "worker_versions": cm.worker_versions,
        "worker_owners": cm.worker_owners,  # the learner rank feeding each engine (fan-out)
        "groups_by_worker": cm.groups_by_worker,
        "controller_counters": cm.counters,
        "ledger": cm.ledger,
        "weight_sync_s_per_MB": cm.syncs.seconds_per_mb,
        "weight_sync_MB": cm.syncs.mb_per_sync,
    }


def learner_main(args: LearnerArgs) -> None:
    from async_vapo.logging import configure_logging

    configure_logging(process=f"learner-{os.environ.get('RANK', '0')}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars: the console has our progress line
    if args.cpu_affinity and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(args.cpu_affinity))
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or args.cfg.train.learner_threads or 1)
    trainer = Trainer(args)
    try:
        if not trainer.progress.value_pretrained:
            trainer.value_pretrain()
        trainer.train()
        t = args.cfg.train
        if not trainer.stop_requested and t.eval_every and t.total_steps % t.eval_every:
            trainer.evaluate()  # the final model is always evaluated
        trainer.save()
    except StopRun:  # a stop request, or a controller failure every rank was told of: all ranks save
        trainer.save()
        if trainer.failure is not None:
            raise trainer.failure from None
    finally:
        trainer.close()
