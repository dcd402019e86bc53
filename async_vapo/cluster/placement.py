"""Device placement: which node runs which learner ranks and which vLLM engines, on which devices.

GPUs are numbered node-major (node 0's GPUs first). Learner ranks take the first ``train_gpus`` GPUs, so
learner rank 0 (the controller) is on node 0; vLLM engines take the next ``rollout_gpus`` in groups of
``tensor_parallel_size``, and an engine never spans two nodes (tensor parallelism needs NVLink). With 32
training and 32 rollout GPUs on 8-GPU nodes: nodes 0-3 train, nodes 4-7 each host two TP=4 engines.

On CPU (no GPU counts given) every node runs ``learner_ranks_per_node`` learner ranks and
``workers_per_node`` engines and splits its cores between the two sides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class NodeShare:
    node_rank: int
    learner_ranks: list[int] = field(default_factory=list)  # global learner ranks on this node
    learner_devices: list[list[int]] = field(default_factory=list)  # per rank: local GPU ids or CPU cores
    engines: list[int] = field(default_factory=list)  # global engine indices on this node
    engine_devices: list[list[int]] = field(default_factory=list)  # per engine: local GPU ids or cores


@dataclass(frozen=True)
class Layout:
    on_gpu: bool
    nnodes: int
    gpus_per_node: int
    tensor_parallel_size: int
    learner_world: int
    n_engines: int
    nodes: list[NodeShare]

    def describe(self) -> str:
        unit = "GPU" if self.on_gpu else "core"
        lines = [
            f"{self.nnodes} node(s); learner world {self.learner_world}; {self.n_engines} vLLM engine(s)"
            + (f" x TP {self.tensor_parallel_size}" if self.tensor_parallel_size > 1 else "")
        ]
        for n in self.nodes:
            parts = [
                f"learner rank {r} on {unit} {','.join(map(str, d))}"
                for r, d in zip(n.learner_ranks, n.learner_devices, strict=True)
            ] + [
                f"engine {e} on {unit}s {','.join(map(str, d))}"
                for e, d in zip(n.engines, n.engine_devices, strict=True)
            ]
            lines.append(f"  node {n.node_rank}: " + ("; ".join(parts) or "idle"))
        return "\n".join(lines)


def gpu_layout(
    train_gpus: int, rollout_gpus: int, nnodes: int, gpus_per_node: int, tensor_parallel_size: int
) -> Layout:
    tp = tensor_parallel_size
    if train_gpus < 1 or rollout_gpus < 1:
        raise PlacementError("on GPUs both --train-gpus and --rollout-gpus must be at least 1")
    if rollout_gpus % tp:
        raise PlacementError(f"--rollout-gpus {rollout_gpus} is not a multiple of tensor_parallel_size {tp}")
    if tp > gpus_per_node:
        raise PlacementError(f"tensor_parallel_size {tp} exceeds the {gpus_per_node} GPUs of a node")
    have = nnodes * gpus_per_node
    if train_gpus + rollout_gpus > have:
        raise PlacementError(
            f"{train_gpus} training + {rollout_gpus} rollout GPUs do not fit on {nnodes} node(s) of "
            f"{gpus_per_node} GPUs ({have} in all)"
        )
    slots = [(n, g) for n in range(nnodes) for g in range(gpus_per_node)]
    shares = [NodeShare(n) for n in range(nnodes)]
    for rank, (n, g) in enumerate(slots[:train_gpus]):
        shares[n].learner_ranks.append(rank)
        shares[n].learner_devices.append([g])
    engine_slots = slots[train_gpus : train_gpus + rollout_gpus]
    for e in range(rollout_gpus // tp):
        group = engine_slots[e * tp : (e + 1) * tp]
        nodes = {n for n, _ in group}
        if len(nodes) > 1:
            raise PlacementError(
                f"engine {e} would span nodes {sorted(nodes)} (tensor parallelism stays inside a node): "
                f"make --train-gpus a multiple of tensor_parallel_size {tp}"
            )
        shares[group[0][0]].engines.append(e)
        shares[group[0][0]].engine_devices.append([g for _, g in group])
    return Layout(True, nnodes, gpus_per_node, tp, train_gpus, rollout_gpus // tp, shares)


def cpu_layout(
    nnodes: int,
    learner_ranks_per_node: int,
    workers_per_node: int,
    cores: list[int] | None = None,
    tensor_parallel_size: int = 1,
) -> Layout:
    """Half of the node's cores for the learner ranks, half for the engines. A TP engine on CPU spreads its
    ``tensor_parallel_size`` vLLM workers over its cores (``engine_core_binding``)."""
    if learner_ranks_per_node < 1 or workers_per_node < 1:
        raise PlacementError("each node needs at least one learner rank and one rollout worker on CPU")
    if tensor_parallel_size < 1:
        raise PlacementError(f"tensor_parallel_size {tensor_parallel_size} < 1")
    if cores is None:
        cores = (
            sorted(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else list(range(os.cpu_count() or 2))
        )
    half = max(1, len(cores) // 2)
    learner_cores = cores[half:] if len(cores) > 1 else cores
    rollout_cores = cores[:half] if len(cores) > 1 else cores
    per = max(1, len(rollout_cores) // workers_per_node)
    engine_cores = [rollout_cores[(i * per) % len(rollout_cores) :][:per] for i in range(workers_per_node)]
    shares = [
        NodeShare(
            n,
            [n * learner_ranks_per_node + r for r in range(learner_ranks_per_node)],
            [list(learner_cores) for _ in range(learner_ranks_per_node)],
            [n * workers_per_node + i for i in range(workers_per_node)],
            [list(c) for c in engine_cores],
        )
        for n in range(nnodes)
    ]
    return Layout(
        False,
        nnodes,
        0,
        tensor_parallel_size,
        nnodes * learner_ranks_per_node,
        nnodes * workers_per_node,
        shares,
    )


def engine_core_binding(cores: list[int], tensor_parallel_size: int) -> str:
    """vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` for one CPU engine: a comma-separated core list per TP worker,
    ``|`` between workers. The engine's cores are dealt out in equal runs; with fewer cores than workers,
    workers share cores round-robin (``[0, 1]`` at TP 4: ``0|1|0|1``)."""
    if tensor_parallel_size <= 1:
        return ",".join(map(str, cores))
    per = max(1, len(cores) // tensor_parallel_size)
    runs = [cores[(i * per) % len(cores) :][:per] for i in range(tensor_parallel_size)]
    return "|".join(",".join(map(str, r)) for r in runs)


def layout(
    train_gpus: int,
    rollout_gpus: int,
    nnodes: int,
    gpus_per_node: int,
    tensor_parallel_size: int,
    learner_ranks_per_node: int = 1,
    workers_per_node: int = 1,
) -> Layout:
    """GPU layout when GPU counts are given, else the CPU layout."""
    if train_gpus > 0 or rollout_gpus > 0:
        return gpu_layout(train_gpus, rollout_gpus, nnodes, gpus_per_node, tensor_parallel_size)
    return cpu_layout(
        nnodes, learner_ranks_per_node, workers_per_node, tensor_parallel_size=tensor_parallel_size
    )
