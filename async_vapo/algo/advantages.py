"""Value-free baseline: group-normalised advantages (GRPO / DAPO style).

    A_b = (R_b - mean_{g(b)} R) / (std_{g(b)} R + eps), broadcast over the valid tokens of b.

Used as the "value-free" comparison in the ablation table; VAPO itself uses GAE with a value model.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_normalized_advantages(
    scores: Tensor, group_ids: Tensor, mask: Tensor, eps: float = 1e-6, scale_by_std: bool = True
) -> Tensor:
    """scores float [B], group_ids long [B] (same id = same prompt), mask bool [B, T] -> [B, T].

    A group whose rewards are all equal gets advantage 0 for every member.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    zeros = scores.new_zeros(n_groups)  # on the scores' device: the learner runs this on GPUs
    counts = zeros.index_add(0, inverse, torch.ones_like(scores))
    sums = zeros.index_add(0, inverse, scores)
    mean = sums / counts
    dev = scores - mean[inverse]
    sq = zeros.index_add(0, inverse, dev**2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    adv = dev / (std[inverse] + eps) if scale_by_std else dev
    return torch.where(mask, adv.unsqueeze(1).expand(mask.shape), scores.new_zeros(()))
