"""What this node runs, as data: a pure function of the recipe, the placement and the run's addresses.

``plan_node`` decides every learner rank's ``LearnerArgs`` and environment and every rollout worker's
``WorkerConfig``, environment and cores. It reads no store, file or environment variable (the caller
passes what it found), so a test can plan any node of any cluster without starting anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from async_vapo.cluster import Endpoints, Layout, NodeInfo, NodeShare, engine_core_binding
from async_vapo.config import Config
from async_vapo.controller.admission import rollout_worker_id
from async_vapo.learner.setup import LearnerArgs
from async_vapo.rollout.engine import EngineConfig
from async_vapo.rollout.worker import WorkerConfig
from async_vapo.weight_sync.adapter import LoRASpec


@dataclass(frozen=True)
class RunFiles:
    """One machine: the run store, the learner world and the weight groups meet in files here."""

    store: Path
    world: Path
    groups: Path  # a directory: one FileStore per weight group

    @classmethod
    def under(cls, run_dir: Path, nonce: str) -> RunFiles:
        return cls(run_dir / f"store-{nonce}", run_dir / f"world-{nonce}", run_dir / f"groups-{nonce}")

    def all(self) -> list[Path]:
        return [self.store, self.world, self.groups]


@dataclass(frozen=True)
class Site:
    """What the launcher found out about this node and run before planning it."""

    endpoints: Endpoints
    store_address: str  # the run store, for learner rank 0's drop notices
    store_key_dir: str = ""  # multi-node: the store's signing key
    files: RunFiles | None = None  # one machine
    bind_host: str = ""  # the address learner rank 0 binds its sockets to ("" = the endpoints' host)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. loopback-only gloo/NCCL/vLLM
    kv_cache_gib: str = "1"  # CPU engines: vLLM's KV cache
    # the GPUs this node's launcher may use, as its CUDA_VISIBLE_DEVICES said (Slurm, a container
    # runtime); "" = all. Device k of the placement is the k-th of these, never the k-th of the machine.
    visible_devices: str = ""

    def cuda_devices(self, devs: list[int] | tuple[int, ...]) -> str:
        """CUDA_VISIBLE_DEVICES for a child on placement devices ``devs``, mapped through ours."""
        if not self.visible_devices.strip():
            return ",".join(map(str, devs))
        ours = [d.strip() for d in self.visible_devices.split(",") if d.strip()]
        if max(devs, default=-1) >= len(ours):
            raise ValueError(
                f"the placement uses GPU {max(devs)} of this node, but CUDA_VISIBLE_DEVICES "
                f"({self.visible_devices}) gives the launcher only {len(ours)}"
            )
        return ",".join(ours[d] for d in devs)


@dataclass(frozen=True)
class Child:
    name: str
    env: dict[str, str]
    cores: tuple[int, ...] = ()  # CPU: the cores it is pinned to


@dataclass(frozen=True)
class NodePlan:
    learners: list[tuple[Child, LearnerArgs]]
    workers: list[tuple[Child, WorkerConfig]]


def plan_node(
    cfg: Config, lay: Layout, node: NodeInfo, model_path: str, site: Site, resume: bool
) -> NodePlan:
    share = lay.nodes[node.node_rank]
    return NodePlan(
        _learners(cfg, lay, node, share, model_path, site, resume),
        _workers(cfg, lay, share, model_path, site),
    )


def _every_core(share: NodeShare) -> tuple[int, ...]:
    """CPU: every core of the node's share (learner ranks' and engines')."""
    return tuple(sorted({c for devs in (*share.learner_devices, *share.engine_devices) for c in devs}))


def _learners(
    cfg: Config, lay: Layout, node: NodeInfo, share: NodeShare, model_path: str, site: Site, resume: bool
) -> list[tuple[Child, LearnerArgs]]:
    ep = site.endpoints
    out = []
    every_core = _every_core(share)
    ranks_here = len(share.learner_ranks)
    for local_rank, (rank, devs) in enumerate(zip(share.learner_ranks, share.learner_devices, strict=True)):
        first = rank == 0
        cores = tuple(every_core if cfg.train.learner_cores == "all" else devs)
        bind = (lambda e: e.replace(node.master_addr, site.bind_host, 1)) if first and site.bind_host else str
        args = LearnerArgs(
            cfg=cfg,
            model_path=model_path,
            data_endpoint=bind(ep.data),
            control_endpoint=bind(ep.control),
            resume=resume,
            cpu_affinity=() if lay.on_gpu else cores,
            threads=0 if lay.on_gpu else (cfg.train.learner_threads or max(1, len(cores) // ranks_here)),
            weight_host=ep.weight_host,
            store_address=site.store_address if first else "",
            store_key_dir=site.store_key_dir if first else "",
            world_store=str(site.files.world) if site.files else "",
            group_store_dir=str(site.files.groups) if site.files else "",
            ranks_per_node=ranks_here,
            rollout_engines=lay.n_engines if first else 0,
        )
        env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(lay.learner_world),
            "MASTER_ADDR": node.master_addr,
            "MASTER_PORT": str(ep.learner_master_port),
            **(
                {"CUDA_VISIBLE_DEVICES": site.cuda_devices(devs), "LOCAL_RANK": "0"}
                if lay.on_gpu
                else {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
            ),
            **site.extra_env,
        }
        out.append((Child("learner", env), args))
    return out


def engine_lora(cfg: Config) -> LoRASpec | None:
    """The adapter the engines serve under ``model.lora_publish=adapter`` (None: they get merged weights)."""
    m = cfg.model
    if m.lora_publish != "adapter":
        return None
    return LoRASpec(m.lora_rank, m.lora_alpha, tuple(m.lora_target_modules))


def _workers(
    cfg: Config, lay: Layout, share: NodeShare, model_path: str, site: Site
) -> list[tuple[Child, WorkerConfig]]:
    r = cfg.rollout
    out = []
    every_core = _every_core(share)
    for e, devs in zip(share.engines, share.engine_devices, strict=True):
        wcfg = WorkerConfig(
            worker_id=rollout_worker_id(e),
            data_endpoint=site.endpoints.data,
            control_endpoint=site.endpoints.control,
            engine=EngineConfig(
                model_path,
                seed=cfg.train.seed + e,
                max_model_len=r.max_model_len,
                dtype="auto" if lay.on_gpu else "float32",
                tensor_parallel_size=len(devs) if lay.on_gpu else lay.tensor_parallel_size,
                gpu_memory_utilization=r.gpu_memory_utilization,
                max_num_seqs=r.max_num_seqs,
                enforce_eager=r.enforce_eager == "on" or (r.enforce_eager == "auto" and not lay.on_gpu),
                async_scheduling=r.async_scheduling,
                model_runner=r.model_runner,
                extra=tuple(sorted(r.engine_kwargs.items())),
                lora=engine_lora(cfg),
            ),
            rollout=r,
            curve_dir=cfg.curve_dir,
        )
        if lay.on_gpu:
            env = {"CUDA_VISIBLE_DEVICES": site.cuda_devices(devs)}
        else:
            env = {
                "VLLM_CPU_OMP_THREADS_BIND": engine_core_binding(devs, lay.tensor_parallel_size),
                "VLLM_CPU_KVCACHE_SPACE": site.kv_cache_gib,
                "CUDA_VISIBLE_DEVICES": "",
            }
        cores = () if lay.on_gpu else (every_core if r.frontend_cores == "all" else tuple(devs))
        out.append((Child(wcfg.worker_id, env | site.extra_env, cores), wcfg))
    return out
