"""Learning at staleness, with and without the critic's off-policy correction (``algo.value_correction``).

For each staleness s the engines get new weights only every s + 1 steps (``train.broadcast_every``), so
the trained samples really are 0 to s versions old (the measured histogram is printed), with
``train.max_staleness = s``. Each setting runs with ``value_correction`` none and vtrace, several seeds;
printed per setting: final held-out accuracy, area under the learning curve and the critic's explained
variance (mean and sd over seeds), and V-trace minus none paired by seed with a 95% interval. Writes
``staleness.png`` (mean curves with +-1 sd bands) and one JSON object on its last line. Finished runs are
recorded in ``studies/records/staleness/`` (committed; see ``study.py``) and reused, so an interrupted study
continues where it stopped.

    .venv/bin/python -m studies.staleness --quick --seeds 0 1 2             # 18 runs, ~4 min each on 2 cores
    .venv/bin/python -m studies.staleness --quick --staleness 1 4 --seeds 0  # a subset
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from studies.study import RESULTS, compare, plot_bands, print_table, run_grid


def settings(staleness: list[int]) -> dict[str, list[str]]:
    grid = {}
    for s in staleness:
        for corr in ("none", "vtrace"):
            grid[f"s{s}_{corr}"] = [
                f"train.max_staleness={s}",
                f"train.broadcast_every={s + 1}",
                f"algo.value_correction={corr}",
            ]
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="24 steps, smaller evaluation")
    ap.add_argument("--staleness", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/bench_staleness")
    ap.add_argument("--report-only", action="store_true", help="summarise the finished runs, start none")
    args = ap.parse_args()
    root = Path(args.out) / ("quick" if args.quick else "full")
    grid = settings(args.staleness)
    results = run_grid(
        root, RESULTS / "staleness" / root.name, grid, args.seeds, args.quick, report_only=args.report_only
    )
    report: dict = {"bench": "staleness", "quick": args.quick, "seeds": args.seeds, "settings": {}}
    for s in args.staleness:
        pair = {k: results[k] for k in (f"s{s}_none", f"s{s}_vtrace") if k in results}
        if not pair:
            continue
        common = set.intersection(*({r["seed"] for r in v} for v in pair.values()))
        pair = {k: [r for r in v if r["seed"] in common] for k, v in pair.items()}
        n = len(common)
        stats = compare(pair, reference=f"s{s}_none")
        for k, v in pair.items():
            stats[k]["staleness_hist"] = v[-1]["staleness_hist"]
        print(f"\nstaleness {s} ({n} seeds)")
        print_table(stats, reference=f"s{s}_none")
        report["settings"][s] = stats
    if results:
        plot_bands(
            root / "staleness.png", results, "s1_none", "held-out accuracy at staleness s (none / vtrace)"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
