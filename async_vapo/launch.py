"""``python -m async_vapo.launch``: start and supervise this node's share of a run.

    launcher (one per node; node 0 serves the run's rendezvous store)
      ├─ learner ranks of this node (DeepSpeed; rank 0 also runs the controller thread:
      │                              ZeroMQ sockets, buffer, prompt dispatch, weight sync)
      └─ rollout workers of this node (vLLM engine + verifier pool)

With no arguments it runs the embedded default on one node: the built-in addition task and the tiny model,
on CPU. On a cluster the same command runs on every node (``--nnodes/--node-rank/--master-addr`` or the
torchrun / Slurm environment); ``--dry-run`` prints the placement and a memory estimate and exits.

A rollout worker that dies, or that the controller gave up on (missed heartbeats, a weight sync that never
completed), is killed with everything it spawned and restarted; its prompts are requeued by the
controller and it receives the current weights before it samples again. A learner rank that dies ends the
run with its exit code (continue with ``--resume``). Ctrl-C or SIGTERM asks the learner to checkpoint and
stop, then stops the workers; nothing is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import structlog

from async_vapo.cluster import Endpoints, Layout, NodeInfo, NodeShare, RunStore, layout, node_info
from async_vapo.cluster.placement import PlacementError
from async_vapo.cluster.rendezvous import ensure_store_key, load_store_key
from async_vapo.config import Config, ConfigError, check_learner_split, load_config
from async_vapo.logging import configure_logging

log = structlog.get_logger("async_vapo.launch")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded_default.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m async_vapo.launch",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML recipe from configs/ (default: the embedded default)")
    p.add_argument("--rollout-gpus", type=int, default=0, help="GPUs for vLLM engines, all nodes (0: CPU)")
    p.add_argument("--train-gpus", type=int, default=0, help="GPUs for learner ranks, all nodes (0: CPU)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="per card, for --dry-run's estimate")
    p.add_argument("--learner-ranks", type=int, default=1, help="CPU only: learner ranks per node (gloo)")
    p.add_argument("--nnodes", type=int, help="nodes in the run (default: torchrun/Slurm env, else 1)")
    p.add_argument("--node-rank", type=int, help="this node's rank (node 0 hosts learner rank 0)")
    p.add_argument("--master-addr", help="node 0's address (rendezvous store, learner sockets)")
    p.add_argument("--master-port", type=int, help="port of the rendezvous store on node 0")
    p.add_argument("--dry-run", action="store_true", help="print placement and memory estimate, then exit")
    p.add_argument("--output-dir", help="overrides output_dir")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoints/latest")
    p.add_argument("--insecure", action="store_true", help="allow non-loopback sockets without CURVE keys")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.actor_lr=1e-5")
    return p.parse_intermixed_args(argv)  # flags and overrides in any order


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


def _learner_entry(env: dict[str, str], largs: Any) -> None:
    _own_group()
    os.environ.update(env)
    from async_vapo.learner.main import learner_main

    learner_main(largs)


def _worker_entry(env: dict[str, str], cores: list[int], wcfg: Any) -> None:
    _own_group()
    os.environ.update(env)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cores))
    from async_vapo.rollout.worker import worker_main

    worker_main(wcfg)


def _curve_dir(cfg: Config, node: NodeInfo, insecure: bool) -> str:
    """CURVE keys when the learner's sockets leave loopback (node 0 creates them, the others wait)."""
    from async_vapo.protocol.keys import ensure_keys, wait_for_keys
    from async_vapo.protocol.transport import is_loopback

    if is_loopback(f"tcp://{node.master_addr}:1") or insecure:
        return cfg.curve_dir
    key_dir = cfg.curve_dir or str(Path(cfg.output_dir) / ".curve")
    return str(ensure_keys(key_dir) if node.node_rank == 0 else wait_for_keys(key_dir))


class Supervisor:
    """Starts this node's learner ranks and rollout workers and keeps the workers alive."""

    def __init__(
        self, cfg: Config, lay: Layout, node: NodeInfo, model_path: str, resume: bool, insecure: bool
    ) -> None:
        from async_vapo.learner.main import LearnerArgs
        from async_vapo.protocol.transport import is_loopback
        from async_vapo.rollout.engine import EngineConfig
        from async_vapo.rollout.worker import WorkerConfig

        self.ctx = mp.get_context("spawn")
        self.layout, self.node = lay, node
        self.share: NodeShare = lay.nodes[node.node_rank]
        cfg = self.cfg = msgspec.structs.replace(cfg, curve_dir=_curve_dir(cfg, node, insecure))
        # one machine: every store is a file in the run directory (no listener); several nodes: node 0's
        # TCPStore with signed values (see cluster/rendezvous.py and the README's security section)
        self.one_machine = node.nnodes == 1
        run_dir = Path(cfg.output_dir) / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        nonce = uuid.uuid4().hex[:12]
        self.store_key_dir = (
            "" if self.one_machine else (cfg.curve_dir or str(Path(cfg.output_dir) / ".curve"))
        )
        key = None
        if self.store_key_dir:
            key = (
                ensure_store_key(self.store_key_dir)
                if node.node_rank == 0
                else load_store_key(self.store_key_dir)
            )
        address = (
            f"file:{run_dir / f'store-{nonce}'}"
            if self.one_machine
            else f"{node.master_addr}:{node.master_port}"
        )
        self.store = RunStore(address, is_master=node.node_rank == 0, key=key)
        self.local_files = [
            run_dir / f"store-{nonce}",
            run_dir / f"world-{nonce}",
            run_dir / f"groups-{nonce}",
        ]
        (run_dir / f"groups-{nonce}").mkdir(exist_ok=True)
        local = is_loopback(f"tcp://{node.master_addr}:1")
        # beyond loopback the learner's sockets bind to the address the other nodes use, never to "*"
        bind_host = node.master_addr if local else socket.gethostbyname(node.master_addr)
        if node.node_rank == 0:
            ports = [_free_port() for _ in range(3)]
            self.store.publish_endpoints(
                Endpoints(
                    f"tcp://{node.master_addr}:{ports[0]}",
                    f"tcp://{node.master_addr}:{ports[1]}",
                    ports[2],
                    node.master_addr,
                )
            )
        self.endpoints = ep = self.store.endpoints()
        self.learner_args = [
            LearnerArgs(
                cfg,
                model_path,
                ep.data.replace(node.master_addr, bind_host, 1) if rank == 0 else ep.data,
                ep.control.replace(node.master_addr, bind_host, 1) if rank == 0 else ep.control,
                resume,
                () if lay.on_gpu else tuple(devs),
                ep.weight_host,
                self.store.address if rank == 0 else "",
                self.store_key_dir if rank == 0 else "",
                str(self.local_files[1]) if self.one_machine else "",
                str(self.local_files[2]) if self.one_machine else "",
            )
            for rank, devs in zip(self.share.learner_ranks, self.share.learner_devices, strict=True)
        ]
        self.learner_env = [
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(local_rank),
                "WORLD_SIZE": str(lay.learner_world),
                "MASTER_ADDR": node.master_addr,
                "MASTER_PORT": str(ep.learner_master_port),
                **(
                    {"CUDA_VISIBLE_DEVICES": ",".join(map(str, devs)), "LOCAL_RANK": "0"}
                    if lay.on_gpu
                    else {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
                ),
                **self._loopback_env(),
            }
            for local_rank, (rank, devs) in enumerate(
                zip(self.share.learner_ranks, self.share.learner_devices, strict=True)
            )
        ]
        r = cfg.rollout
        self.worker_cfgs = [
            WorkerConfig(
                worker_id=f"rollout-{e}",
                data_endpoint=ep.data,
                control_endpoint=ep.control,
                engine=EngineConfig(
                    model_path,
                    seed=cfg.train.seed + e,
                    max_model_len=r.max_model_len,
                    dtype="auto" if lay.on_gpu else "float32",
                    tensor_parallel_size=len(devs) if lay.on_gpu else 1,
                    gpu_memory_utilization=r.gpu_memory_utilization,
                ),
                n_samples=r.n_samples,
                temperature=r.temperature,
                top_p=r.top_p,
                max_tokens=r.max_tokens,
                correct_reward=r.correct_reward,
                wrong_reward=r.wrong_reward,
                verifier_processes=r.verifier_processes,
                verifier_timeout_s=r.verifier_timeout_s,
                curve_dir=cfg.curve_dir,
            )
            for e, devs in zip(self.share.engines, self.share.engine_devices, strict=True)
        ]
        self.worker_env = [
            (
                {"CUDA_VISIBLE_DEVICES": ",".join(map(str, devs))}
                if lay.on_gpu
                else {
                    "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, devs)),
                    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                    "CUDA_VISIBLE_DEVICES": "",
                }
            )
            | self._loopback_env()
            for devs in self.share.engine_devices
        ]
        self.learners: list[Any] = []
        self.workers: list[Any] = []
        self.finished: set[int] = set()  # workers that exited 0 (the run is over for them)
        self.restarts = 0
        self.stopping = False
        self.state_file = Path(cfg.output_dir) / "run" / f"node{node.node_rank}.json"

    def _loopback_env(self) -> dict[str, str]:
        """One machine: gloo / NCCL (learner world, weight groups, vLLM's own groups) listen on loopback
        only (by default they bind to the address the host name resolves to). A user's setting wins."""
        if not self.one_machine or not Path("/sys/class/net/lo").exists():
            return {}
        return {k: os.environ.get(k, "lo") for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")} | {
            "VLLM_HOST_IP": os.environ.get("VLLM_HOST_IP", "127.0.0.1")
        }

    def _start_worker(self, i: int) -> Any:
        cores = [] if self.layout.on_gpu else self.share.engine_devices[i]
        proc = self.ctx.Process(
            target=_worker_entry,
            args=(self.worker_env[i], cores, self.worker_cfgs[i]),
            name=self.worker_cfgs[i].worker_id,
        )
        proc.start()
        return proc

    def _write_state(self) -> None:
        """``<output_dir>/run/node<k>.json``: who runs where (for operators and fault-injection tests)."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "node_rank": self.node.node_rank,
            "supervisor": os.getpid(),
            "store": self.store.address,
            "endpoints": msgspec.to_builtins(self.endpoints),
            "learners": {str(r): p.pid for r, p in zip(self.share.learner_ranks, self.learners, strict=True)},
            "workers": {c.worker_id: p.pid for c, p in zip(self.worker_cfgs, self.workers, strict=True)},
            "worker_restarts": self.restarts,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(__import__("json").dumps(state, indent=1))
        tmp.replace(self.state_file)

    def run(self, max_restarts: int = 5) -> int:
        for env, largs in zip(self.learner_env, self.learner_args, strict=True):
            proc = self.ctx.Process(target=_learner_entry, args=(env, largs), name="learner")
            proc.start()
            self.learners.append(proc)
        self.workers = [self._start_worker(i) for i in range(len(self.worker_cfgs))]
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
        code = 0
        last_poll = 0.0
        while True:
            time.sleep(0.5)
            if self.learners:
                dead = [p for p in self.learners if p.exitcode is not None]
                if dead:
                    code = max((p.exitcode or 0) for p in dead) if any(p.exitcode for p in dead) else 0
                    if code == 0 and any(p.is_alive() for p in self.learners):
                        continue
                    if code != 0:
                        log.error(
                            "a learner rank died; stopping the run",
                            rank=self.share.learner_ranks[self.learners.index(dead[0])],
                            exitcode=dead[0].exitcode,
                        )
                    break
            elif self._run_is_over():
                break
            if time.monotonic() - last_poll > 1.0:
                last_poll = time.monotonic()
                self._kill_dropped()
            for i, p in enumerate(self.workers):
                if p.exitcode is None or self.stopping or i in self.finished:
                    continue
                if p.exitcode == 0:
                    self.finished.add(i)  # told by the learner that the run is over
                    continue
                if self.restarts >= max_restarts:
                    log.error("rollout worker keeps dying; giving up", worker=i, exitcode=p.exitcode)
                    self._on_signal()
                    continue
                self.restarts += 1
                _stop_group(p.pid, signal.SIGKILL)  # its engine core and verifier processes too
                log.warning(
                    "rollout worker exited; restarting it",
                    worker=i,
                    exitcode=p.exitcode,
                    restarts=self.restarts,
                )
                self.workers[i] = self._start_worker(i)
                self._write_state()
        self._shutdown(graceful=code == 0)
        return code

    def _kill_dropped(self) -> None:
        """Workers the controller gave up on may be wedged (stopped, stuck in a collective): kill them;
        the loop above restarts them."""
        for cfg, p in zip(self.worker_cfgs, self.workers, strict=True):
            try:
                pid = self.store.dropped_pid(cfg.worker_id)
            except Exception:
                return  # store gone: node 0 is shutting down
            if pid is not None and pid == p.pid and p.exitcode is None:
                log.warning("the controller dropped this worker; killing it", worker=cfg.worker_id, pid=pid)
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

    def _shutdown(self, graceful: bool) -> None:
        self.stopping = True
        deadline = time.monotonic() + (120 if graceful else 10)
        for p in self.learners:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.workers:  # the controller told them to shut down; give them time to close vLLM
            p.join(max(0.0, min(30.0 if graceful else 0.0, deadline - time.monotonic())))
        for p in self.learners + self.workers:
            if p.is_alive():
                _stop_group(p.pid, signal.SIGTERM)
                p.join(10)
        time.sleep(1.0)
        for p in self.learners + self.workers:  # sweep whatever is left in each child's group
            _stop_group(p.pid, signal.SIGKILL)
            p.join(5)
        if self.node.node_rank == 0:  # this run's file stores (one machine)
            for f in self.local_files if self.one_machine else []:
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)


def resolve_model(cfg: Config) -> str:
    if cfg.model.path:
        return cfg.model.path
    from async_vapo.tasks.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(progress=True))


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.insecure:
        overrides.append("insecure=true")
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
        node = node_info(args.nnodes, args.node_rank, args.master_addr, args.master_port)
        if args.dry_run and node.source == "single":  # plan for as many nodes as the GPUs need
            need = -(-(args.train_gpus + args.rollout_gpus) // args.gpus_per_node)
            node = NodeInfo(max(1, need), 0, node.master_addr, node.master_port, "dry-run")
        lay = layout(
            args.train_gpus,
            args.rollout_gpus,
            node.nnodes,
            args.gpus_per_node,
            cfg.rollout.tensor_parallel_size,
            args.learner_ranks,
            cfg.rollout.num_workers,
        )
        check_learner_split(cfg, lay.learner_world)
    except (ConfigError, PlacementError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(cfg, lay, args.gpu_memory_gb)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    import msgspec

    (Path(cfg.output_dir) / "config.yaml").write_text(
        __import__("yaml").safe_dump(msgspec.to_builtins(cfg), sort_keys=False)
    )
    model_path = resolve_model(cfg)
    log.info("placement", node=node.node_rank, nnodes=node.nnodes, source=node.source, plan=lay.describe())
    return Supervisor(cfg, lay, node, model_path, args.resume, args.insecure).run()


def dry_run(cfg: Config, lay: Layout, card_gib: float) -> int:
    """Print the placement and the per-GPU memory estimate; exit 2 if the layout cannot work."""
    from async_vapo.cluster import estimate_memory, model_shape

    print(lay.describe())
    path = cfg.model.path
    if not path:
        from async_vapo.tasks.tiny_model import tiny_model_dir

        path = str(tiny_model_dir())
    try:
        shape = model_shape(path)
    except ValueError as exc:
        print(f"memory: {exc}")
        return 0
    t, r = cfg.train, cfg.rollout
    if not lay.on_gpu:
        card_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    plan = estimate_memory(
        shape,
        lay.learner_world,
        t.zero_stage,
        t.micro_batch_size,
        r.max_model_len,
        t.gradient_checkpointing,
        r.tensor_parallel_size if lay.on_gpu else 1,
        r.gpu_memory_utilization,
        card_gib,
        cfg.algo.estimator == "gae",
        None if lay.on_gpu else float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")),
        stream_publish=t.streams_publish,
        bucket_mb=t.bucket_mb,
    )
    print(f"model {path}: {shape.params / 1e6:,.1f} M parameters, {shape.layers} layers")
    print(plan.describe(card_gib, "GPU" if lay.on_gpu else "process (host memory)"))
    return 2 if plan.problems and lay.on_gpu else 0


if __name__ == "__main__":
    sys.exit(main())
