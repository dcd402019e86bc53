"""Drain vs keep weight updates (``rollout.weight_update``) on the embedded default with a long-tail
``max_tokens``, the cluster simulator checked against both, and the learner's CPU placement.

Four runs of the real launcher, same seed: synchronous (``max_staleness`` 0, the simulator's
calibration), then ``max_staleness`` 1 with draining updates (requests in flight finish under the old
weights before the load), with keep updates (requests in flight are frozen, the weights loaded, and
they continue under the new ones), and keep with the learner on every core (``train.learner_cores=all``,
``train.learner_threads`` = the core count: it takes the cores the engine leaves idle). Per run, after ``--warmup`` steps: trained and generated tokens/s,
rollout and learner idle fractions, the staleness histogram and the fraction of trained responses that
span two versions. Then ``keep_vs_drain`` (trained tokens/s ratio) and ``bench/simulate_cluster.py``'s
predictions for both modes from the synchronous run's rates, with their error against the measured runs
(target: within 20%). Prints one JSON object on its last line.

    .venv/bin/python bench/update_modes.py [--steps 12] [--max-tokens 200] [--out runs/bench_update_modes]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from simulate_cluster import rates_from, simulate

# a script: the repository root on the path, for studies.runs
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies.runs import launch, rows, summarise, throughput_run
from studies.study import finished


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=200, help="rollout.max_tokens (max_model_len is 256)")
    ap.add_argument("--out", default="runs/bench_update_modes")
    ap.add_argument(
        "--reuse", action="store_true", help="keep runs that finished before (recompute the report)"
    )
    args = ap.parse_args()
    root = Path(args.out)
    common = [
        *throughput_run(args.steps),
        "train.broadcast_every=1",
        f"rollout.max_tokens={args.max_tokens}",
    ]
    settings = {
        "sync": ["train.max_staleness=0", "rollout.weight_update=drain"],
        "drain": ["train.max_staleness=1", "rollout.weight_update=drain"],
        "keep": ["train.max_staleness=1", "rollout.weight_update=keep"],
        "keep_all_cores": [
            "train.max_staleness=1",
            "rollout.weight_update=keep",
            "train.learner_cores=all",
            f"train.learner_threads={len(os.sched_getaffinity(0))}",
        ],
    }
    measured = {}
    for name, overrides in settings.items():
        out = root / name
        wall = 0.0
        if not (args.reuse and finished(out)):
            shutil.rmtree(out, ignore_errors=True)
            print(f"run {name} ...", file=sys.stderr, flush=True)
            wall = launch(out, [*common, *overrides])
        train = rows(out, "train")[args.warmup :]
        measured[name] = summarise(out, args.warmup) | {
            "launcher_wall_s": round(wall, 1),
            "version_spanning_frac": round(
                statistics.mean(r.get("version_spanning_frac", 0.0) for r in train), 4
            ),
            "response_length_mean": round(statistics.mean(r["response_length_mean"] for r in train), 1),
            "response_length_max": max(r["response_length_max"] for r in train),
        }
        print(f"  {json.dumps(measured[name])}", file=sys.stderr, flush=True)
    p = rates_from(root / "sync")
    simulated = {mode: simulate(replace(p, update=mode), eta=1) for mode in ("drain", "keep")}
    error = {
        mode: round(simulated[mode]["trained_tokens_per_s"] / measured[mode]["trained_tokens_per_s"] - 1, 3)
        for mode in simulated
    }
    print(f"\n{'run':<16}{'trained tok/s':>15}{'gen tok/s':>11}{'rollout idle':>14}{'learner idle':>14}"
          f"{'spanning':>10}{'simulated':>11}{'error':>8}")  # fmt: skip
    for name, m in measured.items():
        sim = simulated.get(name)
        print(
            f"{name:<16}{m['trained_tokens_per_s']:>15,.0f}{m['generated_tokens_per_s']:>11,.0f}"
            f"{m['rollout_idle_frac']:>14.2f}{m['learner_idle_frac']:>14.2f}{m['version_spanning_frac']:>10.3f}"
            + (f"{sim['trained_tokens_per_s']:>11,.0f}{error[name]:>+8.0%}" if sim else "")
        )
    report = {
        "bench": "update_modes",
        "steps": args.steps,
        "warmup": args.warmup,
        "max_tokens": args.max_tokens,
        "runs": measured,
        "all_cores_vs_own": round(
            measured["keep_all_cores"]["trained_tokens_per_s"] / measured["keep"]["trained_tokens_per_s"], 3
        ),
        "keep_vs_drain": round(
            measured["keep"]["trained_tokens_per_s"] / measured["drain"]["trained_tokens_per_s"], 3
        ),
        "simulated": simulated,
        "simulator_error": error,
        "simulator_within_20pct": all(abs(e) <= 0.2 for e in error.values()),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
