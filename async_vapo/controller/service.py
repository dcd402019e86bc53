"""The controller thread and its main-thread API.

It runs an asyncio (uvloop) loop in a background thread of learner rank 0, so the training loop in the
main thread never blocks it. The loop owns the sockets, the worker registry, the weight publisher and the
evaluation rounds; the buffer and the ledger are shared with the main thread under ``lock``. The main
thread calls only the methods below ``main-thread API``; each either takes the lock or hands work to the
loop (``call_soon_threadsafe`` / ``run_coroutine_threadsafe``).

Three coroutines serve the run: ``_recv_data`` (groups into the buffer or an evaluation round),
``_recv_control`` (hellos, heartbeats, acks) and ``_dispatch`` (every ``dispatch_interval_s``: drop silent
workers, hand out as many prompts as the staleness bound allows, see ``controller.dispatch``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog
import uvloop
import zmq.asyncio

from async_vapo.buffer import GroupBuffer, PromptLedger, Requeue, StalenessManager
from async_vapo.cluster.rendezvous import RunStore, load_store_key
from async_vapo.config import TrainConfig
from async_vapo.controller.admission import (
    GroupRejection,
    GroupRules,
    check_group,
    check_hello,
    prompt_timeout_s,
)
from async_vapo.controller.counters import (
    Count,
    group_outcome,
    group_rejected,
    hello_rejected,
    worker_dropped,
)
from async_vapo.controller.counters import verdict as verdict_count
from async_vapo.controller.dispatch import eligible, share_out
from async_vapo.controller.evaluation import EvalRounds
from async_vapo.controller.metrics import ControllerMetrics
from async_vapo.controller.registry import RolloutTotals, WorkerRegistry
from async_vapo.controller.weights import GroupSettings, StreamTarget, WeightPublisher
from async_vapo.protocol import (
    Assign,
    Control,
    Hello,
    Prompt,
    RolloutFailed,
    Sampling,
    TrajectoryGroup,
    WeightAck,
    WorkerStats,
)
from async_vapo.protocol.keys import server_security
from async_vapo.protocol.messages import PublishPlan, verdict_kind
from async_vapo.protocol.transport import ControlServer, GroupReceiver
from async_vapo.weight_sync.broadcast import Snapshot
from async_vapo.weight_sync.buckets import BucketMeta
from async_vapo.weight_sync.fanout import Outcome

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Wiring:
    """Where the controller listens and whom it tells: the run's addresses, not its recipe."""

    data_endpoint: str
    control_endpoint: str
    groups: GroupSettings = field(default_factory=GroupSettings)
    insecure: bool = False
    curve_dir: str = ""  # CURVE keys for sockets beyond loopback (async_vapo.protocol.keys)
    store_address: str = ""  # the run's rendezvous store: drop notices for the launchers, "done"
    store_key_dir: str = ""  # where the run store's signing key is (multi-node runs)
    fanout_ranks: int = 1  # streamed publish: engines are spread over this many learner ranks
    ranks_per_node: int = 0  # learner ranks per node (owners are spread over nodes first); 0 = one node
    dispatch_interval_s: float = 0.01
    max_outstanding_per_worker: int = 256


class _Version:
    """The learner's policy version (``StalenessManager``'s version source), set by the main thread."""

    def __init__(self, v: int) -> None:
        self.v = v

    def current_version(self) -> int:
        return self.v


# a group refused for these came from someone the prompt was not sent to: the prompt stays with its worker
_NOT_THE_ASSIGNEE = (GroupRejection.WRONG_WORKER, GroupRejection.PROMPT_MISMATCH)


class Controller:
    def __init__(
        self,
        train: TrainConfig,
        wiring: Wiring,
        ledger: PromptLedger,
        initial_version: int = 0,
        *,
        rules: GroupRules,
        max_attempts: int = 3,
        hello_interval_s: float = 1.0,
        snapshot_at_start: bool = False,
    ):
        self.train, self.wiring, self.rules = train, wiring, rules
        self.max_attempts = max_attempts  # a prompt that fails this many times is counted failed, not retried
        self.hello_interval_s = hello_interval_s  # Hellos from one identity closer than this are refused
        self._last_hello: dict[str, float] = {}
        self._told_to_rejoin: dict[str, float] = {}
        self.prompt_timeout_s = prompt_timeout_s(train.prompt_timeout_s, rules.max_tokens)
        self._next_expiry = 0.0
        self.version = _Version(initial_version)
        self.ledger = ledger
        self.staleness = StalenessManager(train.groups_per_step, train.max_staleness, self.version)
        # dynamic sampling starts with the policy phase (``start_filtering``): Value-Pretraining trains the
        # critic, which learns from every group (an all-wrong prompt's value is what it must learn)
        # admission control never lets more than (max_staleness + 1) x groups_per_step groups be pending
        self.buffer = GroupBuffer(
            ledger,
            self.staleness,
            filter_uniform_rewards=False,
            max_groups=(train.max_staleness + 1) * train.groups_per_step,
            filter_patience=train.filter_patience,
        )
        self.lock = threading.Lock()  # buffer, ledger, staleness: shared with the main thread
        self.ready = threading.Condition(self.lock)
        self.counters: Counter[str] = Counter()
        self.groups_by_worker: Counter[str] = Counter()
        self.registry = WorkerRegistry(wiring.fanout_ranks, wiring.ranks_per_node)
        self.evals = EvalRounds()
        self.weights = WeightPublisher(
            train,
            wiring.groups,
            self.registry,
            self.counters,
            self._drop_worker,
            self._spawn,
            initial_version,
            snapshot_at_start,
        )
        self.failure: BaseException | None = None
        self._background: set[asyncio.Future] = set()
        self._stop = threading.Event()
        self._started = threading.Event()
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="controller", daemon=True)
        key = load_store_key(wiring.store_key_dir) if wiring.store_key_dir else None
        self._store = RunStore.connect(wiring.store_address, key) if wiring.store_address else None
        if self._store is not None and key is not None:
            self._store.endpoints()  # signed values: binds its drop notices to this launch's nonce

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("controller loop did not start")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.mark_done()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        ctx = zmq.asyncio.Context()
        w = self.wiring
        security = server_security(w.curve_dir) if w.curve_dir else None
        self.data = GroupReceiver(
            ctx,
            w.data_endpoint,
            max_frame_bytes=self.rules.max_frame_bytes,
            security=security,
            insecure=w.insecure,
        )
        self.control = self.weights.control = ControlServer(
            ctx, w.control_endpoint, security=security, insecure=w.insecure
        )
        self._started.set()
        tasks = [asyncio.create_task(c) for c in (self._recv_data(), self._recv_control(), self._dispatch())]
        for t in tasks:
            t.add_done_callback(self._on_loop_task_done)
        while not self._stop.is_set():
            await asyncio.sleep(0.05)
        for wid in self.registry.ids():
            await self.control.send(wid, Control("shutdown", "learner", time.time(), "finished"))
        await asyncio.sleep(0.2)
        for t in tasks:
            t.cancel()
        self.data.close()
        self.control.close()
        ctx.term()

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

    def _spawn(self, coro: Any) -> None:
        """Run ``coro`` on the loop as a background task (kept referenced until it ends)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- main-thread API ----------------------------------------------------------------------------
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

    def start_filtering(self) -> None:
        """The policy phase begins: from now on uniform-reward groups are dropped if the config says so
        (``train.filter_uniform_rewards``; a policy gradient gets no signal from them)."""
        with self.lock:
            self.buffer.filter_uniform_rewards = self.train.filter_uniform_rewards

    def set_version(self, version: int) -> None:
        """The learner's policy version: staleness is judged against it, not against the engines."""
        with self.lock:
            self.version.v = version

    def publish(self, snap: Snapshot) -> None:
        """Snapshot mode: queue new weights for every worker."""
        self._loop.call_soon_threadsafe(self.weights.publish, snap)

    def begin_stream(self, version: int, buckets: list[BucketMeta]) -> tuple[list[StreamTarget], PublishPlan]:
        """Stream mode: the workers taking ``version`` now and the plan every learner rank follows."""
        fut = asyncio.run_coroutine_threadsafe(self.weights.begin_stream(version, buckets), self._loop)
        return fut.result(self.train.weight_sync_timeout_s + 30)

    def end_stream(self, version: int, targets: list[StreamTarget], outcomes: list[Outcome]) -> None:
        """Stream mode: how the sends went (every rank's outcome); acks are awaited in the background."""
        self.weights.record_outcomes(targets, outcomes)
        self._loop.call_soon_threadsafe(self._spawn, self.weights.end_stream(version, targets))

    def engines_behind(self) -> bool:
        return self.weights.engines_behind()

    def start_evaluation(
        self, prompts: list[Prompt], sampling: Sampling, timeout_s: float
    ) -> concurrent.futures.Future[list[TrajectoryGroup]]:
        """An evaluation round on the loop; its future gives the groups back within ``timeout_s`` (fewer
        when the round ends partial). The caller polls it, so learner ranks never wait in a collective."""
        return asyncio.run_coroutine_threadsafe(self._evaluate(prompts, sampling, timeout_s), self._loop)

    def evaluate(self, prompts: list[Prompt], sampling: Sampling, timeout_s: float) -> list[TrajectoryGroup]:
        return self.start_evaluation(prompts, sampling, timeout_s).result(timeout_s + 30)

    def metrics(self) -> ControllerMetrics:
        with self.lock:
            b = self.buffer.metrics
            return ControllerMetrics(
                queue_depth=len(self.buffer.queue),
                admitted=b.admitted,
                rejected_stale=b.stale,
                filtered=b.filtered,
                duplicate=b.duplicate,
                staleness_hist={str(k): v for k, v in sorted(b.staleness_hist.items())},
                capacity=self.staleness.capacity(),
                running=self.staleness.running,
                ledger=dict(self.ledger.counts),
                rejected_frames=dict(self.data.rejected)
                | {f"control_{k}": v for k, v in self.control.rejected.items()},
                worker_versions=self.registry.versions(),
                worker_owners=self.registry.owners(),
                counters=dict(self.counters)
                | ({"eval_group_unexpected": self.evals.late} if self.evals.late else {}),
                groups_by_worker=dict(self.groups_by_worker),
                syncs=self.weights.totals,
            )

    def rollout_totals(self) -> RolloutTotals:
        return self.registry.rollout_totals()

    def generation_rate(self) -> float | None:
        """Tokens per second the live engines generate together while busy (None: nothing measured)."""
        t = self.registry.rollout_totals()
        n = len(self.registry)
        return t.tokens / t.busy_s * n if t.busy_s > 0 and t.tokens > 0 and n else None

    # ---- loops --------------------------------------------------------------------------------------
    async def _recv_data(self) -> None:
        while True:
            msg = await self.data.recv()
            if not isinstance(msg, TrajectoryGroup):
                self.counters[Count.UNEXPECTED_ON_DATA] += 1
            elif msg.eval_round:  # a late one (its round timed out) or a stranger is counted there
                self._collect_eval(msg)
            else:
                self._admit(msg)

    def _admit(self, group: TrajectoryGroup) -> None:
        with self.ready:
            issued = self.ledger.issued(group.prompt.uid)
            why = None
            if issued is not None:  # (a prompt not outstanding is the buffer's duplicate)
                why = check_group(
                    group,
                    sent_to=issued.worker_id,
                    sent=issued.prompt,
                    n_samples=self.rules.n_samples,
                    max_tokens=self.rules.max_tokens,
                    oldest_version=issued.version,
                    newest_version=self.version.v,
                    rules=self.rules,
                )
            if why is not None:
                self._reject(group, why)
                if why not in _NOT_THE_ASSIGNEE:  # the assignee's own bad output: a failed attempt
                    self._failed_attempt(group.prompt.uid, Requeue(f"bad_group_{why.value}"))
                return
            if (w := self.registry.get(group.worker_id)) is not None and issued is not None:
                w.last_group = time.monotonic()
            verdict = self.buffer.put(group)
            self.counters[group_outcome(verdict)] += 1
            if verdict != "duplicate" and self.registry.get(group.worker_id) is not None:
                self.groups_by_worker[group.worker_id] += 1  # delivered: admitted, filtered or stale
            self.ready.notify_all()
        if verdict != "duplicate":  # verifier outcomes of groups for prompts we issued
            for r in group.responses:  # (a fixed set of names: a peer cannot grow the counters)
                self.counters[verdict_count(verdict_kind(r.verdict))] += 1

    def _reject(self, group: TrajectoryGroup, why: GroupRejection) -> None:
        key = group_rejected(why)
        self.counters[key] += 1
        n = self.counters[key]
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, ... of each reason: visible, never a flood
            log.warning("group rejected", reason=why.value, uid=group.prompt.uid[:80], count=n)

    def _failed_attempt(self, uid: str, reason: Requeue) -> None:
        """An issued prompt's attempt failed (caller holds the lock): requeued, or counted failed once it
        has had ``max_attempts``; either way its admission credit comes back."""
        if self.ledger.retry(uid, reason, self.max_attempts):
            self.staleness.on_dropped()
            self.ready.notify_all()

    def _collect_eval(self, group: TrajectoryGroup) -> None:
        entry = self.evals.issued(group.eval_round, group.prompt.uid)
        if entry is not None:
            sent_to, sent, sampling = entry
            why = check_group(
                group,
                sent_to=sent_to,
                sent=sent,
                n_samples=sampling.n,
                max_tokens=sampling.max_tokens,
                oldest_version=0,
                newest_version=self.version.v,
                rules=self.rules,
            )
            if why is not None:
                self._reject(group, why)
                if why not in _NOT_THE_ASSIGNEE:
                    self.evals.give_up(group.eval_round, group.prompt.uid)
                return
        self.evals.collect(group)

    async def _recv_control(self) -> None:
        while True:
            wid, msg = await self.control.recv()
            if isinstance(msg, Hello):
                if (why := self._refuse_hello(wid, msg)) is not None:
                    self.counters[hello_rejected(why)] += 1
                    log.warning("hello refused", identity=wid[:64], reason=why)
                    continue
                # in the background: the handshake waits for acks that this very loop must receive
                self._spawn(self._on_hello(msg))
                continue
            w = self.registry.get(wid)
            if w is None:
                self.counters[Count.MESSAGE_FROM_UNKNOWN_WORKER] += 1
                self._tell_to_rejoin(wid)
                continue
            if getattr(msg, "worker_id", wid) != wid:  # a worker speaks only for itself
                self.counters[Count.CONTROL_IDENTITY_MISMATCH] += 1
                continue
            w.last_seen = time.monotonic()
            if isinstance(msg, WorkerStats):
                w.stats = msg
            elif isinstance(msg, WeightAck):
                self.weights.on_ack(msg)
            elif isinstance(msg, RolloutFailed):
                self._on_failed(wid, msg)

    def _tell_to_rejoin(self, wid: str) -> None:
        """A peer this controller never welcomed speaks as a worker: a worker of a learner world that was
        restarted (its controller died). It is told to rejoin (at most every 10 s per identity): it drops
        the old world's prompts and weight group and says Hello, keeping its engine; the handshake brings
        it this controller's weights (a worker that cannot rejoin exits and is restarted)."""
        now = time.monotonic()
        if wid in self._last_hello or now - self._told_to_rejoin.get(wid, -math.inf) < 10.0:
            return
        if len(self._told_to_rejoin) > 4096:  # a flood of identities: forget the oldest
            self._told_to_rejoin.clear()
        self._told_to_rejoin[wid] = now
        self._spawn(self.control.send(wid, Control("rejoin", "learner", time.time())))

    def _refuse_hello(self, wid: str, hello: Hello) -> str | None:
        if (why := check_hello(hello, wid, self.rules)) is not None:
            return why
        now = time.monotonic()
        if now - self._last_hello.get(wid, -math.inf) < self.hello_interval_s:
            return "too_frequent"
        self._last_hello[wid] = now
        return None

    def _on_failed(self, wid: str, msg: RolloutFailed) -> None:
        """A worker could not finish a prompt it was sent: retry it elsewhere (or count it failed)."""
        log.warning("rollout failed", worker=wid, uid=msg.uid[:80], error=msg.error[:200])
        if msg.eval_round:
            entry = self.evals.issued(msg.eval_round, msg.uid)
            if entry is not None and entry[0] == wid and entry[1].ticket == msg.ticket:
                self.counters[Count.EVAL_PROMPT_FAILED] += 1
                self.evals.give_up(msg.eval_round, msg.uid)
            return
        with self.ready:
            issued = self.ledger.issued(msg.uid)
            if issued is None or issued.worker_id != wid or issued.prompt.ticket != msg.ticket:
                self.counters[Count.ROLLOUT_FAILED_UNKNOWN] += 1
                return
            self.counters[Count.ROLLOUT_FAILED] += 1
            self._failed_attempt(msg.uid, Requeue.ROLLOUT_FAILED)

    async def _on_hello(self, hello: Hello) -> None:
        if not self.weights.can_serve(hello, self.version.v):
            self.counters[Count.HELLO_RESTARTED_WEIGHTS_UNAVAILABLE] += 1
            self._spawn(
                self.control.send(hello.worker_id, Control("shutdown", "learner", time.time(), "dropped"))
            )
            return
        w, old = self.registry.add(hello)
        if old is not None:  # a reconnect: its prompts go to others and their credits come back
            with self.ready:
                n = self.ledger.requeue_worker(hello.worker_id, Requeue.WORKER_RESTARTED)
                self.staleness.on_dropped(n)
            log.warning("worker reconnected; its prompts were requeued", worker=hello.worker_id, requeued=n)
        if await self.weights.welcome(w, hello, self.version.v):
            log.info("worker ready", worker=w.worker_id, pid=w.pid, version=w.version, owner=w.owner, tp=w.tp)
        elif self.registry.is_current(w):
            self.registry.remove(w.worker_id)

    def _drop_worker(self, wid: str, reason: str) -> None:
        """Forget a worker and requeue its prompts. If it is alive it is told to exit, so that the
        supervisor restarts it and it comes back through the Hello handshake with current weights."""
        w = self.registry.remove(wid)
        if w is None:
            return
        log.warning("worker dropped", worker=wid, reason=reason)
        self._spawn(self.control.send(wid, Control("shutdown", "learner", time.time(), "dropped")))
        with self.ready:
            n = self.ledger.requeue_worker(wid, Requeue(reason))
            self.staleness.on_dropped(n)
        self.counters[worker_dropped(reason)] += 1
        if self._store is not None:  # a wedged worker cannot be trusted to exit: its launcher kills it
            try:
                self._store.notify_drop(wid, w.pid)
            except Exception as exc:
                log.error("could not tell the launcher about a dropped worker", error=repr(exc)[:200])

    async def _dispatch(self) -> None:
        while True:
            await asyncio.sleep(self.wiring.dispatch_interval_s)
            now = time.monotonic()
            for w in self.registry.silent(now, self.train.worker_timeout_s):
                log.error("worker missed heartbeats; dropping it", worker=w.worker_id)
                self._drop_worker(w.worker_id, "heartbeat")
            if now >= self._next_expiry:
                self._next_expiry = now + 1.0
                self._expire_prompts(now)
            live = eligible(self.registry, self.version.v, self.weights.newest_sent, self.train.max_staleness)
            if not live:
                continue
            with self.lock:
                outstanding = Counter(i.worker_id for i in self.ledger.outstanding.values())
                plan = share_out(
                    self.staleness.capacity(),
                    [w.worker_id for w in live],
                    outstanding,
                    self.wiring.max_outstanding_per_worker,
                )
                versions = {w.worker_id: w.version for w in live}
                now = time.monotonic()
                assigned = [(wid, self.ledger.take(n, wid, versions[wid], now)) for wid, n in plan]
                self.staleness.on_started(sum(n for _, n in plan))
            for wid, prompts in assigned:
                if not await self.control.send(wid, Assign(prompts)):
                    self._drop_worker(wid, "unreachable")

    def _expire_prompts(self, now: float) -> None:
        """Prompts out longer than ``prompt_timeout_s`` are retried elsewhere (failed attempts); a worker
        that sent no group at all since such a prompt went out is stalled (a wedged engine whose
        heartbeat still runs) and is dropped, so that its launcher restarts it."""
        with self.ready:
            overdue = self.ledger.overdue(now - self.prompt_timeout_s)
            for issued in overdue:
                self.counters[Count.PROMPT_DEADLINE_EXPIRED] += 1
                self._failed_attempt(issued.prompt.uid, Requeue.DEADLINE)
        stalled = {
            i.worker_id
            for i in overdue
            if (w := self.registry.get(i.worker_id)) is not None and w.last_group < i.at and not w.updating
        }
        for wid in sorted(stalled):
            log.error("worker made no progress on its prompts; dropping it", worker=wid)
            self._drop_worker(wid, "stalled")
        if overdue:
            log.warning(
                "prompts past their deadline were retried", n=len(overdue), timeout_s=self.prompt_timeout_s
            )

    async def _evaluate(
        self, prompts: list[Prompt], sampling: Sampling, timeout_s: float
    ) -> list[TrajectoryGroup]:
        """One evaluation round: the groups that came back within ``timeout_s``. A worker lost during the
        round has its prompts sent to another; a round that runs out of time (or has no worker) ends
        partial, logged and counted, never raising into the training loop."""
        deadline = time.monotonic() + timeout_s
        while not (live := self.registry.ready()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # e.g. the first evaluation, before any engine is up
        done = self._loop.create_future()
        number = self.evals.open(sampling, done)
        try:
            if live and prompts:
                await self._eval_send(number, prompts, live, sampling)
                while not done.done() and (remaining := deadline - time.monotonic()) > 0:
                    await asyncio.wait({done}, timeout=min(1.0, remaining))
                    orphans = self.evals.orphans(number, set(self.registry.ids()))
                    if orphans and (live := self.registry.ready()):
                        self.counters[Count.EVAL_PROMPTS_REASSIGNED] += len(orphans)
                        await self._eval_send(number, orphans, live, sampling)
            groups = self.evals.groups(number)
            if missing := self.evals.missing(number) if live else len(prompts):
                self.counters[Count.EVAL_ROUNDS_PARTIAL] += 1
                log.warning(
                    "evaluation round ended partial",
                    got=len(groups),
                    missing=missing,
                    timeout_s=round(timeout_s),
                    workers=len(live),
                )
            return groups
        finally:
            self.evals.close(number)

    async def _eval_send(
        self, number: int, prompts: list[Prompt], live: list[Any], sampling: Sampling
    ) -> None:
        """Spread ``prompts`` over ``live`` workers, each prompt with a fresh ticket."""
        for i, w in enumerate(live):
            if chunk := prompts[i :: len(live)]:
                sent = self.evals.assign(number, chunk, w.worker_id)
                if not await self.control.send(w.worker_id, Assign(sent, sampling, number)):
                    self._drop_worker(w.worker_id, "unreachable")
