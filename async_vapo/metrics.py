"""What a user sees and keeps: ``metrics.jsonl`` (one object per learner step or evaluation), PNG
learning curves, a one-line live progress display and ``samples.jsonl`` (what the model wrote: one row
per response of the groups logged every ``train.log_samples_every`` steps)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from async_vapo.rows import Row, to_dict
from async_vapo.tracking import Fanout, Sink

CURVES = [
    ("reward_mean", "reward"),
    ("eval_accuracy", "held-out accuracy"),
    ("response_length_mean", "response length"),
    ("entropy", "entropy"),
    ("value_loss", "value loss"),
    ("explained_variance", "explained variance"),
    ("staleness_mean", "staleness (mean)"),
    ("accuracy", "train accuracy"),
]


class MetricsWriter:
    """Rows to ``metrics.jsonl`` and to the tracking sinks (``async_vapo.tracking``), curves to PNG."""

    def __init__(self, out_dir: Path, total_steps: int, sinks: list[Sink] | None = None) -> None:
        self.out_dir = out_dir
        self.sinks = Fanout(sinks or [])
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self.samples_path = out_dir / "samples.jsonl"
        self.total_steps = total_steps
        self.t0 = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def rewind(self, step: int, value_pretrained: bool = True) -> None:
        """On resume from a checkpoint whose next step is ``step``: forget the rows of steps the
        checkpoint does not contain (trained after it, before the run died); they are trained again.
        Value-Pretraining's rows go too when it is done again (no checkpoint had finished it)."""
        keep = [
            r
            for r in self.rows
            if (r.get("phase") == "value_pretrain" and value_pretrained)
            or (r.get("phase") != "value_pretrain" and r.get("step", 0) < step)
        ]
        if len(keep) != len(self.rows):
            self.rows = keep
            _rewrite(self.path, keep)
        if self.samples_path.exists():
            rows = [json.loads(line) for line in self.samples_path.read_text().splitlines() if line.strip()]
            _rewrite(self.samples_path, [r for r in rows if r.get("step", 0) < step])

    def samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """Append sample rows (``sample_rows``) to ``samples.jsonl`` and hand them to the sinks' tables."""
        with self.samples_path.open("a") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.sinks.table("samples", rows, step)

    def write(self, row: Row | dict[str, Any]) -> None:
        """One row (``async_vapo.rows``; a plain dict is written as it is, non-finite floats as null)."""
        d = to_dict(row) if isinstance(row, Row) else row
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
        self.rows.append(clean)
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        self.sinks.log(clean)

    def close(self) -> None:
        self.plot()
        self.sinks.close()

    def progress(self, row: dict[str, Any], first_step: int) -> None:
        step = row["step"]
        elapsed = time.perf_counter() - self.t0
        done = max(1, step - first_step + 1)
        eta = elapsed / done * max(0, self.total_steps - step - 1)
        line = (
            f"step {step + 1}/{self.total_steps} | reward {row.get('reward_mean', 0):.3f} "
            f"| acc {row.get('accuracy', 0):.3f} | stale {row.get('staleness_mean', 0):.2f} "
            f"| {row.get('trained_tokens_per_s', 0):,.0f} tok/s | v{row.get('policy_version', 0)} "
            f"| eta {eta / 60:.1f} min"
        )
        end = "\r" if sys.stderr.isatty() else "\n"
        print(line.ljust(100), end=end, file=sys.stderr, flush=True)

    def plot(self) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover
            return None
        out = self.out_dir / "curves.png"
        fig, axes = plt.subplots(2, 4, figsize=(16, 7))
        for ax, (key, title) in zip(axes.flat, CURVES, strict=True):
            pts = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = out.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        tmp.replace(out)
        return out


def _rewrite(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


class SampleRow(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One sampled response as ``samples.jsonl`` holds it: the training run's rows (``sample_rows``) and
    ``python -m async_vapo.eval --output``'s (which have no step, worker or versions) share it."""

    step: int | None = None
    policy_version: int | None = None
    uid: str
    worker_id: str | None = None
    sample: int  # the response's index in its group
    prompt: str  # as the model saw it (template and special tokens included)
    response: str
    answer: str
    reward: float
    correct: bool
    verdict: str
    finish_reason: str | None = None
    tokens: int | None = None
    versions: list[int] | None = None  # the oldest and newest policy version that sampled its tokens

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


def sample_rows(group: Any, tokenizer: Any, step: int, version: int) -> list[dict[str, Any]]:
    """One row per response of a trained ``TrajectoryGroup``: the prompt and response as text, the
    reward and verdict the worker gave it, why it ended, and the oldest and newest policy version that
    sampled its tokens (``versions``: one version when it was sampled by one policy)."""
    from async_vapo.protocol import unpack_i32

    prompt = str(tokenizer.decode(unpack_i32(group.prompt.token_ids).tolist(), skip_special_tokens=False))
    rows = []
    for i, r in enumerate(group.responses):
        versions = unpack_i32(r.versions)
        row = SampleRow(
            step=step,
            policy_version=version,
            uid=group.prompt.uid,
            worker_id=group.worker_id,
            sample=i,
            prompt=prompt,
            response=str(tokenizer.decode(unpack_i32(r.token_ids).tolist(), skip_special_tokens=True)),
            answer=group.prompt.answer,
            reward=r.reward,
            correct=r.correct,
            verdict=r.verdict,
            finish_reason=r.finish_reason,
            tokens=len(versions),
            versions=[int(versions.min()), int(versions.max())] if len(versions) else [],
        )
        rows.append(row.to_dict())
    return rows
