"""Getting new weights to the engines, seen from the controller's event loop.

Two ways, chosen by ``train.publish`` (see ``async_vapo.weight_sync``):

- **snapshot**: the learner hands over a ``Snapshot`` (``publish``); every idle engine linked to the
  controller gets the newest one in the background (``WeightUpdate``, broadcast over its group, ack).
- **stream**: the learner ranks send buckets themselves inside the step. ``begin_stream`` picks the
  engines that can take the version now (and has the owners of fan-out engines join a fresh group),
  ``end_stream`` waits for their acks in the background.

An engine that fails to join, load or ack within ``train.weight_sync_timeout_s`` is dropped through the
``drop`` callback (its launcher restarts it and it comes back through the handshake).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from async_vapo.cluster.ports import free_port
from async_vapo.config import TrainConfig
from async_vapo.controller.counters import Count
from async_vapo.controller.metrics import SyncTotals
from async_vapo.controller.registry import WorkerRegistry, WorkerState
from async_vapo.protocol import Hello, JoinGroup, WeightAck, WeightUpdate
from async_vapo.protocol.messages import PublishPlan, PublishTarget
from async_vapo.protocol.transport import ControlServer
from async_vapo.weight_sync.broadcast import EngineLink, Snapshot
from async_vapo.weight_sync.buckets import BucketMeta
from async_vapo.weight_sync.fanout import Outcome
from async_vapo.weight_sync.group import GroupSpec, serve_store

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GroupSettings:
    """Where and how weight groups meet."""

    host: str = "127.0.0.1"  # where engines reach the stores this machine serves
    backend: str = "gloo"
    store_dir: str = ""  # one machine: a FileStore per group in this directory (no TCP listener)


@dataclass
class StreamTarget:
    """One worker taking a streamed update: its ack future, its owner rank and how the sends went."""

    worker: WorkerState
    ack: asyncio.Future
    join: tuple[str, int, int, str, float, str] | None = None  # a group its owner joins (GroupSpec fields)
    error: BaseException | None = None
    seconds: float = 0.0
    nbytes: int = 0


class WeightPublisher:
    def __init__(
        self,
        train: TrainConfig,
        groups: GroupSettings,
        registry: WorkerRegistry,
        counters: Counter[str],
        drop: Callable[[str, str], None],
        spawn: Callable[..., None],
        initial_version: int = 0,
        snapshot_at_start: bool = False,
    ) -> None:
        self.timeout_s = train.weight_sync_timeout_s
        self.streamed = train.streams_publish
        self.groups = groups
        self.registry = registry
        self.counters = counters
        self._drop = drop
        self._spawn = spawn
        self.control: ControlServer | None = None  # set once the loop has bound its sockets
        self.snapshot: Snapshot | None = None  # the newest snapshot (snapshot mode)
        # a resumed or restarted learner publishes its weights as it starts (snapshot mode): engines that
        # hold other weights (kept across a learner restart) are synced to them
        self.snapshot_at_start = snapshot_at_start
        self.streamed_version = initial_version  # weights the engines should have (stream mode)
        self.totals = SyncTotals()
        self._acks: dict[tuple[str, int], asyncio.Future] = {}
        self._groups_made = 0
        self._snapshot_made = asyncio.Event()

    @property
    def newest_sent(self) -> int | None:
        return self.snapshot.version if self.snapshot is not None else None

    def on_ack(self, ack: WeightAck) -> None:
        fut = self._acks.pop((ack.worker_id, ack.version), None)
        if fut is not None and not fut.done():
            fut.set_result(ack)

    def _expect_ack(self, worker_id: str, version: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._acks[(worker_id, version)] = fut
        return fut

    async def _send(self, worker_id: str, msg: JoinGroup | WeightUpdate) -> None:
        assert self.control is not None
        await self.control.send(worker_id, msg)

    def group_spec(self, worker_id: str, world: int) -> GroupSpec:
        """A fresh weight group: a file store in the run directory on one machine, else a TCP store."""
        store_file = ""
        if self.groups.store_dir:
            self._groups_made += 1
            store_file = str(Path(self.groups.store_dir) / f"{worker_id}-{self._groups_made}")
        port = 0 if store_file else free_port()
        return GroupSpec(self.groups.host, port, world, self.groups.backend, self.timeout_s, store_file)

    # ---- a worker says Hello --------------------------------------------------------------------------
    def can_serve(self, hello: Hello, learner_version: int) -> bool:
        """Whether this learner can bring ``hello``'s engine to its weights. Not when the engine holds
        other weights than the model's while the learner, at version 0 in snapshot mode, has no snapshot
        to send and makes none before its first step (which needs groups): that worker is restarted from
        the model instead. (A learner world the launcher restarts is resumed, so it publishes as it
        starts, its version-0 weights included: a worker kept across the restart is synced, not restarted.)"""
        return (
            self.streamed
            or learner_version > 0
            or hello.version == 0
            or self.snapshot is not None
            or self.snapshot_at_start
        )

    async def welcome(self, w: WorkerState, hello: Hello, learner_version: int) -> bool:
        """Give a (re)connected worker its group and current weights; False if it could not join."""
        # fresh: the engine loaded what the learner holds (version 0 is always the model's weights)
        fresh = hello.version == learner_version and (self.snapshot is None or hello.version == 0)
        if w.owner != 0:  # its owner joins the group at the next streamed publish
            w.version = hello.version if fresh else -1
            return True
        # the engine's group: this rank + every vLLM worker of the engine (one per tensor-parallel rank)
        spec = self.group_spec(hello.worker_id, 1 + hello.tensor_parallel_size)
        link = EngineLink(spec)
        connecting = asyncio.ensure_future(asyncio.to_thread(link.connect))
        await self._send(hello.worker_id, JoinGroup(*spec.as_tuple()))
        try:
            await asyncio.wait_for(connecting, spec.timeout_s + 5)
        except Exception as exc:
            log.error("worker failed to join its weight group", worker=hello.worker_id, error=repr(exc))
            return False
        if not fresh and self.snapshot is None and not self.streamed:
            # a resumed learner makes its first snapshot as it starts: a worker rejoining that early
            # waits for it (before it is linked, so that publish does not start a second sync)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._snapshot_made.wait(), self.timeout_s)
        w.link = link
        if fresh:
            w.version = hello.version  # fresh start: the engine loaded the same checkpoint as the learner
        else:
            await self.sync(w)
        return True

    # ---- snapshot mode ------------------------------------------------------------------------------
    def publish(self, snap: Snapshot) -> None:
        """Queue ``snap`` for every linked worker (only the newest pending snapshot is sent)."""
        self.snapshot = snap
        self._snapshot_made.set()
        for w in self.registry:
            if not w.updating and w.link is not None:
                # marked now, not when the task first runs: a second publish before that must not start
                # a second sync (two broadcasts interleaved on one group corrupt both)
                w.updating = True
                self._spawn(self.sync(w))

    async def sync(self, w: WorkerState) -> None:
        """Send the newest snapshot to one worker until it holds it; on failure the worker is dropped."""
        w.updating = True
        try:
            while self.snapshot is not None and w.version < self.snapshot.version:
                snap = self.snapshot
                ack = self._expect_ack(w.worker_id, snap.version)
                await self._send(w.worker_id, WeightUpdate(snap.version, snap.buckets))
                assert w.link is not None
                seconds = await asyncio.wait_for(asyncio.to_thread(w.link.send, snap), self.timeout_s)
                self._loaded(w, snap.version, await asyncio.wait_for(ack, self.timeout_s))
                self.totals = self.totals.add(seconds, snap.nbytes)
        except Exception as exc:
            self._failed(w, exc)
        finally:
            w.updating = False

    def _loaded(self, w: WorkerState, version: int, ack: WeightAck) -> None:
        if not ack.ok:
            raise RuntimeError(f"worker could not load version {version}: {ack.error}")
        w.version = version

    def _failed(self, w: WorkerState, exc: BaseException) -> None:
        self.counters[Count.WEIGHT_SYNC_FAILED] += 1
        log.error("weight sync failed; dropping worker", worker=w.worker_id, error=repr(exc)[:200])
        if self.registry.is_current(w):  # not a worker that reconnected meanwhile
            self._drop(w.worker_id, "weight_sync_failed")

    # ---- stream mode --------------------------------------------------------------------------------
    def engines_behind(self) -> bool:
        """A joined, idle worker holds weights older than the last streamed publish (it (re)joined after
        it, or the run resumed): streamed weights are not kept, so the learner must publish again."""
        return any(w.can_stream and w.version < self.streamed_version for w in self.registry)

    async def begin_stream(
        self, version: int, buckets: list[BucketMeta]
    ) -> tuple[list[StreamTarget], PublishPlan]:
        """Announce ``version`` to every worker that can take it now (idle, behind) and return them with
        the plan every learner rank follows (``weight_sync.fanout``). Workers that join meanwhile get the
        next publish."""
        self.streamed_version = max(self.streamed_version, version)
        targets = []
        for w in self.registry:
            if not w.can_stream or w.version >= version:
                continue
            w.updating = True
            ack = self._expect_ack(w.worker_id, version)
            join = None
            if w.owner != 0 and not w.owner_joined:  # its owner and its workers meet in a fresh group
                spec = self.group_spec(w.worker_id, 1 + w.tp)
                w.store = serve_store(spec)
                join = spec.as_tuple()
                await self._send(w.worker_id, JoinGroup(*join))
            await self._send(w.worker_id, WeightUpdate(version, buckets))
            targets.append(StreamTarget(w, ack, join))
        plan = PublishPlan(
            version,
            [PublishTarget(t.worker.worker_id, t.worker.owner, t.join) for t in targets],
            self.registry.ids(),
        )
        return targets, plan

    def record_outcomes(self, targets: list[StreamTarget], outcomes: list[Outcome]) -> None:
        """Every rank's outcome per target (``fanout.gather_status``), before the acks are awaited."""
        for t, o in zip(targets, outcomes, strict=True):
            t.seconds, t.nbytes = o.seconds, o.nbytes
            if not o.ok:
                t.error = RuntimeError(f"stream from learner rank {t.worker.owner} failed: {o.error}")

    async def end_stream(self, version: int, targets: list[StreamTarget]) -> None:
        for t in targets:
            w = t.worker
            try:
                if t.error is not None:
                    raise t.error
                self._loaded(w, version, await asyncio.wait_for(t.ack, self.timeout_s))
                w.owner_joined = True
                self.totals = self.totals.add(t.seconds, t.nbytes)
            except Exception as exc:
                self._acks.pop((w.worker_id, version), None)
                self._failed(w, exc)
            finally:
                w.updating = False
