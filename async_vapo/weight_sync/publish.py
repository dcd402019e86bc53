"""Streamed publish: a model's weights leave the learner one bucket at a time.

With ZeRO-3 no rank holds the whole model, and gathering all of it at once (then copying it into a
snapshot) needs two full copies on one device: about 2 x 61 GiB for a 32B model in bf16. Here every learner
rank walks the same bucket plan; for each bucket all ranks gather just that bucket's parameters
(``deepspeed.zero.GatheredParameters``, a no-op for ZeRO 0-2), the sending rank copies them into one flat
buffer, hands it to ``send`` (a broadcast to every engine that takes this update) and releases both before
the next bucket. Peak extra memory on the sending rank: the gathered bucket + its flat copy, about
2 x ``bucket_bytes`` (plus the largest single tensor, which gets a bucket of its own).

Training does not go on while a bucket is sent: the gather is a collective of the learner world, so a
streamed publish is part of the step (``snapshot`` mode overlaps training instead, at the cost of a full
copy of the model on the sending rank; see ``async_vapo.weight_sync.broadcast.snapshot``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from async_vapo.weight_sync.buckets import BucketMeta, empty_flat, plan_bucket_meta, unpack


def full_shape(p: torch.Tensor) -> list[int]:
    """The parameter's full shape, also for a ZeRO-3 partitioned one (``ds_shape``)."""
    return list(getattr(p, "ds_shape", p.shape))


@dataclass
class StreamPlan:
    """The same bucket plan on every rank: bucket ``i`` is ``params[i]`` laid out as ``buckets[i]``."""

    buckets: list[BucketMeta]
    params: list[list[torch.nn.Parameter]]

    @classmethod
    def of(cls, named_params: Iterable[tuple[str, torch.nn.Parameter]], bucket_bytes: int) -> StreamPlan:
        named = list(named_params)
        buckets = plan_bucket_meta(((n, p.dtype, full_shape(p)) for n, p in named), bucket_bytes)
        by_name = dict(named)
        return cls(buckets, [[by_name[n] for n, _, _ in b] for b in buckets])

    @property
    def nbytes(self) -> int:
        return sum(
            int(torch.Size(shape).numel()) * p.dtype.itemsize
            for b, ps in zip(self.buckets, self.params, strict=True)
            for (_, _, shape), p in zip(b, ps, strict=True)
        )


def zero3_gather(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def stream_publish(
    plan: StreamPlan,
    send: Callable[[torch.Tensor], None] | None,
    device: torch.device | str,
    gather: Callable[[list[torch.nn.Parameter]], contextlib.AbstractContextManager[Any]] = zero3_gather,
) -> int:
    """Walk the plan on every rank (``gather`` is a collective); the rank with ``send`` copies each
    gathered bucket into a flat buffer and sends it before the next bucket is gathered. Returns the
    bytes sent (0 on the other ranks)."""
    sent = 0
    for meta, params in zip(plan.buckets, plan.params, strict=True):
        with gather(params), torch.no_grad():
            if send is None:
                continue
            flat = empty_flat(meta, device)
            for (_, view), p in zip(unpack(meta, flat), params, strict=True):
                view.copy_(p.detach().reshape(view.shape))
            send(flat)
            sent += flat.numel() * flat.element_size()
            del flat
    return sent
