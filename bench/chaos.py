"""Chaos: the embedded default trained while faults are injected at random times, then the books audited.

Faults (for ``--minutes`` minutes from the first training step, one every ``--every`` seconds on average,
each kind in turn, at random moments; what each does is
in ``tests/chaos.py``, shared with the suite's ``tests/test_faults.py``): worker SIGKILL, vLLM engine-core
SIGKILL, learner SIGKILL (the launcher restarts the learner world, the workers rejoin with their
engines), hostile well-formed groups, spoofed Hello / WeightAck, an object-heavy frame; and throughout,
a verifier that hangs, raises or returns garbage on about 1 response in 11
(``tests.verifier_fixtures:chaos``) and checkpoints 25 s slower than the weight-sync timeout
(``ASYNC_VAPO_FAULT_SLOW_SAVE``).
The run must finish on its own within ``2 x --minutes + 10`` minutes. Then the audit, from the final
checkpoint's prompt ledger and the last metrics row: every prompt the data cursor passed is trained,
filtered, failed or pending, exactly once (``prompts_lost``, ``prompts_trained_twice``), hostile groups
admitted (``hostile_groups_accepted``: those sent minus those refused or dropped as duplicates, each
learner world audited on its own: ``hostile_books``), and the
growth of learner rank 0's resident memory from the first to the last step (``rss_growth_mb``). Its last
line is one JSON object.

    .venv/bin/python bench/chaos.py [--minutes 6] [--every 20] [--steps N] [--seed 0] [--out runs/bench_chaos]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from soak import rss_mb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the injectors live with the tests (tests/chaos.py)

from tests.chaos import Injector, audit, node_state  # noqa: E402

KINDS = ("worker_kill", "hostile_groups", "engine_kill", "spoofed_control", "learner_kill", "heavy_frame")


def _rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return [r for r in rows if r.get("phase") == "train"]


def _refused(row: dict[str, Any]) -> int:
    """Groups a world's controller refused up to ``row``: against what was issued, or as duplicates."""
    c = row.get("controller_counters", {})
    return sum(v for k, v in c.items() if k.startswith("group_rejected_")) + c.get("group_duplicate", 0)


def hostile_books(
    rows: list[dict[str, Any]], sent: list[tuple[float, int]], kills: list[float]
) -> tuple[int, int, int]:
    """(hostile groups sent whose fate the rows record, groups those rows show refused, hostile groups
    sent whose fate no row records). Each learner world (between two learner kills) counts from zero, and
    its rows after the checkpoint it was restarted from are rewound, so each world is audited on its own:
    the groups sent from its start until a second before its last kept row, against that row's
    counters."""
    audited = refused = unaudited = 0
    bounds = [0.0, *sorted(kills), float("inf")]
    for start, end in itertools.pairwise(bounds):
        world = [r for r in rows if start <= r.get("time", 0.0) < end]
        last = world[-1]["time"] if world else start
        audited += sum(n for t, n in sent if start <= t < last - 1.0)
        unaudited += sum(n for t, n in sent if last - 1.0 <= t < end)
        refused += _refused(world[-1]) if world else 0
    return audited, refused, unaudited


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--every", type=float, default=20.0, help="mean seconds between faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="training steps (default: 10 per minute)")
    ap.add_argument("--out", default="runs/bench_chaos")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps = args.steps or max(10, int(args.minutes * 10))
    cmd = [
        sys.executable,
        "-m",
        "async_vapo.launch",
        "--output-dir",
        str(out),
        f"train.total_steps={steps}",
        "algo.value_pretrain_steps=3",
        "train.eval_every=0",
        "train.checkpoint_every=4",  # a learner kill costs at most the steps since the last checkpoint
        "train.worker_timeout_s=10",
        "train.weight_sync_timeout_s=20",
        "train.prompt_timeout_s=60",
        # the budget covers the injected rate (every fault may cost one worker a restart): a week-long
        # run's default (5 an hour per worker) would end this one on purpose, as in the first chaos run
        f"train.worker_restarts={max(5, int(args.minutes * 60 / args.every))}",
        f"train.learner_restarts={max(2, int(args.minutes * 60 / args.every / len(KINDS)) + 1)}",
        "data.verifier=tests.verifier_fixtures:chaos",
        "rollout.verifier_timeout_s=2",
        *args.overrides,
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", VLLM_CPU_KVCACHE_SPACE="1", ASYNC_VAPO_LOG_JSON="1")
    env["ASYNC_VAPO_FAULT_SLOW_SAVE"] = "*:25"  # every checkpoint slower than the weight-sync timeout (20 s)
    log = (out / "launcher.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    bound = (2 * args.minutes + 10) * 60
    rng = random.Random(args.seed)
    inj = Injector(out, rng)
    rss: list[float] = []
    stop = threading.Event()

    missed: dict[str, int] = {}

    def inject() -> None:
        i, tries, started = 0, 0, 0.0
        while not stop.wait(rng.expovariate(1 / args.every)):
            if not _rows(out):
                continue  # faults start once training does
            started = started or time.monotonic()
            if time.monotonic() - started > args.minutes * 60:
                return  # the storm is over: the run must now finish on its own
            kind = KINDS[i % len(KINDS)]
            try:
                done = inj(kind)
            except Exception as exc:  # a fault that could not be injected is reported, not fatal
                print(f"[chaos] could not inject {kind}: {exc!r}", flush=True)
                done = False
            if done:
                print(f"[chaos] {time.monotonic() - t0:6.0f}s injected {kind}", flush=True)
            tries = 0 if done else tries + 1
            if not done and tries < 5:
                continue  # (its target may be restarting) tried again, then the next kind
            if not done:
                missed[kind] = missed.get(kind, 0) + 1
            i, tries = i + 1, 0

    th = threading.Thread(target=inject, daemon=True)
    th.start()
    while proc.poll() is None and time.monotonic() - t0 < bound:
        time.sleep(2)
        rows = _rows(out)
        learner = node_state(out).get("learners", {}).get("0")
        if rows and learner:
            if not math.isnan(mb := rss_mb(int(learner))):  # (nan: the process is gone)
                rss.append(mb)
            print(
                f"[chaos] step {rows[-1]['step'] + 1}/{steps}, faults {sum(inj.injected.values())}", end="\r"
            )
    stop.set()
    # on its own and to the end: a run stopped early (e.g. a worker over its restart budget) exits 0 too
    finished = proc.poll() == 0 and len(_rows(out)) == steps
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    rows = _rows(out)
    counters = rows[-1].get("controller_counters", {}) if rows else {}
    kills = [t for t, kind in inj.times if kind == "learner_kill"]
    counted_sent, refused, unaudited = hostile_books(rows, inj.hostile_sent, kills)
    figures: dict[str, Any] = {
        "finished": finished,
        "wall_s": round(time.monotonic() - t0),
        "steps": len(rows),
        "faults_injected": sum(inj.injected.values()),
        "faults_by_kind": dict(inj.injected),
        "faults_not_injected": missed,  # kinds skipped after 5 tries found nothing to inject them into
        "faults_survived": sum(inj.injected.values()) if finished else 0,
        "hostile_groups_sent": sum(n for _, n in inj.hostile_sent),
        "hostile_groups_audited": counted_sent,
        # sent to a learner world after its last row that was kept (its later rows were rewound when it
        # was killed): their refusals are not on record
        "hostile_groups_unaudited": unaudited,
        "hostile_groups_accepted": max(0, counted_sent - refused),
        "groups_refused": refused,
        "rejected_frames": rows[-1].get("rejected_frames_by_reason", {}) if rows else {},
        "hello_rejected": {k: v for k, v in counters.items() if k.startswith("hello_rejected_")},
        "rss_growth_mb": round(rss[-1] - rss[min(len(rss) - 1, 5)], 1) if len(rss) > 6 else None,
    }
    if finished or (out / "checkpoints" / "latest").exists():
        figures |= audit(out)
    print()
    for k, v in figures.items():
        print(f"{k}: {v}")
    inj.close()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
