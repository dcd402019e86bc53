"""``python -m async_vapo.launch``: start and supervise every process of a run.

    launcher ─┬─ learner rank 0 (DeepSpeed; controller thread: ZeroMQ sockets, buffer, weight sync)
              ├─ learner rank 1..M-1 (DeepSpeed data parallel)
              └─ rollout worker 0..K-1 (vLLM engine + verifier pool)

With no arguments it runs the embedded default: the built-in addition task and the tiny model, on CPU.
A rollout worker that dies is restarted (its prompts are requeued by the controller, and it receives the
current weights before it samples again); a learner that dies ends the run with its exit code. Ctrl-C or
SIGTERM asks the learner to checkpoint and stop, then stops the workers; nothing is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from async_vapo.config import Config, ConfigError, load_config
from async_vapo.logging import configure_logging

log = structlog.get_logger("async_vapo.launch")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded_default.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m async_vapo.launch",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML recipe from configs/ (default: the embedded default)")
    p.add_argument("--rollout-gpus", type=int, default=0, help="GPUs for vLLM engines (0: CPU)")
    p.add_argument("--train-gpus", type=int, default=0, help="GPUs for learner ranks (0: CPU)")
    p.add_argument("--learner-ranks", type=int, default=1, help="CPU only: number of learner ranks (gloo)")
    p.add_argument("--output-dir", help="overrides output_dir")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoints/latest")
    p.add_argument("--insecure", action="store_true", help="allow non-loopback sockets without CURVE keys")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.actor_lr=1e-5")
    return p.parse_args(argv)


@dataclass
class Placement:
    on_gpu: bool
    learner_ranks: int
    learner_devices: list[list[int]]  # per rank: GPU ids, or CPU cores
    rollout_devices: list[list[int]]  # per engine


def place(args: argparse.Namespace, cfg: Config) -> Placement:
    """Which devices run what. CPU: split the cores between the learner and the rollout engines."""
    if args.rollout_gpus > 0 or args.train_gpus > 0:
        tp = cfg.rollout.tensor_parallel_size
        if args.rollout_gpus % tp:
            raise ConfigError(
                f"--rollout-gpus {args.rollout_gpus} is not a multiple of tensor_parallel_size {tp}"
            )
        gpus = list(range(args.train_gpus + args.rollout_gpus))
        rollout = gpus[args.train_gpus :]
        return Placement(
            True,
            args.train_gpus,
            [[g] for g in gpus[: args.train_gpus]],
            [rollout[i : i + tp] for i in range(0, len(rollout), tp)],
        )
    cores = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 2))
    )
    half = max(1, len(cores) // 2)
    learner_cores: list[int] = cores[half:] if len(cores) > 1 else cores
    rollout_cores: list[int] = cores[:half] if len(cores) > 1 else cores
    n_workers = cfg.rollout.num_workers
    per = max(1, len(rollout_cores) // n_workers)
    per_worker = [rollout_cores[(i * per) % len(rollout_cores) :][:per] for i in range(n_workers)]
    return Placement(False, args.learner_ranks, [learner_cores] * args.learner_ranks, per_worker)


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


class Supervisor:
    def __init__(self, cfg: Config, placement: Placement, model_path: str, resume: bool) -> None:
        from async_vapo.learner.main import LearnerArgs
        from async_vapo.rollout.engine import EngineConfig
        from async_vapo.rollout.worker import WorkerConfig

        self.ctx = mp.get_context("spawn")
        self.cfg, self.placement = cfg, placement
        data = f"tcp://127.0.0.1:{_free_port()}"
        control = f"tcp://127.0.0.1:{_free_port()}"
        master_port = str(_free_port())
        self.learner_args = [
            LearnerArgs(
                cfg,
                model_path,
                data,
                control,
                resume,
                () if placement.on_gpu else tuple(placement.learner_devices[r]),
            )
            for r in range(placement.learner_ranks)
        ]
        self.learner_env = [
            {
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(placement.learner_ranks),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": master_port,
                **(
                    {
                        "CUDA_VISIBLE_DEVICES": ",".join(map(str, placement.learner_devices[r])),
                        "LOCAL_RANK": "0",
                    }
                    if placement.on_gpu
                    else {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
                ),
            }
            for r in range(placement.learner_ranks)
        ]
        r = cfg.rollout
        self.worker_cfgs = [
            WorkerConfig(
                worker_id=f"rollout-{i}",
                data_endpoint=data,
                control_endpoint=control,
                engine=EngineConfig(
                    model_path,
                    seed=cfg.train.seed + i,
                    max_model_len=r.max_model_len,
                    dtype="auto" if placement.on_gpu else "float32",
                    tensor_parallel_size=len(devs) if placement.on_gpu else 1,
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
            )
            for i, devs in enumerate(placement.rollout_devices)
        ]
        self.worker_env = [
            (
                {"CUDA_VISIBLE_DEVICES": ",".join(map(str, devs))}
                if placement.on_gpu
                else {
                    "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, devs)),
                    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                    "CUDA_VISIBLE_DEVICES": "",
                }
            )
            for devs in placement.rollout_devices
        ]
        self.learners: list[Any] = []
        self.workers: list[Any] = []
        self.restarts = 0
        self.stopping = False

    def _start_worker(self, i: int) -> Any:
        cores = [] if self.placement.on_gpu else self.placement.rollout_devices[i]
        proc = self.ctx.Process(
            target=_worker_entry, args=(self.worker_env[i], cores, self.worker_cfgs[i]), name=f"rollout-{i}"
        )
        proc.start()
        return proc

    def run(self, max_restarts: int = 5) -> int:
        for r, (env, largs) in enumerate(zip(self.learner_env, self.learner_args, strict=True)):
            proc = self.ctx.Process(target=_learner_entry, args=(env, largs), name=f"learner-{r}")
            proc.start()
            self.learners.append(proc)
        self.workers = [self._start_worker(i) for i in range(len(self.worker_cfgs))]
        log.info(
            "run started",
            learners=[p.pid for p in self.learners],
            rollout_workers=[p.pid for p in self.workers],
            output_dir=self.cfg.output_dir,
        )
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        code = 0
        while True:
            time.sleep(0.5)
            dead = [p for p in self.learners if p.exitcode is not None]
            if dead:
                code = max((p.exitcode or 0) for p in dead) if any(p.exitcode for p in dead) else 0
                if code == 0 and any(p.is_alive() for p in self.learners):
                    continue
                if code != 0:
                    log.error(
                        "a learner rank died; stopping the run",
                        rank=self.learners.index(dead[0]),
                        exitcode=dead[0].exitcode,
                    )
                break
            for i, p in enumerate(self.workers):
                if p.exitcode is not None and not self.stopping:
                    if self.restarts >= max_restarts:
                        log.error("rollout worker keeps dying; giving up", worker=i, exitcode=p.exitcode)
                        self._on_signal()
                        continue
                    self.restarts += 1
                    _stop_group(p.pid, signal.SIGKILL)  # its engine core and verifier processes too
                    log.warning(
                        "rollout worker died; restarting it",
                        worker=i,
                        exitcode=p.exitcode,
                        restarts=self.restarts,
                    )
                    self.workers[i] = self._start_worker(i)
        self._shutdown(graceful=code == 0)
        return code

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
        placement = place(args, cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    import msgspec

    (Path(cfg.output_dir) / "config.yaml").write_text(
        __import__("yaml").safe_dump(msgspec.to_builtins(cfg), sort_keys=False)
    )
    model_path = resolve_model(cfg)
    log.info(
        "placement",
        on_gpu=placement.on_gpu,
        learner=placement.learner_devices,
        rollout=placement.rollout_devices,
    )
    return Supervisor(cfg, placement, model_path, args.resume).run()


if __name__ == "__main__":
    sys.exit(main())
