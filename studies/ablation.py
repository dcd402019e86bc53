"""The paper's Table 1 on the built-in task: full VAPO, VAPO without each of its seven components, vanilla
PPO and the value-free group-normalised baseline (DAPO-style), same seeds, same sample budget.

Prints, per variant over seeds (3 by default): final held-out accuracy (avg@k) and the area under the
learning curve (mean and sd), the critic's explained variance, the paired difference to VAPO (same seed)
with a 95% interval, and samples-to-target (trained samples until held-out accuracy first reaches
``--target``); writes ``ablation.png`` (mean curves with +-1 sd bands) and one JSON object on its last
line. Every finished run is recorded in ``studies/records/ablation/<protocol>/`` (committed; see ``study.py``)
and reused by later invocations on any machine, so an interrupted ablation continues where it stopped
(delete a record to run it again).

    .venv/bin/python -m studies.ablation --quick                          # ~4 min per run on 2 cores
    .venv/bin/python -m studies.ablation --only vapo no_value_pretrain vanilla_ppo group_norm --seeds 0 1 2
    .venv/bin/python -m studies.ablation                                  # the full table, ~6.5 min per run
    .venv/bin/python -m studies.ablation --only group_norm --set data.min_digits=3   # longer responses
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from studies.study import RESULTS, compare, markdown_table, plot_bands, print_table, run_grid

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="24 steps, smaller evaluation")
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="a subset of the variants")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--target", type=float, default=0.35, help="held-out accuracy for samples-to-target")
    ap.add_argument("--out", default="runs/bench_ablation")
    ap.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for every variant (another task setting)",
    )
    ap.add_argument("--report-only", action="store_true", help="summarise the finished runs, start none")
    ap.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    args = ap.parse_args()
    root = Path(args.out) / "__".join(["quick" if args.quick else "full", *args.set])
    names = list(args.only or VARIANTS)
    if "vapo" not in names:
        names.insert(0, "vapo")  # the reference of the paired differences
    # 256 held-out problems instead of the quick protocol's 128: one evaluation's noise (~3 points at 128)
    # is the size of the differences between variants; it costs ~5 s per evaluation
    grid = {name: ["data.n_eval=256", *args.set, *VARIANTS[name]] for name in names}
    results = run_grid(
        root, RESULTS / "ablation" / root.name, grid, args.seeds, args.quick, report_only=args.report_only
    )
    missing = {n: [s for s in args.seeds if s not in {r["seed"] for r in results.get(n, [])}] for n in names}
    missing = {n: seeds for n, seeds in missing.items() if seeds}
    stats = compare(results, reference="vapo")
    for name, per_seed in results.items():
        stats[name]["samples_to_target"] = [samples_to(r["curve"], args.target) for r in per_seed]
    print(f"\n{len(args.seeds)} seeds per variant" + (f"; runs missing: {missing}" if missing else ""))
    print_table(stats, reference="vapo")
    if args.markdown:
        print("\n" + markdown_table(stats, reference="vapo") + "\n")
    if results:
        plot_bands(
            root / "ablation.png", results, "vapo", "ablation: held-out accuracy (mean over seeds, ±1 sd)"
        )
    report = {
        "bench": "ablation",
        "quick": args.quick,
        "set": args.set,
        "seeds": args.seeds,
        "target": args.target,
        "variants": stats,
        "ranking": sorted(stats, key=lambda n: -stats[n]["final_accuracy"]["mean"]),
        "missing_runs": missing,
    }
    print(json.dumps(report))


def samples_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """Trained samples before held-out accuracy first reached ``target`` (None: never)."""
    return next((s for s, acc in curve if acc >= target), None)


if __name__ == "__main__":
    main()
