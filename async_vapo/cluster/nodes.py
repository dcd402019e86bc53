"""Which node this is: from flags, else torchrun's or Slurm's environment, else a single node.

Precedence: ``--nnodes/--node-rank/--master-addr/--master-port`` flags, then torchrun (``GROUP_RANK``,
``WORLD_SIZE / LOCAL_WORLD_SIZE``, ``MASTER_ADDR``; run it with ``--nproc-per-node 1``: the launcher starts
the node's processes itself), then Slurm (``SLURM_NNODES``, ``SLURM_NODEID``, the first host of
``SLURM_JOB_NODELIST``), then one node on loopback. ``MASTER_PORT`` (default 29500) is the port of the
run's rendezvous store on node 0; under torchrun, whose agent already serves that port, we use port + 1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class NodeInfo:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int  # 0: pick a free one (single node only)
    source: str  # "flags", "torchrun", "slurm" or "single"

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node rank {self.node_rank} is outside [0, {self.nnodes})")


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def node_info(
    nnodes: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> NodeInfo:
    env = os.environ if env is None else env
    port_env = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None
    if nnodes is not None or node_rank is not None:
        n = nnodes or 1
        if n > 1 and not (master_addr or env.get("MASTER_ADDR")):
            raise ValueError("--master-addr (or MASTER_ADDR) is required with more than one node")
        return NodeInfo(
            n,
            node_rank or 0,
            master_addr or env.get("MASTER_ADDR", "127.0.0.1"),
            master_port or port_env or (DEFAULT_PORT if n > 1 else 0),
            "flags",
        )
    if "GROUP_RANK" in env and "LOCAL_WORLD_SIZE" in env:
        per_node = int(env["LOCAL_WORLD_SIZE"])
        if per_node != 1:
            raise ValueError(
                "run torchrun with --nproc-per-node 1: the launcher starts each node's processes"
            )
        return NodeInfo(
            int(env["WORLD_SIZE"]) // per_node,
            int(env["GROUP_RANK"]),
            master_addr or env["MASTER_ADDR"],
            master_port or (port_env or DEFAULT_PORT) + 1,
            "torchrun",
        )
    if "SLURM_NNODES" in env and "SLURM_NODEID" in env:
        return NodeInfo(
            int(env["SLURM_NNODES"]),
            int(env["SLURM_NODEID"]),
            master_addr or env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"]),
            master_port or port_env or DEFAULT_PORT,
            "slurm",
        )
    return NodeInfo(1, 0, master_addr or "127.0.0.1", master_port or port_env or 0, "single")
