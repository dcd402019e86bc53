"""Same-budget tuning of the ablation's variants: every variant runs the same grid of settings at the same
seeds (the ablation's protocol), each variant keeps its best grid point by the mean of ``--select`` over
those seeds, and the tuned variants are compared as in the ablation (paired 95% intervals against tuned
VAPO). No variant gets a setting the others did not get to try: the budget, grid points x seeds runs per
variant, is printed with the tables.

Prints every grid point of every variant (final accuracy and AUC, mean ± sd over seeds), the point each
variant keeps, and the table of the tuned variants; writes ``tune.png`` (the tuned variants' mean curves
with ±1 sd bands) and one JSON object on its last line. Runs are recorded in ``studies/records/tune/`` like
the ablation's (see ``study.py``); a grid point that is the ablation's own setting reuses the ablation's
records. The selection and the comparison use the same seeds, so both tuned figures are optimistic by the
same selection from the same number of points.

    .venv/bin/python -m studies.tune --only vapo group_norm --grid train.actor_lr=5e-5,1e-4,2e-4
    .venv/bin/python -m studies.tune --only vapo group_norm --grid train.actor_lr=1e-4,2e-4 algo.eps_high=0.28,0.4
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

from studies.ablation import VARIANTS
from studies.study import RESULTS, compare, markdown_table, plot_bands, print_table, run_grid


def grid_points(specs: list[str]) -> list[list[str]]:
    """Every combination of ``KEY=V1,V2,...`` specs, as lists of overrides (the first spec varies slowest)."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values or "" in values.split(","):
            raise ValueError(f"--grid takes KEY=V1,V2,...; got {spec!r}")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(point) for point in itertools.product(*axes)]


def point_name(variant: str, point: list[str]) -> str:
    """``vapo@actor_lr=2e-4``: the variant and the last part of each tuned key."""
    return variant + "@" + ",".join(o.split("=")[0].split(".")[-1] + "=" + o.split("=", 1)[1] for o in point)


def tune(
    variants: list[str],
    points: list[list[str]],
    seeds: list[int],
    root: Path,
    records: Path,
    quick: bool = False,
    select: str = "auc",
    report_only: bool = False,
) -> dict[str, Any]:
    """Run (or read) every variant at every grid point and seed; keep each variant's best point by the
    mean of ``select`` over the seeds it ran; compare the tuned variants with tuned ``vapo``."""
    grid = {
        point_name(v, p): ["data.n_eval=256", *p, *VARIANTS[v]]  # the variant's own settings win
        for v in variants
        for p in points
    }
    results = run_grid(root, records, grid, seeds, quick, report_only=report_only)
    means = compare(results, reference="")
    best: dict[str, str] = {}
    for v in variants:
        ran = [point_name(v, p) for p in points if point_name(v, p) in results]
        if ran:
            best[v] = max(ran, key=lambda n: means[n][select]["mean"])
    per_point = compare(results, reference=best.get("vapo", ""))  # every point against tuned VAPO
    tuned = {v: results[name] for v, name in best.items()}
    return {
        "points": per_point,
        "best": best,
        "tuned": compare(tuned, reference="vapo"),
        "curves": tuned,
        "runs_per_variant": len(points) * len(seeds),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="the variants (vapo is always one)")
    ap.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2", help="the settings tried")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--select", choices=["auc", "final_accuracy"], default="auc")
    ap.add_argument("--quick", action="store_true", help="the ablation's quick protocol")
    ap.add_argument("--out", default="runs/bench_tune")
    ap.add_argument("--report-only", action="store_true", help="summarise the finished runs, start none")
    ap.add_argument("--markdown", action="store_true", help="also print both tables in Markdown")
    args = ap.parse_args()
    try:
        points = grid_points(args.grid)
    except ValueError as exc:
        ap.error(str(exc))
    variants = list(args.only or VARIANTS)
    if "vapo" not in variants:
        variants.insert(0, "vapo")
    root = Path(args.out) / ("quick" if args.quick else "full")
    out = tune(
        variants,
        points,
        args.seeds,
        root,
        RESULTS / "tune" / root.name,
        args.quick,
        args.select,
        args.report_only,
    )
    print(f"\nevery grid point ({len(points)} points x {len(args.seeds)} seeds = "
          f"{out['runs_per_variant']} runs per variant)")  # fmt: skip
    print_table(out["points"], reference=out["best"].get("vapo", "vapo"))
    print(f"\nkept by mean {args.select}: " + ", ".join(f"{v} -> {n}" for v, n in out["best"].items()))
    print_table(out["tuned"], reference="vapo")
    if args.markdown:
        for stats, ref in ((out["points"], out["best"].get("vapo", "vapo")), (out["tuned"], "vapo")):
            print("\n" + markdown_table(stats, reference=ref) + "\n")
    if out["curves"]:
        plot_bands(root / "tune.png", out["curves"], "vapo", "tuned variants: held-out accuracy (±1 sd)")
    report = {k: out[k] for k in ("points", "best", "tuned", "runs_per_variant")}
    print(json.dumps({"bench": "tune", "grid": args.grid, "seeds": args.seeds, **report}))


if __name__ == "__main__":
    main()
