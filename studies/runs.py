"""Shared by the end-to-end benchmarks: run the real launcher, read its metrics, summarise a run."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def launch(out: Path, overrides: list[str], config: str | None = None, timeout_s: float = 3600) -> float:
    """Run ``python -m async_vapo.launch`` to completion; returns its wall time. Raises on failure."""
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    )
    cmd = [sys.executable, "-m", "async_vapo.launch", "--output-dir", str(out)]
    if config:
        cmd += ["--config", config]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (out / "launcher.log").open("w") as log:
        res = subprocess.run(
            [*cmd, *overrides], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout_s
        )
    if res.returncode != 0:
        tail = (out / "launcher.log").read_text()[-3000:]
        raise RuntimeError(f"run {out} failed with exit code {res.returncode}:\n{tail}")
    return time.perf_counter() - t0


def throughput_run(steps: int) -> list[str]:
    """Overrides of the end-to-end throughput benchmarks: ``steps`` training steps, a short value
    pretraining, no evaluation and no checkpoint (nothing but the pipeline's steady state)."""
    return [
        f"train.total_steps={steps}",
        "algo.value_pretrain_steps=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
    ]


def rows(out: Path, phase: str | None = None) -> list[dict[str, Any]]:
    all_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in all_rows if phase is None or r["phase"] == phase]


def summarise(out: Path, warmup: int) -> dict[str, Any]:
    """Steady-state figures of a run, after ``warmup`` training steps (engine and allocator warm-up)."""
    train = rows(out, "train")
    if len(train) <= warmup + 1:
        raise ValueError(f"{out}: {len(train)} training steps, need more than warmup + 1 = {warmup + 1}")
    first, measured = train[warmup - 1] if warmup else None, train[warmup:]
    t_start = first["time"] if first else measured[0]["time"] - measured[0]["step_seconds"]
    wall = measured[-1]["time"] - t_start
    gen0 = first["generated_tokens_total"] if first else 0
    step_s = [r["step_seconds"] for r in measured]
    phases = sorted({k for r in measured for k in r if k.startswith("time_")})
    return {
        "steps_measured": len(measured),
        "wall_s": round(wall, 2),
        "trained_tokens_per_s": round(sum(r["trained_tokens"] for r in measured) / wall, 1),
        "generated_tokens_per_s": round((measured[-1]["generated_tokens_total"] - gen0) / wall, 1),
        "step_seconds_mean": round(statistics.mean(step_s), 3),
        "learner_idle_frac": round(sum(r["time_wait_data"] for r in measured) / sum(step_s), 3),
        "rollout_idle_frac": round(
            statistics.mean(r["rollout_idle_frac"] for r in measured if r["rollout_idle_frac"] is not None), 3
        ),
        "staleness_hist": measured[-1]["staleness_hist"],
        "time_per_step": {
            k.removeprefix("time_"): round(statistics.mean(r[k] for r in measured), 3) for k in phases
        },
        "reward_mean_last": round(measured[-1]["reward_mean"], 4),
    }
