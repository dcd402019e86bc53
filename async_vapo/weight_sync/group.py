"""The dedicated process group between learner rank 0 and one rollout engine's workers.

It lives outside any global ``torch.distributed`` world (the learner's DeepSpeed world and vLLM's own
parallel groups stay untouched): a ``TCPStore`` served by the learner (a ``FileStore`` in the run
directory when everything is on one machine: a ``TCPStore`` listens on every interface) plus a gloo group
on CPU, an NCCL communicator on GPUs. Rank 0 is always the learner; engine worker ``i`` is rank ``1 + i``.

A peer that never joins or stops answering surfaces as a ``RuntimeError`` from the collective after
``timeout`` seconds (gloo enforces it), never as a hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class GroupSpec:
    host: str
    port: int
    world_size: int
    backend: str = "gloo"  # "nccl" on GPUs
    timeout_s: float = 60.0
    store_file: str = ""  # a FileStore path (one machine: no listener) instead of a TCPStore at host:port

    def as_tuple(self) -> tuple[str, int, int, str, float, str]:
        """The fields in order (``GroupSpec(*spec.as_tuple())``; ``PublishTarget.join``, ``JoinGroup``)."""
        return (self.host, self.port, self.world_size, self.backend, self.timeout_s, self.store_file)


def serve_store(spec: GroupSpec) -> dist.TCPStore | None:
    """The rendezvous store of a group whose members all join as clients (``join_group(..., serve=False)``):
    the controller serves it when another learner rank is the group's rank 0 (a file store needs no one)."""
    if spec.store_file:
        return None
    return dist.TCPStore(
        spec.host,
        spec.port,
        None,
        is_master=True,
        timeout=timedelta(seconds=spec.timeout_s),
        wait_for_workers=False,
    )


def join_group(spec: GroupSpec, rank: int, serve: bool | None = None):
    """Join (rank 0 serves the store unless ``serve`` says otherwise). Returns a process group object
    with ``broadcast``."""
    store: dist.Store
    if spec.store_file:
        store = dist.FileStore(spec.store_file, spec.world_size)
        store.set_timeout(timedelta(seconds=spec.timeout_s))
    else:
        store = dist.TCPStore(
            spec.host,
            spec.port,
            spec.world_size,
            is_master=(rank == 0) if serve is None else serve,
            timeout=timedelta(seconds=spec.timeout_s),
            wait_for_workers=False,
        )
    if spec.backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, spec.world_size, timedelta(seconds=spec.timeout_s))
    if spec.backend == "nccl":
        return _nccl_group(store, rank, spec)
    raise ValueError(f"unknown weight-sync backend {spec.backend!r}; valid: 'gloo', 'nccl'")


def _nccl_group(store, rank: int, spec: GroupSpec):  # pragma: no cover - needs GPUs
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timedelta(seconds=spec.timeout_s)
    return dist.ProcessGroupNCCL(store, rank, spec.world_size, opts)


def broadcast(pg, tensor: torch.Tensor, root: int = 0) -> None:
    """In-place broadcast of one contiguous tensor over ``pg``; raises on timeout."""
    pg.broadcast(tensor, root).wait()
