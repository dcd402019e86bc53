"""The rows of ``metrics.jsonl``: one typed struct per phase (``value_pretrain``, ``train``, ``eval``).

These are the contract between the learner that writes the rows and everything that reads them
(``metrics.py``'s curves and progress line, ``tracking.py``, ``bench/``, the tests). A row is written as one
JSON object: ``phase`` first (the struct's tag), then its fields in the order below; a metric the run's
configuration does not produce (no critic: no value metrics; the unfused update: no ``time_fused_update``)
is ``UNSET`` and left out, and a non-finite float is written as ``null``. ``parse`` reads a row back.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import structlog
from msgspec import UNSET, UnsetType

log = structlog.get_logger(__name__)

Opt = float | UnsetType  # a metric only some configurations produce


class Row(msgspec.Struct, kw_only=True, tag_field="phase"):
    step: int
    policy_version: int

    def renamed(self) -> dict[str, str]:
        """Fields whose JSON key depends on the row's values (field -> key)."""
        return {}


class BatchRow(Row, kw_only=True):
    """The trained batch's own statistics (``learner.timing.batch_metrics``)."""

    reward_mean: float
    accuracy: float
    response_length_mean: float
    response_length_max: float
    clipped_frac: float  # responses at rollout.max_tokens
    truncated_frac: float  # responses cut by the engine (finish reason "length")
    staleness_mean: float  # learner version - the oldest token's version
    staleness_max: float
    version_spanning_frac: float  # responses continued across a weight update (weight_update=keep)


class UpdateRow(BatchRow, kw_only=True):
    """What the targets and the updates report (``learner.targets``, ``learner.update``)."""

    value_clip_frac: Opt = UNSET
    value_loss: Opt = UNSET
    value_grad_norm: Opt = UNSET
    lambda_clamp_frac: Opt = UNSET
    lambda_policy_mean: Opt = UNSET
    explained_variance: Opt = UNSET
    value_mean: Opt = UNSET
    advantage_abs_mean: Opt = UNSET
    vtrace_rho_mean: Opt = UNSET
    clip_frac_low: Opt = UNSET
    clip_frac_high: Opt = UNSET
    approx_kl: Opt = UNSET
    iw_mean: Opt = UNSET
    iw_max: Opt = UNSET
    iw_truncated_frac: Opt = UNSET
    nll_loss: Opt = UNSET
    policy_loss: Opt = UNSET
    policy_grad_norm: Opt = UNSET
    entropy: Opt = UNSET
    behaviour_kl: Opt = UNSET


class PretrainRow(UpdateRow, kw_only=True, tag="value_pretrain"):
    """A Value-Pretraining step; ``step`` counts up to -1 (the first policy step is 0)."""

    step_seconds: float


class TrainRow(UpdateRow, kw_only=True, tag="train"):
    """A policy step: the update, throughput and timings, and the controller's side."""

    trained_sequences: int
    learner_idle_frac: float  # of the step, waiting for a batch
    rollout_idle_frac: float | None  # of the engines' time alive during the step (None: none alive)
    trained_tokens: int
    trained_tokens_per_s: float
    generated_tokens_total: int
    step_seconds: float
    time_wait_data: Opt = UNSET
    time_fused_update: Opt = UNSET
    time_targets: Opt = UNSET
    time_value_update: Opt = UNSET
    time_policy_update: Opt = UNSET
    time_broadcast: Opt = UNSET
    # the controller's (controller.metrics.ControllerMetrics)
    staleness_hist: dict[str, int]
    buffer_queue_depth: int
    rejected_stale: int
    filtered: int
    rejected_frames: int
    rejected_frames_by_reason: dict[str, int]
    weight_syncs: int
    worker_versions: dict[str, int]
    worker_owners: dict[str, int]
    groups_by_worker: dict[str, int]
    controller_counters: dict[str, int]
    ledger: dict[str, int]
    weight_sync_s_per_MB: float
    weight_sync_MB: float  # sent to one engine per update (the model, or a LoRA adapter alone)
    time: float


class EvalRow(Row, kw_only=True, tag="eval"):
    """An evaluation round on the held-out prompts."""

    eval_accuracy: float  # avg@k
    eval_pass_at_k: float  # written as ``eval_pass@<k>``
    eval_problems: int
    eval_missing: int  # prompts whose groups did not come back in time
    eval_samples: int  # k
    time: float

    def renamed(self) -> dict[str, str]:
        return {"eval_pass_at_k": f"eval_pass@{self.eval_samples}"}


_warned: set[str] = set()


def make(cls: type[Row], fields: dict[str, Any]) -> Row:
    """``cls(**fields)``, leaving out (with a warning, once per key) what ``cls`` has no field for: a
    metric added without its field is lost from the file, never a reason for the run to stop."""
    known = set(cls.__struct_fields__)
    unknown = sorted(fields.keys() - known - {"phase"})
    if fresh := [k for k in unknown if k not in _warned]:
        _warned.update(fresh)
        log.warning("metrics without a field in async_vapo/rows.py; not written", keys=fresh)
    return cls(**{k: v for k, v in fields.items() if k in known})


def to_dict(row: Row) -> dict[str, Any]:
    """The row as ``metrics.jsonl`` holds it: ``phase`` first, unset metrics left out, renamed keys,
    non-finite floats as None."""
    names = row.renamed()
    out: dict[str, Any] = {}
    for k, v in msgspec.to_builtins(row).items():
        out[names.get(k, k)] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out


def to_json(row: Row) -> str:
    return json.dumps(to_dict(row))


AnyRow = PretrainRow | TrainRow | EvalRow


def parse(d: dict[str, Any]) -> AnyRow:
    """A ``metrics.jsonl`` object as its struct (a ``null`` metric reads back as NaN)."""
    fields = {k: math.nan if v is None and k != "rollout_idle_frac" else v for k, v in d.items()}
    if d.get("phase") == "eval":
        k = f"eval_pass@{d.get('eval_samples')}"
        fields = {("eval_pass_at_k" if key == k else key): v for key, v in fields.items()}
    return msgspec.convert(fields, AnyRow)
