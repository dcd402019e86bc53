"""The dedicated process group between learner rank 0 and one rollout engine's workers.

It lives outside any global ``torch.distributed`` world (the learner's DeepSpeed world and vLLM's own
parallel groups stay untouched): a ``TCPStore`` served by the learner (a ``FileStore`` in the run
directory when everything is on one machine: a ``TCPStore`` listens on every interface) plus a gloo group
on CPU, an NCCL communicator on GPUs. Rank 0 is always the learner; engine worker ``i`` is rank ``1 + i``.

A peer that never joins or stops answering surfaces as a ``RuntimeError`` after ``timeout`` seconds,
never as a hang, on both backends, through one code path (``wait_work``):
- gloo enforces the group's timeout itself and ``Work.wait()`` blocks the host until the collective ends;
- NCCL does neither the way the caller needs: ``Work.wait()`` only orders the current CUDA stream behind the
  collective and returns at once, and a collective past the communicator's own timeout makes the NCCL
  watchdog tear down the whole process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``), taking the learner rank with
  the dead engine. So the host polls ``Work.is_completed()`` against its own deadline (``timeout_s``); at the
  deadline it aborts only this group's communicator and raises. The communicator's timeout is set to
  ``NCCL_WATCHDOG_FACTOR`` x that deadline, so the watchdog never fires first. Success is reported only
  after the collective completed (and, on CUDA, the stream was synchronised), never when it was queued.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

NCCL_WATCHDOG_FACTOR = 3.0  # the communicator's own timeout, as a multiple of the host-side deadline
POLL_S = 0.002


class CollectiveTimeout(RuntimeError):
    """A weight-group collective did not complete by its deadline; the group was aborted."""


@dataclass
class WeightGroup:
    """A joined weight group: the backend's process group and the host-side deadline of its collectives."""

    pg: Any
    deadline_s: float

    def broadcast(self, tensor: torch.Tensor, root: int) -> Any:
        return self.pg.broadcast(tensor, root)

    def abort(self) -> None:
        self.pg.abort()


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


def join_group(spec: GroupSpec, rank: int, serve: bool | None = None) -> WeightGroup:
    """Join (rank 0 serves the store unless ``serve`` says otherwise)."""
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
        pg = dist.ProcessGroupGloo(store, rank, spec.world_size, timedelta(seconds=spec.timeout_s))
        return WeightGroup(pg, spec.timeout_s)
    if spec.backend == "nccl":
        return WeightGroup(_nccl_group(store, rank, spec), spec.timeout_s)
    raise ValueError(f"unknown weight-sync backend {spec.backend!r}; valid: 'gloo', 'nccl'")


def _nccl_group(store, rank: int, spec: GroupSpec):  # pragma: no cover - needs GPUs
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timedelta(seconds=spec.timeout_s * NCCL_WATCHDOG_FACTOR)
    return dist.ProcessGroupNCCL(store, rank, spec.world_size, opts)


def wait_work(work: Any, timeout_s: float, pg: Any = None, what: str = "collective") -> None:
    """Block the host until ``work`` has completed, for at most ``timeout_s``; then raise its error if
    it failed. At the deadline ``pg`` (if given) is aborted (only that group) and ``CollectiveTimeout``
    raised. Polls ``is_completed()``: on NCCL ``wait()`` would return before the collective ran."""
    deadline = time.monotonic() + timeout_s
    pause = POLL_S / 64  # short first (a bucket usually completes within a millisecond), then POLL_S
    while not work.is_completed():
        if time.monotonic() > deadline:
            if pg is not None and hasattr(pg, "abort"):
                # the group is unusable either way; the caller drops the peer
                with contextlib.suppress(Exception):
                    pg.abort()
            raise CollectiveTimeout(f"{what} did not complete in {timeout_s:.0f} s; the group was aborted")
        time.sleep(pause)
        pause = min(POLL_S, pause * 2)
    work.wait()  # raises the collective's own error (a peer that died mid-broadcast)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


def broadcast(group: WeightGroup, tensor: torch.Tensor, root: int = 0) -> None:
    """In-place broadcast of one contiguous tensor over ``group``; returns once it completed, raises on a
    failure or past the group's deadline (``wait_work``)."""
    wait_work(group.broadcast(tensor, root), group.deadline_s, group, "weight broadcast")
