"""How one batch becomes optimiser steps: epochs, mini-batches of whole groups, micro-batches (by
sequences, or packed by tokens), and the passes every data-parallel rank runs.

``epochs`` passes over the batch; each pass shuffles whole groups into ``mini_batches`` mini-batches (one
optimiser step each); a mini-batch is run as micro-batches whose gradients are accumulated. Data-parallel
ranks run the same number of forward/backward passes (ZeRO-3 gathers parameters in every forward, ZeRO-2
reduces in every backward): a rank with fewer micro-batches than the others runs padding passes (``None``
slices) with zero loss weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from async_vapo import distributed
from async_vapo.learner.batch import Batch
from async_vapo.learner.forward import Micro, token_slices

# mini-batch shuffles: each step's seed spans SEEDS_PER_STEP seeds (its epochs'), and the value update
# shuffles with an offset of its own so that its mini-batches are not the policy update's
SEEDS_PER_STEP = 1000
VALUE_SHUFFLE_OFFSET = 7


@dataclass(frozen=True)
class UpdateSchedule:
    """How one batch becomes optimiser steps (see the module docstring)."""

    epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 64
    seed: int = 0
    shuffle_offset: int = (
        0  # mini-batch shuffles use seeds ``seed * SEEDS_PER_STEP + shuffle_offset + epoch``
    )
    max_tokens_per_micro: int = 0  # > 0: packed micro-batches of whole sequences up to this many tokens
    logit_chunk: int = 0  # > 0: the LM head sees this many response tokens at a time

    @property
    def micro(self) -> Micro:
        return Micro(self.micro_batch_size, self.max_tokens_per_micro, self.logit_chunk)


class UnevenSplitError(ValueError):
    """A batch that cannot be cut into equal mini-batches of whole groups."""


def split_mini_batches(group_ids: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    """Shuffle whole groups (Group-Sampling keeps a prompt's samples together) into exactly ``n``
    mini-batches with the same number of groups each; returns their row indices.

    group_ids long [B] -> n tensors of row indices. Raises ``UnevenSplitError`` when the number of groups
    is not a multiple of ``n`` (ranks would disagree on the number of optimiser steps).
    """
    groups = torch.unique(group_ids)
    if len(groups) == 0 or len(groups) % n:
        raise UnevenSplitError(
            f"{len(groups)} groups cannot be split into {n} equal mini-batches: make train.groups_per_step a "
            "multiple of (learner ranks x train.mini_batches)"
        )
    gen = torch.Generator().manual_seed(seed)
    order = groups[torch.randperm(len(groups), generator=gen).to(groups.device)]
    per = len(groups) // n
    return [torch.isin(group_ids, order[i * per : (i + 1) * per]).nonzero().squeeze(1) for i in range(n)]


def micro_slices(n_rows: int, micro: int, n_passes: int) -> list[slice | None]:
    """The micro-batches of a mini-batch of ``n_rows`` sequences, padded to ``n_passes`` passes
    (``None`` = a padding pass with zero loss weight, so that every rank runs the same passes)."""
    real = [slice(s, s + micro) for s in range(0, n_rows, micro)]
    if len(real) > n_passes:
        raise ValueError(f"{len(real)} micro-batches > {n_passes} passes")
    return real + [None] * (n_passes - len(real))


def rank_slices(b: Batch, micro: Micro) -> list[slice | None]:
    """The micro-batches of ``b`` (by sequences, or by tokens when packed), padded with ``None`` to the
    largest number of micro-batches of any rank (one small all-reduce)."""
    if micro.packed:
        real: list[slice | None] = list(token_slices(b.row_lengths.tolist(), micro.tokens))
    else:
        real = list(micro_slices(b.size, micro.sequences, -(-b.size // micro.sequences)))
    n = distributed.all_max(len(real), b.input_ids.device)
    return real + [None] * (n - len(real))


def length_order(lengths: torch.Tensor, micro: Micro) -> torch.Tensor:
    """The order in which rows of these ``lengths`` (long [B], prompt + response tokens) are cut into
    micro-batches: padded layout, by length (stable), so that each micro-batch is trimmed to rows of
    similar length (``forward.trim``); packed layout, as they come (a pass costs its real tokens either
    way). long [B], a permutation of ``range(B)``."""
    if micro.packed:
        return torch.arange(len(lengths), device=lengths.device)
    return torch.argsort(lengths, stable=True)


def _passes(b: Batch, micro: Micro) -> Iterator[tuple[Batch, bool]]:
    """(micro-batch, is_real) for a forward-only sweep, padded to the ranks' maximum number of passes."""
    for sl in rank_slices(b, micro):
        yield (b.select(sl), True) if sl is not None else (b.select(slice(0, 1)), False)


def sweep(
    b: Batch, micro: Micro, fn: Callable[[Batch], tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, ...]:
    """``fn`` on every micro-batch of ``b``, cut from its rows in ``length_order``; ``fn``'s row-aligned
    outputs concatenated back into ``b``'s row order (padding passes run too, their outputs dropped)."""
    order = length_order(b.row_lengths, micro)
    outs = [(fn(ub), real) for ub, real in _passes(b.select(order), micro)]
    kept = [out for out, real in outs if real]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return tuple(torch.cat(parts)[inverse] for parts in zip(*kept, strict=True))
