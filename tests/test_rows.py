"""The typed rows of ``metrics.jsonl`` (``async_vapo/rows.py``): rows written before the rows were typed
(taken from a real run's file) come out of the structs exactly as they were, and a metric without a field
is dropped with a warning instead of stopping the run."""

from __future__ import annotations

import json
import math

import pytest

from async_vapo import rows
from async_vapo.metrics import MetricsWriter

# one row per phase from a 2-step run of the launcher (tests/test_e2e.py's sizes) before rows.py existed
PRETRAIN = {"phase": "value_pretrain", "step": -1, "policy_version": 0, "reward_mean": 0.1875, "accuracy": 0.1875,
            "response_length_mean": 29.8125, "response_length_max": 50.0, "clipped_frac": 0.0, "truncated_frac": 0.0,
            "staleness_mean": 0.0, "staleness_max": 0.0, "version_spanning_frac": 0.0, "entropy": 0.21773478388786316,
            "lambda_clamp_frac": 0.0, "lambda_policy_mean": 0.9129583239555359, "explained_variance": 0.0,
            "value_mean": 0.0, "advantage_abs_mean": 0.48508980870246887, "behaviour_kl": 4.650551319908269e-13,
            "value_clip_frac": 0.0, "value_loss": 0.04507337510585785, "value_grad_norm": 0.3689987063407898,
            "step_seconds": 30.99184908499592}  # fmt: skip
EVAL = {"phase": "eval", "step": 0, "policy_version": 0, "eval_accuracy": 0.34375, "eval_pass@2": 0.375,
        "eval_problems": 32, "eval_missing": 0, "eval_samples": 2, "time": 1796307915.834397}  # fmt: skip
TRAIN = {"phase": "train", "step": 0, "policy_version": 1, "reward_mean": 0.0, "accuracy": 0.0,
         "response_length_mean": 54.15625, "response_length_max": 70.0, "clipped_frac": 0.0, "truncated_frac": 0.0,
         "staleness_mean": 0.0, "staleness_max": 0.0, "version_spanning_frac": 0.0, "trained_sequences": 32,
         "value_clip_frac": 0.0, "value_loss": 7.278369139385177e-06, "value_grad_norm": 0.017612574622035027,
         "lambda_clamp_frac": 0.0, "lambda_policy_mean": 0.9626981616020203, "explained_variance": 0.0,
         "value_mean": 0.0022120631765574217, "advantage_abs_mean": 0.8054898381233215, "clip_frac_low": 0.0,
         "clip_frac_high": 0.0, "approx_kl": 0.0, "iw_mean": 1.0, "iw_max": 1.0000133514404297,
         "iw_truncated_frac": 0.0, "nll_loss": 0.0, "policy_loss": -7.043872329859369e-08,
         "policy_grad_norm": 3.4321658611297607, "entropy": 0.25335073471069336, "behaviour_kl": 7.059982481440186e-13,
         "learner_idle_frac": 0.0048387048940219226, "rollout_idle_frac": None, "trained_tokens": 1733,
         "trained_tokens_per_s": 1379.8582059603254, "generated_tokens_total": 6446,
         "step_seconds": 1.2559261469868943, "time_wait_data": 0.006077055993955582,
         "time_fused_update": 1.2463376380037516, "time_broadcast": 0.00281425699358806, "staleness_hist": {"0": 16},
         "buffer_queue_depth": 5, "rejected_stale": 0, "filtered": 23, "rejected_frames": 0,
         "rejected_frames_by_reason": {}, "weight_syncs": 0, "worker_versions": {"rollout-0": 0},
         "worker_owners": {"rollout-0": 0}, "groups_by_worker": {"rollout-0": 44},
         "controller_counters": {"group_admitted": 21, "verdict_wrong": 137, "verdict_ok": 28,
                                 "verdict_no_answer": 11, "group_filtered": 23},
         "ledger": {"issued": 47, "trained": 16, "filtered": 23}, "weight_sync_s_per_MB": 0.0,
         "weight_sync_MB": 0.0,  # added after the rows were typed
         "time": 1796307917.0922341}  # fmt: skip
KINDS = {"value_pretrain": rows.PretrainRow, "train": rows.TrainRow}


@pytest.mark.parametrize("before", [PRETRAIN, TRAIN, EVAL], ids=["value_pretrain", "train", "eval"])
def test_rows_are_written_as_before_they_were_typed(tmp_path, before):
    fields = {k: v for k, v in before.items() if k != "phase"}
    if before["phase"] == "eval":
        fields["eval_pass_at_k"] = fields.pop("eval_pass@2")
        row: rows.Row = rows.EvalRow(**fields)
    else:
        row = rows.make(KINDS[before["phase"]], fields)  # as the learner builds them: from metric dicts
    writer = MetricsWriter(tmp_path, 2)
    writer.write(row)
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == before
    assert next(iter(json.loads(line))) == "phase"
    assert rows.to_dict(rows.parse(before)) == before  # and read back


def test_unset_metrics_are_left_out_and_non_finite_ones_are_null():
    fields = {
        k: v for k, v in PRETRAIN.items() if k not in ("phase", "lambda_clamp_frac", "lambda_policy_mean")
    }
    out = rows.to_dict(rows.make(rows.PretrainRow, fields | {"value_loss": math.inf}))
    assert "lambda_clamp_frac" not in out and out["value_loss"] is None
    assert out["explained_variance"] == 0.0


def test_a_metric_without_a_field_is_dropped_with_a_warning_and_the_row_written(capsys):
    fields = {k: v for k, v in PRETRAIN.items() if k != "phase"}
    out = rows.to_dict(rows.make(rows.PretrainRow, fields | {"brand_new_metric": 1.0}))
    assert "brand_new_metric" not in out and out["value_loss"] == PRETRAIN["value_loss"]
    assert "brand_new_metric" in capsys.readouterr().out  # named once, in the learner's log


def test_a_missing_required_field_is_an_error():
    with pytest.raises(TypeError, match="step_seconds"):
        rows.make(rows.PretrainRow, {k: v for k, v in PRETRAIN.items() if k not in ("phase", "step_seconds")})


def update_metrics_have_fields(steps: list[dict]) -> list[str]:
    """The keys of the update functions' metrics (``tests/learner_harness.py`` steps) that a training row
    has no field for (the harness adds ``advantages`` and ``lengths`` of its own)."""
    known = set(rows.TrainRow.__struct_fields__)
    return sorted({k for s in steps for k in s} - known - {"advantages", "lengths"})
