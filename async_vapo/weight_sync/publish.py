"""Streamed publish: a model's weights leave the learner one bucket at a time.

With ZeRO-3 no rank holds the whole model, and gathering all of it at once (then copying it into a
snapshot) needs two full copies on one device: about 2 x 61 GiB for a 32B model in bf16. Here every learner
rank walks the same bucket plan; for each bucket all ranks gather its parameters one at a time
(``deepspeed.zero.GatheredParameters``, a no-op for ZeRO 0-2), the sending rank copies each into one flat
buffer and hands the full buffer to ``send`` (a broadcast to every engine that takes this update) before
the next bucket; a tensor larger than a bucket is sent from its gathered parameter, no copy. Peak extra
memory on the sending rank: about one bucket plus one parameter, or the largest parameter.

Training does not go on while a bucket is sent: the gather is a collective of the learner world, so a
streamed publish is part of the step (``snapshot`` mode overlaps training instead, at the cost of a full
copy of the model on the sending rank; see ``async_vapo.weight_sync.broadcast.snapshot``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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
    # what is sent for a parameter, when not the parameter itself (a LoRA layer's merged weight)
    values: dict[int, Callable[[], torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        named_params: Iterable[tuple[str, torch.nn.Parameter] | tuple[str, torch.nn.Parameter, Any]],
        bucket_bytes: int,
    ) -> StreamPlan:
        """From ``(name, parameter)`` pairs, or ``(name, parameter, value)`` triples whose ``value()``, when
        not None, is the tensor to send for it (``learner.lora.published``)."""
        named = list(named_params)
        buckets = plan_bucket_meta(((x[0], x[1].dtype, full_shape(x[1])) for x in named), bucket_bytes)
        by_name = {x[0]: x[1] for x in named}
        values = {id(x[1]): x[2] for x in named if len(x) == 3 and x[2] is not None}
        return cls(buckets, [[by_name[n] for n, _, _ in b] for b in buckets], values)

    def value(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The tensor sent for ``p`` (gathered by the caller)."""
        fn = self.values.get(id(p))
        return fn() if fn is not None else p.detach()

    @property
    def nbytes(self) -> int:
        return sum(
            int(torch.Size(shape).numel()) * p.dtype.itemsize
            for b, ps in zip(self.buckets, self.params, strict=True)
            for (_, _, shape), p in zip(b, ps, strict=True)
        )


def zero3_gather(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    """Gather ``params`` whole for the duration of the block (a no-op below ZeRO-3). Every caller in the
    package passes one parameter at a time (``stream_publish``, ``learner.export``): at 32B a gather of
    more than one module's weights at once does not fit beside the ZeRO state."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def stream_publish(
    plan: StreamPlan,
    send: Callable[[torch.Tensor], None] | None,
    device: torch.device | str,
    gather: Callable[[list[torch.nn.Parameter]], contextlib.AbstractContextManager[Any]] = zero3_gather,
) -> int:
    """Walk the plan on every rank (``gather`` is a collective, so every rank runs the same gathers);
    the rank with ``send`` sends each bucket before the next one is gathered. Returns the bytes sent (0
    on the other ranks).

    A bucket of one tensor (the embedding, the LM head: larger than a bucket) is sent straight from the
    gathered parameter; a bucket of several is filled one gathered parameter at a time. So the sending rank
    never holds more than one flat bucket plus one gathered parameter, or one large gathered parameter.
    """
    sent = 0
    for meta, params in zip(plan.buckets, plan.params, strict=True):
        with torch.no_grad():
            if len(params) == 1:
                with gather(params):
                    if send is not None:
                        t = plan.value(params[0]).reshape(-1)
                        send(t if t.is_contiguous() else t.contiguous())
                        sent += t.numel() * t.element_size()
                continue
            flat = empty_flat(meta, device) if send is not None else None
            for (_, view), p in zip(
                unpack(meta, flat) if flat is not None else _none(meta), params, strict=True
            ):
                with gather([p]):
                    if view is not None:
                        view.copy_(plan.value(p).reshape(view.shape))
            if send is not None and flat is not None:
                send(flat)
                sent += flat.numel() * flat.element_size()
            del flat
    return sent


def _none(meta: BucketMeta) -> list[tuple[str, None]]:
    return [(name, None) for name, _, _ in meta]
