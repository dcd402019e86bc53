"""The paper's Table 1 on the built-in task: full VAPO, VAPO without each of its seven components, vanilla
PPO and the value-free group-normalised baseline (DAPO-style), same seeds, same sample budget.

Prints a table of final held-out accuracy (avg@k, mean over seeds) and samples-to-target (trained samples
until held-out accuracy first reaches ``--target``), writes ``ablation.png`` (held-out accuracy against
trained samples, one curve per variant) and one JSON object on its last line. Finished runs are reused
(delete ``--out`` to start over), so an interrupted ablation continues where it stopped.

    .venv/bin/python bench/ablation.py --quick                          # ~4 min per run on 2 cores
    .venv/bin/python bench/ablation.py --only vapo no_value_pretrain vanilla_ppo group_norm --seeds 0 1
    .venv/bin/python bench/ablation.py                                  # the full table, ~10 min per run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from runs import launch, rows

VARIANTS: dict[str, list[str]] = {
    "vapo": [],
    "no_value_pretrain": ["algo.value_pretrain_steps=0"],
    "no_decoupled_gae": ["algo.decoupled_gae=false"],
    "no_length_adaptive_gae": ["algo.length_adaptive=false", "algo.lam_policy=0.95"],
    "no_clip_higher": ["algo.eps_high=0.2"],
    "no_token_level_loss": ["algo.loss_agg=sample"],
    "no_positive_lm_loss": ["algo.nll_coef=0"],
    # same samples per step, 4x the prompts with a quarter of the samples each
    "no_group_sampling": ["rollout.n_samples=2", "train.groups_per_step=128"],
    "vanilla_ppo": [
        "algo.value_pretrain_steps=0",
        "algo.decoupled_gae=false",
        "algo.length_adaptive=false",
        "algo.lam_policy=0.95",
        "algo.eps_high=0.2",
        "algo.loss_agg=sample",
        "algo.nll_coef=0",
    ],
    "group_norm": ["algo.estimator=group_norm", "algo.value_pretrain_steps=0"],
}
QUICK = [
    "train.total_steps=24",
    "train.eval_every=8",
    "data.n_eval=128",
    "rollout.eval_samples=2",
    "train.checkpoint_every=0",
]


def run_variant(root: Path, name: str, seed: int, quick: bool) -> list[dict]:
    out = root / f"{name}_seed{seed}"
    done = out / "checkpoints" / "latest"
    if not done.exists():
        overrides = [*(QUICK if quick else []), f"train.seed={seed}", *VARIANTS[name]]
        if quick and not any(o.startswith("algo.value_pretrain_steps") for o in VARIANTS[name]):
            overrides.append("algo.value_pretrain_steps=8")
        print(f"run {name} seed {seed} ...", file=sys.stderr, flush=True)
        launch(out, overrides)
    return rows(out)


def summarise(all_rows: list[dict], target: float) -> dict:
    """Held-out accuracy against the samples trained on before each evaluation."""
    train = [r for r in all_rows if r["phase"] == "train"]
    curve = []
    for e in (r for r in all_rows if r["phase"] == "eval"):
        samples = sum(r["trained_sequences"] for r in train if r["time"] <= e["time"])
        curve.append((samples, e["eval_accuracy"]))
    hit = next((s for s, acc in curve if acc >= target), None)
    return {
        "final_accuracy": curve[-1][1],
        "start_accuracy": curve[0][1],
        "samples_to_target": hit,
        "curve": curve,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="24 steps, smaller evaluation")
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="a subset of the variants")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--target", type=float, default=0.35, help="held-out accuracy for samples-to-target")
    ap.add_argument("--out", default="runs/bench_ablation")
    args = ap.parse_args()
    root = Path(args.out) / ("quick" if args.quick else "full")
    names = list(args.only or VARIANTS)
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for name in list(names):
        try:
            per_seed = [summarise(run_variant(root, name, s, args.quick), args.target) for s in args.seeds]
        except RuntimeError as exc:  # one broken variant must not cost the others
            failed[name] = str(exc).splitlines()[0]
            names.remove(name)
            print(f"  {name} failed: {failed[name]}", file=sys.stderr, flush=True)
            continue
        hits = [p["samples_to_target"] for p in per_seed]
        results[name] = {
            "final_accuracy_mean": round(statistics.mean(p["final_accuracy"] for p in per_seed), 4),
            "final_accuracy_per_seed": [round(p["final_accuracy"], 4) for p in per_seed],
            "start_accuracy_mean": round(statistics.mean(p["start_accuracy"] for p in per_seed), 4),
            "samples_to_target": hits,
            "curves": [p["curve"] for p in per_seed],
        }
    print(f"\n{'variant':<26}{'final acc':>10}{'  per seed':<24}{'samples to ' + str(args.target):>22}")
    for name in sorted(names, key=lambda n: -results[n]["final_accuracy_mean"]):
        r = results[name]
        print(
            f"{name:<26}{r['final_accuracy_mean']:>10.3f}  {r['final_accuracy_per_seed']!s:<22}"
            f"{r['samples_to_target']!s:>22}"
        )
    plot(root, results)
    report = {
        "bench": "ablation",
        "quick": args.quick,
        "seeds": args.seeds,
        "target": args.target,
        "variants": {n: {k: v for k, v in r.items() if k != "curves"} for n, r in results.items()},
        "ranking": sorted(names, key=lambda n: -results[n]["final_accuracy_mean"]),
        "failed": failed,
    }
    print(json.dumps(report))


def plot(root: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        curves = r["curves"]
        n = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(n)]
        ys = [statistics.mean(c[i][1] for c in curves) for i in range(n)]
        ax.plot(xs, ys, marker="o", label=name, linewidth=2.5 if name == "vapo" else 1.2)
    ax.set_xlabel("trained samples")
    ax.set_ylabel("held-out accuracy (avg@k, mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    root.mkdir(parents=True, exist_ok=True)
    fig.savefig(root / "ablation.png", dpi=110)


if __name__ == "__main__":
    main()
