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

from async_vapo.weight_sync.buckets import BucketMeta, empty_flat, plan_buckets, unpack
from async_vapo.weight_sync.group import GroupSpec, WeightGroup, broadcast, join_group


@dataclass
class Snapshot:
    """Weights of one version, already laid out as the flat buffers that go on the wire."""

    version: int
    buckets: list[BucketMeta]
    flats: list[torch.Tensor]  # one contiguous buffer per bucket

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.flats)


def snapshot(version: int, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Snapshot:
    """Copy the tensors once, straight into their bucket buffers (on the tensors' device), so training
    may go on while the copy is broadcast and sending costs no further copy."""
    named = [(n, t.detach()) for n, t in named_tensors]
    buckets = plan_buckets(named, bucket_bytes)
    by_name = dict(named)
    flats = []
    for bucket in buckets:
        flat = empty_flat(bucket, by_name[bucket[0][0]].device)
        for name, view in unpack(bucket, flat):
            view.copy_(by_name[name])
        flats.append(flat)
    return Snapshot(version, buckets, flats)


class EngineLink:
    """The learner's end of one engine's weight group (its rank 0). ``serve_store=False``: the store is
    served elsewhere (by the controller, for a group owned by another learner rank)."""

    def __init__(self, spec: GroupSpec, serve_store: bool = True) -> None:
        self.spec = spec
        self.serve_store = serve_store
        self.pg: WeightGroup | None = None

    def connect(self) -> None:
        """Blocks until the engine's workers joined (or raises after the group timeout)."""
        self.pg = join_group(self.spec, rank=0, serve=self.serve_store)

    def send(self, snap: Snapshot) -> float:
        if self.pg is None:
            raise RuntimeError("EngineLink.connect() was not called")
        t0 = time.perf_counter()
        for flat in snap.flats:
            broadcast(self.pg, flat, root=0)
        return time.perf_counter() - t0
