"""Saving under ZeRO-3 never gathers the whole model: the policy's Hugging Face export and the critic's
save on two real DeepSpeed ranks (gloo, CPU), and loading the export back partitioned, measured against the old whole-model gather in the same run
(``bench/zero3_export.py``; rank 0's resident memory stands in for a GPU's)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

pytestmark = pytest.mark.slow


def test_export_and_value_save_gather_one_parameter_at_a_time():
    from zero3_export import zero3_export

    # a small vocabulary: the largest parameter (the embedding), gathered whole by design, stays a small
    # share of the model as at 32B (152k x 5,120 of 32.8 B parameters: 2.4%)
    f = zero3_export(layers=6, hidden=1024, vocab=8000, shards=32)
    for name in ("export", "save"):
        assert f[f"{name}_files_identical"], f  # the same tensors as save_pretrained after a full gather
        assert f[f"{name}_extra_vs_model"] <= 0.25, f  # at most a quarter of the model on rank 0
        # the proxy sees the old path: rank 0 gathers the other rank's half of the model on top of its own
        assert f[f"{name}_whole_gather_extra_vs_model"] >= 0.4, f
    # loading back under ZeRO-3: each rank holds its half and one parameter, never the whole model
    assert f["load_partitioned_identical"] and f["load_whole_identical"], f
    assert f["load_partitioned_peak_extra_vs_model"] <= 0.75, f  # host memory while loading
    assert (
        f["load_partitioned_params_on_rank_vs_model"]
        <= 0.55
        < 0.99
        <= f["load_whole_params_on_rank_vs_model"]
    ), f
    assert f["load_bf16_buffers_identical"] and f["load_bf16_param_dtypes"] == ["torch.bfloat16"], f
