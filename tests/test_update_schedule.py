"""The update schedule's pure parts: whole groups into exactly ``n`` equal mini-batches, micro-batches
padded to the ranks' common number of passes and cut from length-sorted rows, and the config check that
keeps ranks in step."""

from __future__ import annotations

import pytest
import torch

from async_vapo.config import ConfigError, check_learner_split, load_config
from async_vapo.learner.batch import Batch
from async_vapo.learner.forward import Micro
from async_vapo.learner.schedule import (
    UnevenSplitError,
    length_order,
    micro_slices,
    split_mini_batches,
    sweep,
)


def test_mini_batches_hold_whole_groups_in_equal_numbers():
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5, 5, 5])  # uneven group sizes
    parts = split_mini_batches(group_ids, 3, seed=7)
    assert len(parts) == 3
    assert sorted(torch.cat(parts).tolist()) == list(range(len(group_ids)))  # every row exactly once
    for rows in parts:
        assert len(torch.unique(group_ids[rows])) == 2
    for g in range(6):  # a group never spans two mini-batches
        assert sum(bool((group_ids[rows] == g).any()) for rows in parts) == 1
    assert [p.tolist() for p in parts] == [p.tolist() for p in split_mini_batches(group_ids, 3, seed=7)]


def test_a_split_that_is_not_even_raises_instead_of_returning_fewer_mini_batches():
    # torch.chunk would give 3 chunks for 5 groups split 4 ways; ranks would then step a different number of times
    with pytest.raises(UnevenSplitError, match="multiple of"):
        split_mini_batches(torch.arange(5), 4, seed=0)


def test_micro_slices_pad_to_the_ranks_passes():
    assert micro_slices(5, 2, 3) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert micro_slices(3, 2, 4) == [slice(0, 2), slice(2, 4), None, None]
    with pytest.raises(ValueError):
        micro_slices(9, 2, 3)


def _rows(lengths: list[int]) -> Batch:
    """A batch whose only meaningful fields are the rows' lengths (attention) and their ids (group_ids)."""
    n, width = len(lengths), max(lengths)
    attn = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    zeros = torch.zeros((n, 1))
    return Batch(
        attn, attn, zeros.long(), zeros.long(), zeros.bool(), zeros, zeros.long(),
        torch.zeros(n), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), torch.arange(n),
    )  # fmt: skip


def test_forward_sweeps_cut_length_sorted_micro_batches_and_return_rows_in_order():
    lengths = [9, 2, 30, 4, 4, 17, 1]
    b = _rows(lengths)
    row_lengths = torch.tensor(lengths)
    assert length_order(row_lengths, Micro(sequences=3)).tolist() == [6, 1, 3, 4, 0, 5, 2]  # stable
    assert length_order(row_lengths, Micro(tokens=64)).tolist() == list(range(7))  # packed: as they come
    seen: list[list[int]] = []

    def fn(ub: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(ub.attention_mask.sum(1).tolist())
        return ub.group_ids, ub.attention_mask.sum(1)

    rows, lens = sweep(b, Micro(sequences=3), fn)
    assert seen == [[1, 2, 4], [4, 9, 17], [30]]  # micro-batches of similar lengths
    assert rows.tolist() == list(range(7)) and lens.tolist() == lengths  # back in the batch's order


def test_groups_per_step_must_split_over_ranks_and_mini_batches():
    cfg = load_config(None, ["train.groups_per_step=12", "train.mini_batches=3"])
    check_learner_split(cfg, 4)  # 12 = 4 x 3
    with pytest.raises(ConfigError, match=r"train.groups_per_step \(12\) must be a multiple"):
        check_learner_split(cfg, 3)


def test_sampling_settings_the_learner_cannot_correct_are_refused():
    with pytest.raises(ConfigError, match="temperature"):
        load_config(None, ["rollout.temperature=0"])
    with pytest.raises(ConfigError, match="top_p"):
        load_config(None, ["rollout.top_p=0"])
