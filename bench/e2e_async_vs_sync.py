"""Asynchrony that pays: the same run (embedded default, same seed, same number of trained samples),
synchronous (``train.max_staleness=0``: generate, train, broadcast, repeat) and asynchronous
(``max_staleness`` 1 and 2), on the same placement (on 2 cores: one for the learner, one for vLLM).

Figures per run (after ``--warmup`` steps): trained tokens/s (AReaL's effective throughput: only tokens
the learner trained on), generated tokens/s, learner and rollout idle fractions, the staleness histogram
and the time split per step. Then ``speedup`` (async over sync trained tokens/s) and the ideal speedup for
the phase times measured in the synchronous run, ``1 + min(gen, train) / max(gen, train)`` (gen: the
learner's wait for a batch; train: the rest of its step), and how close each run got to it. Writes
``async_vs_sync.png``; prints one JSON object on its last line.

    .venv/bin/python bench/e2e_async_vs_sync.py [--steps 12] [--staleness 0 1 2] [--out runs/bench_async]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# a script: the repository root on the path, for studies.runs
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies.runs import launch, rows, summarise, throughput_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/bench_async")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = ap.parse_args()
    if 0 not in args.staleness:
        ap.error("the synchronous baseline (staleness 0) is needed")
    root = Path(args.out)
    common = [
        *throughput_run(args.steps),
        *args.overrides,
    ]
    runs = {}
    for s in args.staleness:
        out = root / f"staleness_{s}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"run max_staleness={s} ...", file=sys.stderr, flush=True)
        wall = launch(out, [*common, f"train.max_staleness={s}", "train.broadcast_every=1"])
        runs[s] = summarise(out, args.warmup) | {"launcher_wall_s": round(wall, 1)}
        print(f"  {json.dumps(runs[s])}", file=sys.stderr, flush=True)
    sync = runs[0]
    gen = sync["time_per_step"]["wait_data"]
    train = sync["step_seconds_mean"] - gen
    ideal = 1 + min(gen, train) / max(gen, train)
    report = {
        "bench": "e2e_async_vs_sync",
        "steps": args.steps,
        "warmup": args.warmup,
        "sync_phase_s": {"gen": round(gen, 3), "train": round(train, 3)},
        "ideal_speedup": round(ideal, 3),
        "runs": {str(s): r for s, r in runs.items()},
    }
    for s, r in runs.items():
        if s:
            speedup = r["trained_tokens_per_s"] / sync["trained_tokens_per_s"]
            report[f"speedup_staleness_{s}"] = round(speedup, 3)
            report[f"of_ideal_staleness_{s}"] = round(speedup / ideal, 3)
    plot(root, args.staleness, report)
    print(json.dumps(report))


def plot(root: Path, staleness: list[int], report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for s in staleness:
        train = rows(root / f"staleness_{s}", "train")
        t0 = train[0]["time"] - train[0]["step_seconds"]
        xs, total, ys = [], 0, []
        for r in train:
            total += r["trained_tokens"]
            xs.append(r["time"] - t0)
            ys.append(total / 1e3)
        a.plot(xs, ys, marker=".", label=f"max_staleness {s}" + (" (sync)" if s == 0 else ""))
    a.set_xlabel("seconds since the first training step started")
    a.set_ylabel("trained tokens (thousands)")
    a.legend()
    a.set_title(f"ideal speedup {report['ideal_speedup']:.2f}")
    names = [str(s) for s in staleness]
    phases = ["wait_data", "targets", "value_update", "policy_update", "broadcast"]
    bottom = [0.0] * len(names)
    for ph in phases:
        vals = [report["runs"][n]["time_per_step"].get(ph, 0.0) for n in names]
        b.bar(names, vals, bottom=bottom, label=ph)
        bottom = [x + y for x, y in zip(bottom, vals, strict=True)]
    b.set_xlabel("max_staleness")
    b.set_ylabel("seconds per learner step")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "async_vs_sync.png", dpi=110)


if __name__ == "__main__":
    main()
