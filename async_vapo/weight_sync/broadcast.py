"""Learner side of weight sync: one dedicated group per rollout engine, bucketed broadcast, versions.

Order of events for version ``v`` (driven by the learner's controller):
1. ``snapshot(model)``: the full tensors (ZeRO-3 parameters gathered by the caller) are copied once, so
   training may go on while the copy is broadcast.
2. The controller sends ``WeightUpdate(v, buckets)`` on the control road; the worker drains its in-flight
   requests, then joins the broadcast through ``collective_rpc``.
3. ``send(engine, snapshot)`` broadcasts bucket by bucket over that engine's group.
4. The worker loads, resets its prefix cache and answers ``WeightAck(v)``; only then does the controller
   count the engine at version ``v``.

Every engine has its own group (learner rank 0 + the engine's workers), so one dead engine costs a timeout
on its own group and is then skipped, never a stuck broadcast to the others.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from async_vapo.weight_sync.buckets import BucketMeta, pack, plan_buckets
from async_vapo.weight_sync.group import GroupSpec, broadcast, join_group


@dataclass
class Snapshot:
    version: int
    tensors: dict[str, torch.Tensor]
    buckets: list[BucketMeta]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def snapshot(version: int, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Snapshot:
    tensors = {
        name: t.detach().to("cpu" if t.device.type == "cpu" else t.device, copy=True).contiguous()
        for name, t in named_tensors
    }
    return Snapshot(version, tensors, plan_buckets(tensors.items(), bucket_bytes))


class EngineLink:
    """The learner's end of one engine's weight group."""

    def __init__(self, spec: GroupSpec) -> None:
        self.spec = spec
        self.pg = None

    def connect(self) -> None:
        """Blocks until the engine's workers joined (or raises after the group timeout)."""
        self.pg = join_group(self.spec, rank=0)

    def send(self, snap: Snapshot) -> float:
        if self.pg is None:
            raise RuntimeError("EngineLink.connect() was not called")
        t0 = time.perf_counter()
        for bucket in snap.buckets:
            broadcast(self.pg, pack(bucket, snap.tensors), root=0)
        return time.perf_counter() - t0
