"""The learner world's default process group, asked in one place: whether there is one with more than
one rank, this rank, the world size, and the collectives the update layer and the checkpoint use. Every
function is also right in a process with no process group (a test, ``bench/``): rank 0 of a world of 1."""

from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    """A default process group exists (of any size)."""
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """A default process group of more than one rank: collectives do something."""
    return initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks (a new tensor; ``x`` itself when alone)."""
    if active():
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_max(n: int, device: torch.device | str) -> int:
    """The largest ``n`` of any rank."""
    if not active():
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
