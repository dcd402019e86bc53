"""Masked reductions over response tokens.

Notation used across ``async_vapo.algo``:
    B  number of sequences (responses) in a batch
    T  number of response positions (right padded)
    mask[b, t]  True on real response tokens (EOS included when generated)
    l_b = mask[b].sum()

Every function here is pure: tensors in, tensors out, no ``.item()``, no distributed calls.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is True (entries under the mask are never read)."""
    zeros = torch.zeros_like(x)
    picked = torch.where(mask, x, zeros)
    return picked.sum() if dim is None else picked.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over valid positions; 0 where there are none."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all valid positions (scalar). 0 when fewer than two valid entries."""
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    count = mask.sum().to(x.dtype)
    denom = (count - 1) if unbiased else count
    return torch.where(denom > 0, sq / denom.clamp(min=1), torch.zeros_like(sq))


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over valid positions; positions under the mask come back as 0.

    x, mask: [B, T] -> [B, T]
    """
    return whiten_with(x, mask, masked_mean(x, mask), masked_var(x, mask), shift_mean, eps)


def whiten_with(
    x: Tensor, mask: Tensor, mean: Tensor, var: Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """(x - mean) / sqrt(var + eps) with given statistics (0-dim tensors), 0 under the mask.

    The statistics may come from more than ``x`` (e.g. reduced over data-parallel ranks: see
    ``masked_sum_count`` and ``masked_sq_dev``), so that every shard of a batch is scaled alike.
    """
    std = torch.sqrt(var + eps)
    out = (x - mean) / std if shift_mean else x / std
    return torch.where(mask, out, torch.zeros_like(out))


def masked_sum_count(x: Tensor, mask: Tensor) -> Tensor:
    """[sum of x over valid positions, number of valid positions] as a float [2] tensor (x's dtype),
    the first pass of a mean that can be summed across shards."""
    return torch.stack([masked_sum(x, mask), mask.sum().to(x.dtype)])


def masked_sq_dev(x: Tensor, mask: Tensor, mean: Tensor) -> Tensor:
    """sum over valid positions of (x - mean)^2 (0-dim), the second pass of a shardable variance:
    ``var = sum_shards(sq_dev) / (sum_shards(count) - 1)``."""
    return masked_sum((x - mean) ** 2, mask)
