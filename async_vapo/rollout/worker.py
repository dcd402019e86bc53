"""The rollout worker: one process, one vLLM engine, streaming scored groups to the learner side.

Loop: the learner side assigns prompts (``Assign``: each prompt is one credit); for every prompt the
worker samples N responses (Group-Sampling), scores them in the verifier pool and PUSHes the
``TrajectoryGroup`` with per-token behaviour log-probs and policy versions. Generation waits for nothing
but credits.

Weight updates (``WeightUpdate``), one at a time, in the mode ``rollout.weight_update`` names:

- ``keep`` (default): requests in flight are frozen where they are, the engine joins the broadcast and
  loads, their KV caches are recomputed under the new weights and they continue (as in PipelineRL and
  AReaL): a long response never holds an update back, and it may span versions. vLLM labels every token
  with the version of the weights that sampled it, so tags and behaviour log-probs stay exact per token.
- ``drain``: new requests wait at a gate and requests in flight finish under the old weights before the
  load: every response has a single version, an update waits for the longest response in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq.asyncio

from async_vapo.config import RolloutConfig
from async_vapo.protocol import (
    Assign,
    Control,
    Hello,
    JoinGroup,
    Prompt,
    Response,
    RolloutFailed,
    Sampling,
    TrajectoryGroup,
    WeightAck,
    WeightUpdate,
    WorkerStats,
    pack_f32,
    pack_i32,
    unpack_i32,
)
from async_vapo.protocol.keys import client_security
from async_vapo.protocol.transport import ControlClient, GroupSender
from async_vapo.rewards import VerifierPool, reward_of
from async_vapo.rollout import exits
from async_vapo.rollout.engine import EngineConfig, EngineConfigError, RolloutEngine
from async_vapo.weight_sync.group import GroupSpec

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """One worker's wiring; what it samples and how it scores come from the recipe's ``rollout`` section."""

    worker_id: str
    data_endpoint: str
    control_endpoint: str
    engine: EngineConfig
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    curve_dir: str = ""  # CURVE keys when the learner is beyond loopback
    heartbeat_s: float = 2.0
    initial_version: int = 0


class RolloutWorker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.version = cfg.initial_version
        self.engine = RolloutEngine(cfg.engine)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.engine.model)
        r = cfg.rollout
        self.pool = VerifierPool(
            r.verifier_processes,
            r.verifier_timeout_s,
            correct_reward=r.correct_reward,
            wrong_reward=r.wrong_reward,
        )
        self.ctx = zmq.asyncio.Context()
        security = client_security(cfg.curve_dir, cfg.worker_id) if cfg.curve_dir else None
        self.control = ControlClient(self.ctx, cfg.control_endpoint, cfg.worker_id, security)
        self.sender = GroupSender(self.ctx, cfg.data_endpoint, security=security)
        self.exit_code = exits.FINISHED
        self._gate = asyncio.Event()
        self._gate.set()
        self._updating = asyncio.Lock()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task] = set()
        self._joining: asyncio.Task | None = None
        self.busy_seconds = 0.0
        self._busy_since: float | None = None
        self._started = time.perf_counter()
        self.generated_tokens = 0
        self._run: asyncio.Task | None = None  # the task running ``run`` (a dead engine cancels it)

    async def run(self) -> None:
        await self.engine.set_version(self.version)
        await self.control.send(
            Hello(self.cfg.worker_id, self.version, os.getpid(), self.cfg.engine.tensor_parallel_size)
        )
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while True:
                msg = await self.control.recv()
                if isinstance(msg, Assign):
                    for p in msg.prompts:
                        self._spawn(self._rollout(p, msg.sampling, msg.eval_round))
                elif isinstance(msg, JoinGroup):
                    spec = GroupSpec(
                        msg.host, msg.port, msg.world_size, msg.backend, msg.timeout_s, msg.store_file
                    )
                    # an update that follows (a group joined for a streamed publish) waits for it
                    self._joining = self._spawn(self.engine.init_weight_group(spec))
                elif isinstance(msg, WeightUpdate):
                    self._spawn(self._update(msg))
                elif isinstance(msg, Control) and msg.kind == "rejoin":
                    if not await self._rejoin():
                        self.exit_code = exits.REJOIN_FAILED
                        break
                elif isinstance(msg, Control) and msg.kind == "shutdown":
                    self.exit_code = exits.DROPPED if msg.reason == "dropped" else exits.FINISHED
                    log.info("shutting down", worker=self.cfg.worker_id, reason=msg.reason)
                    break
        finally:
            heartbeat.cancel()
            for t in list(self._tasks):
                t.cancel()
            self.close()

    async def _rejoin(self) -> bool:
        """The learner world that welcomed this worker was restarted: its prompts and weight group are
        gone. Cancel the work for it (vLLM aborts the requests), leave the group and say Hello to the new
        controller with the engine kept, which syncs its weights as for any joining worker. False (exit to
        be restarted instead) while a weight load is under way: the engine's state is then unknown."""
        if self._updating.locked():
            log.warning("told to rejoin during a weight load; restarting", worker=self.cfg.worker_id)
            return False
        work = [t for t in self._tasks if t is not self._joining]
        for t in work:
            t.cancel()
        await asyncio.gather(*work, return_exceptions=True)
        if self._joining is not None:
            self._joining.cancel()
            self._joining = None
        try:
            await self.engine.close_weight_group()
        except Exception as exc:
            log.error(
                "could not leave the weight group; restarting", worker=self.cfg.worker_id, error=repr(exc)
            )
            return False
        self._gate.set()
        log.info(
            "rejoining a restarted learner; engine kept", worker=self.cfg.worker_id, version=self.version
        )
        await self.control.send(
            Hello(self.cfg.worker_id, self.version, os.getpid(), self.cfg.engine.tensor_parallel_size)
        )
        return True

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("rollout task failed", worker=self.cfg.worker_id, error=repr(task.exception()))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            now = time.perf_counter()
            busy = self.busy_seconds + (now - self._busy_since if self._busy_since is not None else 0.0)
            await self.control.send(
                WorkerStats(
                    self.cfg.worker_id,
                    busy,
                    now - self._started,
                    self.generated_tokens,
                    self._in_flight,
                    self.version,
                )
            )

    async def _rollout(self, prompt: Prompt, sampling: Sampling | None = None, eval_round: int = 0) -> None:
        """Sample and score one prompt's group and send it; a prompt that cannot be finished is reported
        (``RolloutFailed``) so that the controller hands it to someone else instead of waiting forever. A
        dead engine ends the worker (the launcher restarts it) instead of failing every later prompt."""
        try:
            group = await self._sample_group(prompt, sampling, eval_round)
        except Exception as exc:
            log.error("rollout failed", worker=self.cfg.worker_id, uid=prompt.uid, error=repr(exc)[:300])
            await self.control.send(
                RolloutFailed(self.cfg.worker_id, prompt.uid, prompt.ticket, eval_round, repr(exc)[:200])
            )
            if self.engine.dead and self._run is not None and not self._run.done():
                log.error("the vLLM engine is dead; exiting to be restarted", worker=self.cfg.worker_id)
                self.exit_code = exits.ENGINE_DEAD
                self._run.cancel()
            return
        await self.sender.send(group)

    async def _sample_group(
        self, prompt: Prompt, sampling: Sampling | None, eval_round: int
    ) -> TrajectoryGroup:
        r = self.cfg.rollout
        sp = sampling or Sampling(r.n_samples, r.temperature, r.top_p, r.max_tokens)
        while not self._gate.is_set():
            await self._gate.wait()
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        self._idle.clear()
        version = self.version
        t0 = time.perf_counter()
        try:
            ids = unpack_i32(prompt.token_ids).tolist()
            samples = await self.engine.sample(
                ids, sp.n, sp.temperature, sp.top_p, sp.max_tokens, version=version
            )
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
                if self._busy_since is not None:
                    self.busy_seconds += time.perf_counter() - self._busy_since
                    self._busy_since = None
        gen_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        texts = [str(self.tokenizer.decode(s.token_ids, skip_special_tokens=True)) for s in samples]
        context = verifier_context(self.tokenizer, prompt)
        verdicts = await asyncio.to_thread(
            self.pool.score, [(prompt.task, t, prompt.answer, context) for t in texts]
        )
        responses = []
        for s, v in zip(samples, verdicts, strict=True):
            self.generated_tokens += len(s.token_ids)
            responses.append(
                Response(
                    token_ids=pack_i32(s.token_ids),
                    logprobs=pack_f32(s.logprobs),
                    versions=pack_i32(s.versions),
                    finish_reason=s.finish_reason if s.finish_reason in ("stop", "length") else "abort",  # type: ignore[arg-type]
                    reward=reward_of(v, r.correct_reward, r.wrong_reward),
                    correct=v.correct,
                    verdict=v.detail[:1024],  # a user verifier's detail is bounded on the wire
                )
            )
        return TrajectoryGroup(
            prompt, responses, self.cfg.worker_id, time.time(), gen_s, time.perf_counter() - t1, eval_round
        )

    async def _update(self, msg: WeightUpdate) -> None:
        async with self._updating:
            ack = await self._load(msg)
        await self.control.send(ack)

    async def _load(self, msg: WeightUpdate) -> WeightAck:
        mode = self.cfg.rollout.weight_update
        if not self.engine.keeps_requests_across_updates:
            mode = "drain"
        if mode == "drain":
            self._gate.clear()
            await self._idle.wait()
        try:
            if self._joining is not None:
                await self._joining  # raises if the join failed: the ack says so
            seconds = await self.engine.load_weights(msg.buckets, msg.version, mode)
            self.version = msg.version
            ack = WeightAck(self.cfg.worker_id, msg.version, seconds)
        except Exception as exc:  # the learner decides what to do with a failed load
            log.error("weight load failed", worker=self.cfg.worker_id, version=msg.version, error=repr(exc))
            ack = WeightAck(self.cfg.worker_id, msg.version, 0.0, ok=False, error=repr(exc)[:200])
        finally:
            self._gate.set()
        return ack

    def close(self) -> None:
        pool = threading.Thread(target=self.pool.close)  # its processes exit while vLLM's do
        pool.start()
        self.sender.close()
        self.control.close()
        self.engine.shutdown()
        pool.join()
        self.ctx.term()


def verifier_context(tokenizer: Any, prompt: Prompt) -> dict[str, Any]:
    """What a verifier may take as keyword arguments: the prompt's text and the row's extra fields."""
    context: dict[str, Any] = {
        "prompt": str(tokenizer.decode(unpack_i32(prompt.token_ids), skip_special_tokens=True))
    }
    if prompt.extras:
        try:
            extras = json.loads(prompt.extras)
        except ValueError:
            extras = None
        if isinstance(extras, dict):
            context |= {k: v for k, v in extras.items() if k != "prompt"}
    return context


def worker_main(cfg: WorkerConfig) -> None:
    """Process entry point (spawned by the launcher or a test)."""
    import uvloop

    from async_vapo.logging import configure_logging

    configure_logging(process=cfg.worker_id)

    async def main() -> int:
        worker = RolloutWorker(cfg)
        try:
            await worker.engine.check_adapter_targets(cfg.engine.model)
        except EngineConfigError as exc:
            log.error("this engine cannot serve the run's config", worker=cfg.worker_id, error=str(exc))
            worker.close()
            return exits.CONFIG
        run = worker._run = asyncio.ensure_future(worker.run())
        # SIGTERM (the launcher stopping the run): leave the loop as on a shutdown message, closing vLLM
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, run.cancel)
        try:
            await run
        except asyncio.CancelledError:
            if worker.exit_code == exits.FINISHED:
                log.info("stopped by SIGTERM", worker=cfg.worker_id)
        return worker.exit_code

    code = uvloop.run(main())
    # vLLM is closed and its processes are gone (RolloutWorker.close); the interpreter's teardown of
    # vLLM's and torch's modules would take another ~3 s of every worker exit (every run's end, every
    # drop): leave now, the logs flushed
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
