"""Packing named tensors into flat, single-dtype buckets for broadcast, and unpacking them.

A bucket's metadata is ``[(name, dtype, shape), ...]``; every tensor in it shares the dtype, and the flat
buffer is their concatenation in order. Bucketing turns hundreds of small collectives into a few large ones
(the per-call latency dominates small tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

BucketMeta = list[tuple[str, str, list[int]]]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[BucketMeta]:
    """Greedy in-order packing; a tensor larger than ``bucket_bytes`` gets a bucket of its own.
    ``bucket_bytes`` <= 0 means one tensor per bucket (the per-tensor baseline)."""
    return plan_bucket_meta(((n, t.dtype, list(t.shape)) for n, t in tensors), bucket_bytes)


def plan_bucket_meta(
    items: Iterable[tuple[str, torch.dtype, list[int]]], bucket_bytes: int
) -> list[BucketMeta]:
    """``plan_buckets`` from (name, dtype, full shape): for tensors that are not materialised here, such
    as ZeRO-3 partitioned parameters (whose full shape is ``ds_shape``)."""
    buckets: list[BucketMeta] = []
    current: BucketMeta = []
    size, dtype = 0, None
    for name, dt, shape in items:
        nbytes = _numel(shape) * dt.itemsize
        dn = dtype_name(dt)
        if current and (bucket_bytes <= 0 or size + nbytes > bucket_bytes or dn != dtype):
            buckets.append(current)
            current, size = [], 0
        current.append((name, dn, list(shape)))
        size += nbytes
        dtype = dn
    if current:
        buckets.append(current)
    return buckets


def bucket_nbytes(bucket: BucketMeta) -> int:
    return sum(_numel(shape) * _DTYPES[dt].itemsize for _, dt, shape in bucket)


def empty_flat(bucket: BucketMeta, device: str | torch.device = "cpu") -> torch.Tensor:
    numel = sum(_numel(shape) for _, _, shape in bucket)
    return torch.empty(numel, dtype=_DTYPES[bucket[0][1]], device=device)


def unpack(bucket: BucketMeta, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for name, _, shape in bucket:
        n = _numel(shape)
        yield name, flat[offset : offset + n].view(shape)
        offset += n


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class FlatPool:
    """Receive buffers kept from one update to the next: every update of a model has the same bucket
    plan, so after the first one no memory is allocated (on CPU, no page is faulted in) again."""

    def __init__(self) -> None:
        self._flats: dict[int, torch.Tensor] = {}

    def get(self, index: int, bucket: BucketMeta, device: str | torch.device = "cpu") -> torch.Tensor:
        numel = sum(_numel(shape) for _, _, shape in bucket)
        flat = self._flats.get(index)
        if (
            flat is None
            or flat.numel() != numel
            or flat.dtype != _DTYPES[bucket[0][1]]
            or flat.device != torch.device(device)
        ):
            flat = self._flats[index] = empty_flat(bucket, device)
        return flat

    def clear(self) -> None:
        self._flats.clear()
