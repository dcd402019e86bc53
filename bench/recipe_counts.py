"""A recipe's counts, run for real on the tiny model: sizes no CPU test reaches.

The launcher trains the built-in task with the counts of ``configs/vapo_qwen2.5_32b.yaml`` (512 groups x
16 samples per step, 16 mini-batches, 16 verifier processes, rewards +1 / -1, evaluation of 30 problems x
32 samples) and ``max_staleness`` 2 (up to 3 x 512 groups pending at once), for a few steps, so that
every bound derived from those counts is exercised: the buffer, the admission credits, the evaluation
round and its timeout, the group validation against the recipe's reward range. Value-Pretraining is cut
to one step (its counts are the policy steps'). Prints what it saw and one JSON object on its last line.

    .venv/bin/python bench/recipe_counts.py [--steps 2] [--staleness 2] [--out runs/bench_recipe_counts]
    .venv/bin/python bench/recipe_counts.py --recipe 7b_lora   # configs/vapo_qwen2.5_7b_lora.yaml's

``--recipe 7b_lora``: the one-node recipe's counts (128 groups x 16 samples, 4 mini-batches,
``max_staleness`` 1, 16 verifier processes, 30 x 32 evaluation samples) with its learner (LoRA rank 32 on
both models, ZeRO-2, the streamed publish of merged weights).

On main before these bounds were derived from the config, this run died at once: ``GroupBuffer`` held at
most 1,024 groups while admission let 3 x 512 = 1,536 in, and the controller raised ``OverflowError``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# a script: the repository root on the path, for studies.runs
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies.runs import launch, rows

RECIPE_COUNTS = [
    "train.groups_per_step=512",
    "rollout.n_samples=16",
    "train.mini_batches=16",
    "rollout.verifier_processes=16",
    "rollout.verifier_timeout_s=10",
    "rollout.correct_reward=1.0",
    "rollout.wrong_reward=-1.0",
    "rollout.eval_samples=32",
    "data.n_eval=30",
    "rollout.max_num_seqs=1024",
    "algo.value_pretrain_steps=1",
    "train.eval_every=1",
    "train.checkpoint_every=1",
]


LORA_7B_COUNTS = [
    *(o for o in RECIPE_COUNTS if not o.startswith(("train.groups_per_step", "train.mini_batches"))),
    "train.groups_per_step=128",
    "train.mini_batches=4",
    "model.lora_rank=32",
    "model.critic_lora_rank=32",
    "model.lora_alpha=64",
    "train.zero_stage=2",
    "train.publish=stream",
]
RECIPES = {"32b": (RECIPE_COUNTS, 512, 2), "7b_lora": (LORA_7B_COUNTS, 128, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="32b")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--staleness", type=int, default=None, help="max_staleness (default: the recipe's)")
    ap.add_argument("--out", default="runs/bench_recipe_counts")
    ap.add_argument("overrides", nargs="*", help="extra config overrides")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    counts, groups, staleness = RECIPES[args.recipe]
    args.staleness = staleness if args.staleness is None else args.staleness
    overrides = [
        *counts,
        f"train.total_steps={args.steps}",
        f"train.max_staleness={args.staleness}",
        *args.overrides,
    ]
    print(f"launching the embedded default with the recipe's counts: {' '.join(overrides)}", flush=True)
    wall = launch(out, overrides, timeout_s=3 * 3600)
    train = rows(out, "train")
    evals = rows(out, "eval")
    last = train[-1]
    counters = last.get("controller_counters", {})
    rejected = {k: v for k, v in counters.items() if "rejected" in k}
    bound = (args.staleness + 1) * groups
    figures = {
        "finished": len(train) == args.steps,
        "wall_s": round(wall, 1),
        "steps": len(train),
        "trained_sequences_per_step": [r["trained_sequences"] for r in train],
        "buffer_queue_depth_max": max(r["buffer_queue_depth"] for r in train),
        "buffer_bound": bound,
        "eval_problems": [r["eval_problems"] for r in evals],
        "eval_missing": [r.get("eval_missing", 0) for r in evals],
        "groups_rejected": rejected,
        "ledger": last.get("ledger", {}),
        "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("step_*")),
    }
    for k, v in figures.items():
        print(f"{k}: {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
