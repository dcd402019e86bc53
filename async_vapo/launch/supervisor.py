"""This node's processes: start the learner ranks and rollout workers of the node plan, keep the workers
alive, stop everything on the way out.

A rollout worker that dies, or that the controller gave up on (missed heartbeats, a weight sync that never
completed), is killed with everything it spawned and restarted; its prompts are requeued by the
controller and it receives the current weights before it samples again. A learner rank that dies ends the
run with its exit code (continue with ``--resume``). Ctrl-C or SIGTERM asks the learner to checkpoint and
stop, then stops the workers; nothing is left running.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import structlog

from async_vapo.cluster import Endpoints, Layout, NodeInfo, RunStore
from async_vapo.cluster.ports import free_port
from async_vapo.cluster.rendezvous import ensure_store_key, load_store_key
from async_vapo.config import Config
from async_vapo.controller.admission import rollout_worker_id
from async_vapo.launch.plan import Child, RunFiles, Site, plan_node
from async_vapo.rollout import exits

log = structlog.get_logger("async_vapo.launch")


def _own_group() -> None:
    """Each child leads its own process group, so the supervisor can stop it with everything it spawned
    (vLLM engine cores, verifier pools), even after the child itself died."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()


def _stop_group(pid: int | None, sig: int) -> None:
    if pid is None or not hasattr(os, "killpg"):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _group_alive(pid: int | None) -> bool:
    """Whether a process of ``pid``'s group (a child and what it spawned) still exists."""
    if pid is None or not hasattr(os, "killpg"):
        return False
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _learner_entry(env: dict[str, str], largs: Any) -> None:
    _own_group()
    os.environ.update(env)
    from async_vapo.learner.main import learner_main

    learner_main(largs)


# torchrun's and torch.distributed's variables of the launcher itself: a rollout worker inheriting them
# would make vLLM's own workers believe they are ranks of the launcher's world
TORCH_DIST_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
)


def child_environ(parent: dict[str, str], env: dict[str, str], worker: bool) -> dict[str, str]:
    """A child's environment: the launcher's, without its torch.distributed variables for a rollout
    worker (a learner rank gets its own in ``env``) and with vLLM's log level WARNING unless set, then
    ``env``."""
    base = {k: v for k, v in parent.items() if not (worker and k in TORCH_DIST_VARS)}
    if worker:  # vLLM's INFO lines (several per step) drown the run's own; a user's setting wins
        base.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # vLLM 0.32's CPU processes each print torch's deprecation of dist.reduce_op (4 lines) at import
        base.setdefault("PYTHONWARNINGS", "ignore::FutureWarning:vllm.triton_utils.dispatcher")
    return base | env


def _worker_entry(env: dict[str, str], cores: list[int] | tuple[int, ...], wcfg: Any) -> None:
    _own_group()
    merged = child_environ(dict(os.environ), env, worker=True)
    os.environ.clear()
    os.environ.update(merged)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cores))
    from async_vapo.rollout.worker import worker_main

    worker_main(wcfg)


def curve_dir(cfg: Config, lay: Layout, node: NodeInfo, insecure: bool) -> str:
    """CURVE keys when the learner's sockets leave loopback: node 0 creates the learner's pair and one
    per planned worker, the other nodes wait for the learner's and their own workers' keys."""
    from async_vapo.protocol.keys import ensure_keys, wait_for_keys
    from async_vapo.protocol.transport import is_loopback

    if is_loopback(f"tcp://{node.master_addr}:1") or insecure:
        return cfg.curve_dir
    key_dir = cfg.curve_dir or str(Path(cfg.output_dir) / ".curve")
    if node.node_rank == 0:
        return str(ensure_keys(key_dir, map(rollout_worker_id, range(lay.n_engines))))
    return str(wait_for_keys(key_dir, map(rollout_worker_id, lay.nodes[node.node_rank].engines)))


def loopback_env() -> dict[str, str]:
    """One machine: gloo / NCCL (learner world, weight groups, vLLM's own groups) listen on loopback
    only (by default they bind to the address the host name resolves to). A user's setting wins."""
    if not Path("/sys/class/net/lo").exists():
        return {}
    return {k: os.environ.get(k, "lo") for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")} | {
        "VLLM_HOST_IP": os.environ.get("VLLM_HOST_IP", "127.0.0.1")
    }


def open_site(cfg: Config, node: NodeInfo) -> tuple[Site, RunStore]:
    """The run store and the addresses of the run. One machine: every store is a file in
    ``<output_dir>/run`` (no listener); several nodes: node 0's TCPStore with signed values (see
    ``cluster/rendezvous.py`` and the README's security section)."""
    from async_vapo.protocol.transport import is_loopback

    # absolute: the learner world meets at file://<path>, where a relative path would be read as a host
    run_dir = (Path(cfg.output_dir) / "run").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    one_machine = node.nnodes == 1
    files = RunFiles.under(run_dir, uuid.uuid4().hex[:12]) if one_machine else None
    key_dir = "" if one_machine else (cfg.curve_dir or str(Path(cfg.output_dir) / ".curve"))
    key = None
    if key_dir:
        key = ensure_store_key(key_dir) if node.node_rank == 0 else load_store_key(key_dir)
    if files is not None:
        files.groups.mkdir(exist_ok=True)
    address = f"file:{files.store}" if files else f"{node.master_addr}:{node.master_port}"
    store = RunStore(address, is_master=node.node_rank == 0, key=key)
    if node.node_rank == 0:
        ports = [free_port("") for _ in range(3)]
        host = node.master_addr
        store.publish_endpoints(
            Endpoints(f"tcp://{host}:{ports[0]}", f"tcp://{host}:{ports[1]}", ports[2], host)
        )
    local = is_loopback(f"tcp://{node.master_addr}:1")
    site = Site(
        endpoints=store.endpoints(),
        store_address=store.address,
        store_key_dir=key_dir,
        files=files,
        # beyond loopback the learner's sockets bind to the address the other nodes use, never to "*"
        bind_host=node.master_addr if local else socket.gethostbyname(node.master_addr),
        extra_env=loopback_env() if one_machine else {},
        kv_cache_gib=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    )
    return site, store


class RestartBudget:
    """At most ``limit`` restarts of one worker within any ``window_s`` seconds: a worker that dies now and
    then over a week-long run is always restarted; one that dies in a loop is given up on (and the run
    stopped with the reason) instead of restarting forever."""

    def __init__(self, limit: int = 5, window_s: float = 3600.0) -> None:
        self.limit, self.window_s = limit, window_s
        self._times: dict[int, collections.deque[float]] = collections.defaultdict(collections.deque)
        self.total = 0

    def allow(self, worker: int, now: float) -> bool:
        """Record a restart of ``worker`` at ``now`` if the budget allows it."""
        times = self._times[worker]
        while times and now - times[0] > self.window_s:
            times.popleft()
        if len(times) >= self.limit:
            return False
        times.append(now)
        self.total += 1
        return True


class Supervisor:
    """Starts this node's learner ranks and rollout workers and keeps the workers alive."""

    def __init__(
        self, cfg: Config, lay: Layout, node: NodeInfo, model_path: str, resume: bool, insecure: bool
    ) -> None:
        self.ctx = mp.get_context("spawn")
        self.layout, self.node = lay, node
        self.share = lay.nodes[node.node_rank]
        self.cfg = msgspec.structs.replace(cfg, curve_dir=curve_dir(cfg, lay, node, insecure))
        self.site, self.store = open_site(self.cfg, node)
        self.model_path = model_path
        self.plan = plan_node(self.cfg, lay, node, model_path, self.site, resume)
        self.learner_restarts = 0
        self.learners: list[Any] = []
        self.workers: list[Any] = []
        self.finished: set[int] = set()  # workers that exited 0 (the run is over for them)
        self.restarts = RestartBudget()
        self.killed_on_drop: set[int] = set()  # pids of workers this launcher killed on a drop notice
        # the latest rollout worker exits that were not the run's end: why each one left (for operators)
        self.worker_exits: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self.stopping = False
        self.failed = False  # a worker could not run (or kept dying): the run stopped short, exit 1
        self.state_file = Path(self.cfg.output_dir) / "run" / f"node{node.node_rank}.json"

    def _start_worker(self, i: int) -> Any:
        child, wcfg = self.plan.workers[i]
        proc = self.ctx.Process(target=_worker_entry, args=(child.env, child.cores, wcfg), name=child.name)
        proc.start()
        return proc

    def _start_learner(self, child: Child, largs: Any) -> Any:
        proc = self.ctx.Process(target=_learner_entry, args=(child.env, largs), name=child.name)
        proc.start()
        return proc

    def _write_state(self) -> None:
        """``<output_dir>/run/node<k>.json``: who runs where (for operators and fault-injection tests)."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "node_rank": self.node.node_rank,
            "supervisor": os.getpid(),
            "store": self.store.address,
            "endpoints": msgspec.to_builtins(self.site.endpoints),
            "learners": {str(r): p.pid for r, p in zip(self.share.learner_ranks, self.learners, strict=True)},
            "workers": {
                w.worker_id: p.pid for (_, w), p in zip(self.plan.workers, self.workers, strict=True)
            },
            "worker_restarts": self.restarts.total,
            "worker_exits": list(self.worker_exits),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)

    def run(self) -> int:
        t = self.cfg.train
        self.restarts = RestartBudget(t.worker_restarts, t.worker_restart_window_s)
        self.learners = [self._start_learner(c, a) for c, a in self.plan.learners]
        self.workers = [self._start_worker(i) for i in range(len(self.plan.workers))]
        self._write_state()
        log.info(
            "run started",
            node=self.node.node_rank,
            learners=[p.pid for p in self.learners],
            rollout_workers=[p.pid for p in self.workers],
            output_dir=self.cfg.output_dir,
        )
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        last_poll = 0.0
        while True:
            time.sleep(0.5)
            code = self._learners_done() if self.learners else (0 if self._run_is_over() else None)
            if code is not None and code != 0 and self._restart_learners():
                continue
            if code is not None:
                if code != 0:
                    log.error("stopping the run", exitcode=code)
                break
            if time.monotonic() - last_poll > 1.0:
                last_poll = time.monotonic()
                self._kill_dropped()
            self._tend_workers()
        self._shutdown(graceful=code == 0)
        return code or int(self.failed)

    def _learners_done(self) -> int | None:
        """None while the learner ranks run; their exit code once one failed or all finished."""
        dead = [p for p in self.learners if p.exitcode is not None]
        if not dead:
            return None
        code = max(self._exit_code(p) for p in dead)
        if code == 0:
            return None if any(p.is_alive() for p in self.learners) else 0
        rank = self.share.learner_ranks[self.learners.index(dead[0])]
        log.error("a learner rank died", rank=rank, exitcode=dead[0].exitcode)
        return code

    def _restart_learners(self) -> bool:
        """A learner rank died: restart the learner world from its latest checkpoint (from the start when
        it died before the first one: nothing trained was kept, so nothing is lost or repeated), at most
        ``train.learner_restarts`` times per run, when the whole world is on this node. The rollout
        workers keep running; the new controller tells them to come back (they are restarted and say
        Hello again). False: the run ends, as before."""
        from async_vapo.learner.checkpoint import latest

        ckpt = Path(self.cfg.output_dir) / "checkpoints"
        whole_world_here = len(self.share.learner_ranks) == self.layout.learner_world
        if self.stopping or not whole_world_here or self.site.files is None:
            return False
        if self.learner_restarts >= self.cfg.train.learner_restarts:
            return False
        self.learner_restarts += 1
        source = latest(ckpt)  # none yet (it died before its first checkpoint): from the start
        log.warning(
            "a learner rank died; restarting the learner world from "
            + ("its latest checkpoint" if source is not None else "the start (no checkpoint yet)"),
            restart=self.learner_restarts,
            of=self.cfg.train.learner_restarts,
            checkpoint=source.name if source is not None else None,
        )
        for p in self.learners:  # the others are stuck in (or about to fail) a collective
            _stop_group(p.pid, signal.SIGKILL)
            p.join(10)
        old = self.site.files
        nonce = uuid.uuid4().hex[:12]
        fresh = RunFiles(
            old.store, old.world.parent / f"world-{nonce}", old.groups.parent / f"groups-{nonce}"
        )
        fresh.groups.mkdir(exist_ok=True)
        self.site = dataclasses.replace(self.site, files=fresh)
        for f in (old.world, old.groups):  # the dead world's stores: a new world cannot meet in them
            shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        self.plan = plan_node(self.cfg, self.layout, self.node, self.model_path, self.site, resume=True)
        self.learners = [self._start_learner(c, a) for c, a in self.plan.learners]
        self._write_state()
        return True

    def _exit_code(self, p: Any) -> int:
        """A learner our stop's SIGTERM reached before it installed its handler (during start-up, with
        nothing to checkpoint) stopped as asked: 0."""
        if self.stopping and p.exitcode == -signal.SIGTERM:
            return 0
        return p.exitcode or 0

    def _tend_workers(self) -> None:
        """Restart rollout workers that died (with everything they spawned), within ``self.restarts``."""
        for i, p in enumerate(self.workers):
            if p.exitcode is None or self.stopping or i in self.finished:
                continue
            if p.exitcode == exits.FINISHED:
                self.finished.add(i)  # told by the learner that the run is over
                continue
            wid = self.plan.workers[i][1].worker_id
            why = exits.cause(p.exitcode, p.pid in self.killed_on_drop)
            self.worker_exits.append(
                {"worker": wid, "pid": p.pid, "exitcode": p.exitcode, "cause": why, "at": time.time()}
            )
            if not exits.restartable(p.exitcode):
                log.error("a rollout worker cannot run; stopping the run", worker=wid, cause=why)
                self.failed = True
                self._write_state()
                self._on_signal()
                continue
            if not self.restarts.allow(i, time.monotonic()):
                log.error(
                    "rollout worker keeps dying; giving up",
                    worker=wid,
                    exitcode=p.exitcode,
                    cause=why,
                    restarts_in_window=self.restarts.limit,
                    window_s=self.restarts.window_s,
                )
                self.failed = True
                self._write_state()
                self._on_signal()
                continue
            _stop_group(p.pid, signal.SIGKILL)  # its engine core and verifier processes too
            log.warning(
                "rollout worker exited; restarting it",
                worker=wid,
                exitcode=p.exitcode,
                cause=why,
                restarts=self.restarts.total,
            )
            self.workers[i] = self._start_worker(i)
            self._write_state()

    def _kill_dropped(self) -> None:
        """Workers the controller gave up on may be wedged (stopped, stuck in a collective): kill them;
        the loop above restarts them."""
        for (_, wcfg), p in zip(self.plan.workers, self.workers, strict=True):
            try:
                pid = self.store.dropped_pid(wcfg.worker_id)
            except Exception:
                return  # store gone: node 0 is shutting down
            if pid is not None and pid == p.pid and p.exitcode is None:
                log.warning("the controller dropped this worker; killing it", worker=wcfg.worker_id, pid=pid)
                self.killed_on_drop.add(pid)
                _stop_group(p.pid, signal.SIGKILL)
                _stop_group(p.pid, signal.SIGCONT)

    def _run_is_over(self) -> bool:
        """Nodes without learner ranks: over when the learner said so or node 0 is gone."""
        if self.stopping or (self.workers and len(self.finished) == len(self.workers)):
            return True
        try:
            return self.store.done()
        except Exception:
            log.warning("the rendezvous store on node 0 is gone; stopping")
            return True

    def _on_signal(self, *_: Any) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.warning("stopping: the learner checkpoints, then every process exits")
        for p in self.learners:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    def _sweep_groups(self) -> None:
        """Kill whatever is left in each child's process group (after a moment, when anything is)."""
        children = self.learners + self.workers
        if any(_group_alive(p.pid) for p in children):
            time.sleep(1.0)  # a moment for what SIGTERM reached in the groups
        for p in children:
            _stop_group(p.pid, signal.SIGKILL)
            p.join(5)

    def _shutdown(self, graceful: bool) -> None:
        self.stopping = True
        deadline = time.monotonic() + (120 if graceful else 10)
        for p in self.learners:
            p.join(max(0.0, deadline - time.monotonic()))
        # the controller told the workers it knew to shut down; one stopped before it registered (a run
        # stopped during start-up) was never told: SIGTERM makes every worker close vLLM and exit
        for p in self.workers:
            if graceful and p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)
        for p in self.workers:  # give them time to close vLLM
            p.join(max(0.0, min(30.0 if graceful else 0.0, deadline - time.monotonic())))
        for p in self.learners + self.workers:
            if p.is_alive():
                _stop_group(p.pid, signal.SIGTERM)
                p.join(10)
        self._sweep_groups()
        if self.node.node_rank == 0 and self.site.files is not None:  # this run's file stores
            for f in self.site.files.all():
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
