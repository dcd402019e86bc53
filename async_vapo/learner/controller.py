"""The learner side of the data road, on learner rank 0: sockets, buffer, prompt dispatch, weight sync.

It runs an asyncio (uvloop) loop in a background thread so the training loop in the main thread never
blocks it. The main thread talks to it through a small thread-safe API: ``take_batch``, ``publish``
(new weights), ``evaluate`` and ``metrics``.

Dispatch: every ``dispatch_interval_s`` the controller asks the staleness manager for its capacity and
hands that many prompts to live workers whose weights are current enough (see
``async_vapo.buffer.staleness``). A worker that misses heartbeats for ``worker_timeout_s`` is declared lost:
its outstanding prompts go back to the ledger. A worker that (re)connects is invited into a fresh weight
group and, if its version is behind, receives the current weights before it gets any prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import uvloop
import zmq.asyncio

from async_vapo.buffer import GroupBuffer, PromptLedger, StalenessManager
from async_vapo.cluster.rendezvous import RunStore, load_store_key
from async_vapo.protocol import (
    Assign,
    Control,
    Hello,
    JoinGroup,
    Prompt,
    Sampling,
    TrajectoryGroup,
    WeightAck,
    WeightUpdate,
    WorkerStats,
)
from async_vapo.protocol.keys import server_security
from async_vapo.protocol.messages import PublishPlan, PublishTarget
from async_vapo.protocol.transport import ControlServer, GroupReceiver
from async_vapo.weight_sync.broadcast import EngineLink, Snapshot
from async_vapo.weight_sync.buckets import BucketMeta
from async_vapo.weight_sync.fanout import Outcome
from async_vapo.weight_sync.group import GroupSpec, serve_store

log = structlog.get_logger(__name__)
_VERDICTS = frozenset({"ok", "wrong", "no_answer", "timeout", "error", "bad_output"})


@dataclass
class ControllerConfig:
    data_endpoint: str
    control_endpoint: str
    groups_per_step: int
    max_staleness: int
    filter_uniform_rewards: bool = False
    weight_backend: str = "gloo"
    weight_host: str = "127.0.0.1"
    weight_sync_timeout_s: float = 60.0
    worker_timeout_s: float = 30.0
    max_outstanding_per_worker: int = 256
    dispatch_interval_s: float = 0.01
    insecure: bool = False
    curve_dir: str = ""  # CURVE keys for sockets beyond loopback (async_vapo.protocol.keys)
    store_address: str = ""  # the run's rendezvous store: drop notices for the launchers, "done"
    store_key_dir: str = ""  # where the run store's signing key is (multi-node runs)
    store_dir: str = ""  # one machine: weight groups meet in file stores here (no TCP listener)
    # streamed publish over several learner ranks: engines are spread over these ranks (weight_sync.fanout)
    fanout_ranks: int = 1


@dataclass
class StreamTarget:
    """One worker taking a streamed update: its ack future, its owner rank and how the sends went."""

    worker: WorkerState
    ack: asyncio.Future
    join: tuple[str, int, int, str, float, str] | None = None  # a group its owner joins (GroupSpec fields)
    error: BaseException | None = None
    seconds: float = 0.0
    nbytes: int = 0


@dataclass
class WorkerState:
    worker_id: str
    pid: int
    version: int = -1  # weights known to the controller; -1 = unknown, never dispatched to
    last_seen: float = field(default_factory=time.monotonic)
    link: EngineLink | None = None
    updating: bool = False
    stats: WorkerStats | None = None
    first_stats: WorkerStats | None = None
    owner: int = 0  # the learner rank that feeds it (streamed publish); 0 = the controller's link
    tp: int = 1
    store: Any = None  # the store the controller serves for a group owned by another rank
    owner_joined: bool = False


class _Versions:
    def __init__(self) -> None:
        self.v = 0

    def current_version(self) -> int:
        return self.v


class Controller:
    def __init__(self, cfg: ControllerConfig, ledger: PromptLedger, initial_version: int = 0) -> None:
        self.cfg = cfg
        self.versions = _Versions()
        self.versions.v = initial_version
        self.ledger = ledger
        self.staleness = StalenessManager(cfg.groups_per_step, cfg.max_staleness, self.versions)
        self.buffer = GroupBuffer(ledger, self.staleness, cfg.filter_uniform_rewards)
        self.workers: dict[str, WorkerState] = {}
        self.lock = threading.Lock()
        self.ready = threading.Condition(self.lock)
        self.counters: Counter[str] = Counter()
        self.groups_by_worker: Counter[str] = Counter()
        self._snapshot: Snapshot | None = None
        self._eval_waiters: dict[str, tuple[asyncio.Future, int]] = {}
        self._eval_results: dict[str, list[TrajectoryGroup]] = {}
        self._ack_waiters: dict[tuple[str, int], asyncio.Future] = {}
        self._stop = threading.Event()
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="controller", daemon=True)
        self._started = threading.Event()
        self.failure: BaseException | None = None
        self._background: set[asyncio.Future] = set()
        self.sync_count = 0
        self.sync_seconds = 0.0
        self.sync_bytes = 0
        key = load_store_key(cfg.store_key_dir) if cfg.store_key_dir else None
        self._store = RunStore.connect(cfg.store_address, key) if cfg.store_address else None
        self._groups_made = 0
        self._streamed_version = initial_version  # weights the engines should have (streamed publish)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("controller loop did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self.ctx = zmq.asyncio.Context()
        security = server_security(self.cfg.curve_dir) if self.cfg.curve_dir else None
        self.data = GroupReceiver(
            self.ctx, self.cfg.data_endpoint, security=security, insecure=self.cfg.insecure
        )
        self.control = ControlServer(
            self.ctx, self.cfg.control_endpoint, security=security, insecure=self.cfg.insecure
        )
        self._started.set()
        tasks = [asyncio.create_task(c) for c in (self._recv_data(), self._recv_control(), self._dispatch())]
        for t in tasks:
            t.add_done_callback(self._on_loop_task_done)
        while not self._stop.is_set():
            await asyncio.sleep(0.05)
        for w in list(self.workers):
            await self.control.send(w, Control("shutdown", "learner", time.time(), "finished"))
        await asyncio.sleep(0.2)
        for t in tasks:
            t.cancel()
        self.data.close()
        self.control.close()
        self.ctx.term()

    def _on_loop_task_done(self, task: asyncio.Task) -> None:
        """A serving loop must never end on its own: if one dies, the learner is told at once (its next
        ``take_batch`` raises) instead of waiting forever for data that will never come."""
        if task.cancelled() or self._stop.is_set():
            return
        exc = task.exception()
        self.failure = exc if exc is not None else RuntimeError(f"controller task {task.get_name()} ended")
        log.error("a controller loop died", error=repr(self.failure)[:300])
        with self.ready:
            self.ready.notify_all()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.mark_done()

    # ---- main-thread API -------------------------------------------------------------------------
    def take_batch(self, n_groups: int, timeout_s: float | None = None) -> list[TrajectoryGroup] | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self.ready:
            while True:
                if self.failure is not None:
                    raise RuntimeError("the controller failed") from self.failure
                batch = self.buffer.take_batch(n_groups)
                if batch is not None:
                    return batch
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self.ready.wait(0.5 if remaining is None else min(0.5, remaining))

    def mark_trained(self, batch: list[TrajectoryGroup]) -> None:
        with self.lock:
            self.buffer.mark_trained(batch)

    def set_version(self, version: int) -> None:
        with self.lock:
            self.versions.v = version

    def publish(self, snap: Snapshot) -> None:
        """Queue new weights for every worker (only the newest pending snapshot is sent)."""
        self._loop.call_soon_threadsafe(self._publish, snap)

    def _publish(self, snap: Snapshot) -> None:
        self._snapshot = snap
        for w in self.workers.values():
            if not w.updating and w.link is not None:
                # marked now, not when the task first runs: a second publish before that must not start
                # a second sync (two broadcasts interleaved on one group corrupt both)
                w.updating = True
                self._spawn(self._sync_worker(w))

    # ---- streamed publish (main thread; see async_vapo.weight_sync.publish) ---------------------------
    def begin_stream(self, version: int, buckets: list[BucketMeta]) -> tuple[list[StreamTarget], PublishPlan]:
        """Announce ``version`` to every worker that can take it now (not updating, behind) and return
        them with the plan every learner rank follows (``weight_sync.fanout``); end with ``end_stream``.
        Workers that join meanwhile get the next publish."""
        fut = asyncio.run_coroutine_threadsafe(self._begin_stream(version, buckets), self._loop)
        targets = fut.result(self.cfg.weight_sync_timeout_s + 30)
        plan = PublishPlan(
            version,
            [PublishTarget(t.worker.worker_id, t.worker.owner, t.join) for t in targets],
            list(self.workers),
        )
        return targets, plan

    def engines_behind(self) -> bool:
        """A joined, idle worker holds weights older than the last streamed publish (it (re)joined after
        it, or the run resumed): streamed weights are not kept, so the learner must publish again."""
        return any(
            self._can_stream(w) and w.version < self._streamed_version for w in list(self.workers.values())
        )

    @staticmethod
    def _can_stream(w: WorkerState) -> bool:
        return not w.updating and (w.link is not None or w.owner != 0)

    async def _begin_stream(self, version: int, buckets: list[BucketMeta]) -> list[StreamTarget]:
        self._streamed_version = max(self._streamed_version, version)
        targets = []
        for w in list(self.workers.values()):
            if not self._can_stream(w) or w.version >= version:
                continue
            w.updating = True
            ack = self._loop.create_future()
            self._ack_waiters[(w.worker_id, version)] = ack
            join = None
            if w.owner != 0 and not w.owner_joined:  # its owner and its workers meet in a fresh group
                spec = self._group_spec(w.worker_id, 1 + w.tp)
                w.store = serve_store(spec)
                join = spec.as_tuple()
                await self.control.send(w.worker_id, JoinGroup(*join))
            await self.control.send(w.worker_id, WeightUpdate(version, buckets))
            targets.append(StreamTarget(w, ack, join))
        return targets

    def end_stream(self, version: int, targets: list[StreamTarget], outcomes: list[Outcome]) -> None:
        """Every rank's outcome per target (``fanout.gather_status``); acks are awaited in the background:
        training goes on."""
        for t, o in zip(targets, outcomes, strict=True):
            t.seconds, t.nbytes = o.seconds, o.nbytes
            if not o.ok:
                t.error = RuntimeError(f"stream from learner rank {t.worker.owner} failed: {o.error}")
        self._loop.call_soon_threadsafe(self._spawn, self._end_stream(version, targets))

    async def _end_stream(self, version: int, targets: list[StreamTarget]) -> None:
        for t in targets:
            w = t.worker
            try:
                if t.error is not None:
                    raise t.error
                ack = await asyncio.wait_for(t.ack, self.cfg.weight_sync_timeout_s)
                if not ack.ok:
                    raise RuntimeError(f"worker could not load version {version}: {ack.error}")
                w.version = version
                w.owner_joined = True
                self.sync_count += 1
                self.sync_seconds += t.seconds
                self.sync_bytes += t.nbytes
            except Exception as exc:
                self._ack_waiters.pop((w.worker_id, version), None)
                self.counters["weight_sync_failed"] += 1
                log.error("weight sync failed; dropping worker", worker=w.worker_id, error=repr(exc)[:200])
                if self.workers.get(w.worker_id) is w:  # not a worker that reconnected meanwhile
                    self._drop_worker(w.worker_id, "weight_sync_failed")
            finally:
                w.updating = False

    def _spawn(self, coro: Any) -> None:
        """Run ``coro`` on the loop as a background task (kept referenced until it ends)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def evaluate(
        self, prompts: list[Prompt], sampling: Sampling, timeout_s: float = 600.0
    ) -> list[TrajectoryGroup]:
        fut = asyncio.run_coroutine_threadsafe(self._evaluate(prompts, sampling, timeout_s), self._loop)
        return fut.result(timeout_s + 30)

    def metrics(self) -> dict[str, Any]:
        with self.lock:
            m = self.buffer.metrics_dict()
            m["buffer/capacity"] = self.staleness.capacity()
            m["buffer/running"] = self.staleness.running
            m["ledger"] = dict(self.ledger.counts)
            m["rejected_frames"] = dict(self.data.rejected) | {
                f"control_{k}": v for k, v in self.control.rejected.items()
            }
            m["workers"] = {w.worker_id: w.version for w in self.workers.values()}
            m["worker_owners"] = {w.worker_id: w.owner for w in self.workers.values()}
            m["counters"] = dict(self.counters)
            m["groups_by_worker"] = dict(self.groups_by_worker)
            m["weight_sync_count"] = self.sync_count
            m["weight_sync_seconds_total"] = self.sync_seconds
            m["weight_sync_bytes_total"] = self.sync_bytes
        return m

    def rollout_busy(self) -> tuple[float, float, int]:
        """(busy seconds, alive seconds, generated tokens) summed over live workers since they started."""
        busy = alive = 0.0
        tokens = 0
        for w in list(self.workers.values()):
            if w.stats is not None:
                busy += w.stats.busy_seconds
                alive += w.stats.alive_seconds
                tokens += w.stats.generated_tokens
        return busy, alive, tokens

    # ---- loops -----------------------------------------------------------------------------------
    async def _recv_data(self) -> None:
        while True:
            msg = await self.data.recv()
            if not isinstance(msg, TrajectoryGroup):
                self.counters["unexpected_on_data"] += 1
                continue
            uid = msg.prompt.uid
            if uid in self._eval_waiters:
                self._collect_eval(uid, msg)
                continue
            with self.ready:
                verdict = self.buffer.put(msg)
                self.counters[f"group_{verdict}"] += 1
                if verdict == "admitted" and msg.worker_id in self.workers:
                    self.groups_by_worker[msg.worker_id] += 1
                self.ready.notify_all()
            if verdict != "duplicate":  # verifier outcomes of groups for prompts we issued
                for r in msg.responses:  # (a fixed set of names: a peer cannot grow the counters)
                    kind = r.verdict.split(":", 1)[0]
                    self.counters[f"verdict_{kind if kind in _VERDICTS else 'other'}"] += 1

    async def _recv_control(self) -> None:
        while True:
            wid, msg = await self.control.recv()
            w = self.workers.get(wid)
            if isinstance(msg, Hello):
                # in the background: the handshake waits for acks that this very loop must receive
                self._spawn(self._on_hello(msg))
                continue
            if w is None:
                self.counters["message_from_unknown_worker"] += 1
                continue
            w.last_seen = time.monotonic()
            if isinstance(msg, WorkerStats):
                w.first_stats = w.first_stats or msg
                w.stats = msg
            elif isinstance(msg, WeightAck):
                fut = self._ack_waiters.pop((wid, msg.version), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    async def _on_hello(self, hello: Hello) -> None:
        old = self.workers.get(hello.worker_id)
        if old is not None:
            with self.lock:
                n = self.ledger.requeue_worker(hello.worker_id, "worker_restarted")
            log.warning("worker reconnected; its prompts were requeued", worker=hello.worker_id, requeued=n)
        w = WorkerState(hello.worker_id, hello.pid, owner=self._pick_owner(), tp=hello.tensor_parallel_size)
        self.workers[hello.worker_id] = w
        fresh = hello.version == self.versions.v and self._snapshot is None
        if w.owner != 0:  # its owner joins the group at the next streamed publish
            w.version = hello.version if fresh else -1
            log.info("worker ready", worker=hello.worker_id, pid=hello.pid, version=w.version, owner=w.owner)
            return
        # the engine's group: this rank + every vLLM worker of the engine (one per tensor-parallel rank)
        spec = self._group_spec(hello.worker_id, 1 + hello.tensor_parallel_size)
        link = EngineLink(spec)
        connecting = asyncio.ensure_future(asyncio.to_thread(link.connect))
        await self.control.send(hello.worker_id, JoinGroup(*spec.as_tuple()))
        try:
            await asyncio.wait_for(connecting, spec.timeout_s + 5)
        except Exception as exc:
            log.error("worker failed to join its weight group", worker=hello.worker_id, error=repr(exc))
            self.workers.pop(hello.worker_id, None)
            return
        w.link = link
        if fresh:
            w.version = hello.version  # fresh start: the engine loaded the same checkpoint as the learner
        else:
            await self._sync_worker(w)
        log.info("worker ready", worker=hello.worker_id, pid=hello.pid, version=w.version)

    def _group_spec(self, worker_id: str, world: int) -> GroupSpec:
        """A fresh weight group: a file store in the run directory on one machine, else a TCP store."""
        store_file = ""
        if self.cfg.store_dir:
            self._groups_made += 1
            store_file = str(Path(self.cfg.store_dir) / f"{worker_id}-{self._groups_made}")
        port = 0 if store_file else _free_port()
        return GroupSpec(
            self.cfg.weight_host,
            port,
            world,
            self.cfg.weight_backend,
            self.cfg.weight_sync_timeout_s,
            store_file,
        )

    def _pick_owner(self) -> int:
        """The learner rank with the fewest engines (lowest rank on ties)."""
        load = Counter(w.owner for w in self.workers.values())
        return min(range(self.cfg.fanout_ranks), key=lambda r: (load[r], r))

    async def _sync_worker(self, w: WorkerState) -> None:
        """Send the newest snapshot to one worker; on timeout or failure the worker is dropped."""
        w.updating = True
        try:
            while self._snapshot is not None and w.version < self._snapshot.version:
                snap = self._snapshot
                fut = self._loop.create_future()
                self._ack_waiters[(w.worker_id, snap.version)] = fut
                await self.control.send(w.worker_id, WeightUpdate(snap.version, snap.buckets))
                assert w.link is not None
                seconds = await asyncio.wait_for(
                    asyncio.to_thread(w.link.send, snap), self.cfg.weight_sync_timeout_s
                )
                ack = await asyncio.wait_for(fut, self.cfg.weight_sync_timeout_s)
                if not ack.ok:
                    raise RuntimeError(f"worker could not load version {snap.version}: {ack.error}")
                w.version = snap.version
                self.sync_count += 1
                self.sync_seconds += seconds
                self.sync_bytes += snap.nbytes
        except Exception as exc:
            self.counters["weight_sync_failed"] += 1
            log.error("weight sync failed; dropping worker", worker=w.worker_id, error=repr(exc)[:200])
            self._drop_worker(w.worker_id, "weight_sync_failed")
        finally:
            w.updating = False

    def _drop_worker(self, wid: str, reason: str) -> None:
        """Forget a worker and requeue its prompts. If it is alive it is told to exit, so that the
        supervisor restarts it and it comes back through the Hello handshake with current weights."""
        w = self.workers.pop(wid, None)
        if w is None:
            return
        self._spawn(self.control.send(wid, Control("shutdown", "learner", time.time(), "dropped")))
        with self.ready:
            n = self.ledger.requeue_worker(wid, reason)
            self.staleness.on_dropped(n)
        self.counters[f"worker_dropped_{reason}"] += 1
        if self._store is not None:  # a wedged worker cannot be trusted to exit: its launcher kills it
            try:
                self._store.notify_drop(wid, w.pid)
            except Exception as exc:
                log.error("could not tell the launcher about a dropped worker", error=repr(exc)[:200])

    async def _dispatch(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.dispatch_interval_s)
            now = time.monotonic()
            for w in list(self.workers.values()):
                if now - w.last_seen > self.cfg.worker_timeout_s and not w.updating:
                    log.error("worker missed heartbeats; dropping it", worker=w.worker_id)
                    self._drop_worker(w.worker_id, "heartbeat")
            live = [
                w
                for w in self.workers.values()
                if not w.updating
                and w.version >= 0
                and self.versions.v - w.version <= self.cfg.max_staleness
                and (self._snapshot is None or w.version >= self._snapshot.version - self.cfg.max_staleness)
            ]
            if not live:
                continue
            with self.lock:
                capacity = self.staleness.capacity()
                if capacity <= 0:
                    continue
                outstanding = Counter(wid for wid, _ in self.ledger.outstanding.values())
                plan: list[tuple[WorkerState, list[Prompt]]] = []
                for i, w in enumerate(sorted(live, key=lambda w: outstanding[w.worker_id])):
                    share = capacity // len(live) + (1 if i < capacity % len(live) else 0)
                    share = min(share, self.cfg.max_outstanding_per_worker - outstanding[w.worker_id])
                    if share > 0:
                        plan.append((w, self.ledger.take(share, w.worker_id)))
                        self.staleness.on_started(share)
            for w, prompts in plan:
                if not await self.control.send(w.worker_id, Assign(prompts)):
                    self._drop_worker(w.worker_id, "unreachable")

    async def _evaluate(
        self, prompts: list[Prompt], sampling: Sampling, timeout_s: float
    ) -> list[TrajectoryGroup]:
        deadline = time.monotonic() + timeout_s
        while not (live := [w for w in self.workers.values() if w.version >= 0 and not w.updating]):
            if time.monotonic() > deadline:  # e.g. the first evaluation, before any engine is up
                raise RuntimeError(f"no rollout worker became available for evaluation in {timeout_s:.0f} s")
            await asyncio.sleep(0.2)
        key = f"eval{time.monotonic_ns()}"
        tagged = [Prompt(f"{key}:{p.uid}", p.token_ids, p.answer, p.task) for p in prompts]
        fut = self._loop.create_future()
        for p in tagged:
            self._eval_waiters[p.uid] = (fut, len(tagged))
        self._eval_results[key] = []
        for i, w in enumerate(live):
            chunk = tagged[i :: len(live)]
            if chunk:
                await self.control.send(w.worker_id, Assign(chunk, sampling))
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            for p in tagged:
                self._eval_waiters.pop(p.uid, None)
            self._eval_results.pop(key, None)

    def _collect_eval(self, uid: str, group: TrajectoryGroup) -> None:
        fut, total = self._eval_waiters.pop(uid)
        results = self._eval_results.setdefault(uid.split(":", 1)[0], [])
        results.append(group)
        if len(results) == total and not fut.done():
            fut.set_result(list(results))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
