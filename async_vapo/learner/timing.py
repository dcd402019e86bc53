"""A step's timings and the batch's own statistics for its metrics row."""

from __future__ import annotations

import time
from collections import defaultdict

from async_vapo.learner.batch import Batch


def batch_metrics(b: Batch, max_tokens: int, learner_version: int) -> dict[str, float]:
    lengths = b.response_lengths.float()
    oldest = b.versions.masked_fill(~b.mask, learner_version).min(1).values
    newest = b.versions.masked_fill(~b.mask, -1).max(1).values
    stale = (learner_version - oldest).float()
    return {
        "reward_mean": float(b.scores.mean()),
        "accuracy": float(b.correct.float().mean()),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "clipped_frac": float((lengths >= max_tokens).float().mean()),
        "truncated_frac": float(b.truncated.float().mean()),
        "staleness_mean": float(stale.mean()),
        "staleness_max": float(stale.max()),
        # responses continued across a weight update (rollout.weight_update = keep)
        "version_spanning_frac": float((newest > oldest).float().mean()),
    }


class Timer:
    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.spent[name] += time.perf_counter() - self.t0

        return _Ctx()
