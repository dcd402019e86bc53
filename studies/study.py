"""Shared by the learning studies (``ablation.py``, ``staleness.py``, ``tune.py``): run a recipe variant per
seed with the real launcher, read its learning curve, and compare variants over seeds.

Every finished run leaves a **record** (its learning curve and figures, its whole config, the commit; a few
KB of JSON) under ``studies/records/<study>/``, which is committed: a study reuses a run whose record holds
the config that run would get now, on any machine, so a protocol of many hours is completed over several
sessions and its table re-printed from the repository alone (``--report-only``); a record of one study
stands for the same config's run in another. A change of the embedded default invalidates exactly the
records whose config it changes. A finished run directory of the same config without a record (an older
run) gets one written; one of another config is run again.

Statistics, per variant over seeds: mean and sample standard deviation of the final held-out accuracy,
of the normalised area under the learning curve (mean held-out accuracy over the trained samples,
trapezoid rule) and of the critic's explained variance; and the **paired** difference to a reference
variant (same seed = same data order, same initial weights) with a two-sided 95% Student-t interval.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import yaml

from studies.runs import ROOT, launch, rows

RESULTS = ROOT / "studies" / "records"

# The studies compare the paper's method and its variants, so the embedded default's one addition to it,
# DAPO's dynamic sampling (train.filter_uniform_rewards), is off in every run; the length of a run, its
# evaluations, staleness and the engine's batch are pinned where the tables were measured, whatever the
# default becomes (staleness.py sets its own max_staleness after these), so that tuning the default does
# not invalidate the studies' records
BASE = [
    "train.filter_uniform_rewards=false",
    "train.total_steps=120",
    "train.eval_every=20",
    "train.max_staleness=1",
    "rollout.max_num_seqs=256",
]
# 24 steps after 8 value-pretraining steps, an evaluation of 128 held-out problems x 2 samples every 8
QUICK = [
    "train.total_steps=24",
    "train.eval_every=8",
    "data.n_eval=128",
    "rollout.eval_samples=2",
    "train.checkpoint_every=0",
]
# two-sided 95% Student-t quantiles by degrees of freedom (no scipy in the environment)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def overrides_of(name: str, overrides: Sequence[str], seed: int, quick: bool) -> list[str]:
    """Every override of run ``name`` at ``seed``: the studies' pins, the protocol, the variant's own."""
    extra = [*BASE, *(QUICK if quick else []), f"train.seed={seed}", *overrides]
    if quick and not any(o.startswith("algo.value_pretrain_steps") for o in overrides):
        extra.append("algo.value_pretrain_steps=8")
    return extra


def run(
    root: Path,
    records: Path,
    name: str,
    overrides: Sequence[str],
    seed: int,
    quick: bool,
    start_missing: bool = True,
) -> dict[str, Any] | None:
    """The ``learning_curve`` of ``name`` at ``seed``: from its record when one holds the config these
    overrides give (else from any study's record of that config), else from a finished run of that config
    under ``root``, else from a new run (a finished run of another config is moved aside) unless
    ``start_missing`` is false (then None); the record is written whenever a curve is read from a run."""
    extra = overrides_of(name, overrides, seed, quick)
    want = resolved(extra)
    record = read_record(record_path(records, name, seed), want)
    if record is None:
        record = find_record(want)  # another study's run of the same config (tune.py's default point)
    if record is not None:
        return record
    out = root / f"{name}_seed{seed}"
    commit = "unknown: run before it was recorded"
    if not reusable(out, want):
        if not start_missing:
            return None
        if out.exists():
            out.rename(out.with_name(f"{out.name}.old-{int(time.time())}"))
        print(f"run {name} seed {seed} ...", file=sys.stderr, flush=True)
        commit = head_commit()  # the code the run starts with
        launch(out, extra)
    curve = learning_curve(rows(out))
    write_record(record_path(records, name, seed), extra, run_config(out), curve, commit)
    return curve


def record_path(records: Path, name: str, seed: int) -> Path:
    """Where the record of ``name`` at ``seed`` lives (committed under ``studies/records``)."""
    return records / f"{name}_seed{seed}.json"


def head_commit() -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "async_vapo", "configs"], cwd=ROOT)
    return res.stdout.strip() + ("+changes" if dirty.returncode else "")


def resolved(overrides: Sequence[str]) -> dict[str, Any]:
    """The whole config a run with ``overrides`` gets (the embedded default + overrides), less its output
    directory: what a record must match, so that a change of the default invalidates the records it
    affects and no other."""
    return copy.deepcopy(_resolved(tuple(overrides)))


@functools.cache
def _resolved(overrides: tuple[str, ...]) -> dict[str, Any]:
    from async_vapo.config import load_config
    from async_vapo.launch.cli import DEFAULT_CONFIG

    tree: dict[str, Any] = msgspec.to_builtins(load_config(DEFAULT_CONFIG, list(overrides)))
    tree.pop("output_dir", None)
    return tree


def run_config(out: Path) -> dict[str, Any] | None:
    """The config the run in ``out`` had (its ``config.yaml``), less its output directory."""
    try:
        tree = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if isinstance(tree, dict):
        tree.pop("output_dir", None)
        return tree
    return None


def read_record(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The learning curve recorded at ``path`` when its run had ``config`` (else None)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not same_config(rec.get("config"), config, _resolved(())):
        return None
    return {**rec["result"], "curve": [tuple(p) for p in rec["result"]["curve"]]}


def same_config(recorded: Any, want: dict[str, Any], default: dict[str, Any]) -> bool:
    """A record's config stands for ``want``: every field it holds has ``want``'s value, and a field it
    lacks (added to the config since it was written) has the embedded ``default``'s value in ``want`` (a
    new field's default keeps the old behaviour); a field only the record has (since removed) is ignored."""
    if not isinstance(recorded, dict):
        return False
    for key, value in want.items():
        if key not in recorded:
            if value != default.get(key):
                return False
        elif isinstance(value, dict):
            sub = default.get(key)
            if not same_config(recorded[key], value, sub if isinstance(sub, dict) else {}):
                return False
        elif recorded[key] != value:
            return False
    return True


def find_record(config: dict[str, Any]) -> dict[str, Any] | None:
    """The learning curve of a run that had ``config`` from any study's records under ``RESULTS``."""
    for path in sorted(RESULTS.rglob("*.json")):
        record = read_record(path, config)
        if record is not None:
            return record
    return None


def write_record(
    path: Path, overrides: Sequence[str], config: dict[str, Any] | None, curve: dict[str, Any], commit: str
) -> None:
    rec = {
        "overrides": list(overrides),
        "commit": commit,
        "recorded": time.strftime("%Y-%m-%d"),
        "result": curve,
        "config": config,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1) + "\n")


def run_grid(
    root: Path,
    records: Path,
    grid: dict[str, list[str]],
    seeds: Sequence[int],
    quick: bool,
    report_only: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """``learning_curve`` of every setting of ``grid`` at every seed (each tagged with its ``seed``), run
    seed-major so that an interrupted study has every setting at the first seeds. A failed run is reported
    and left out (one broken setting must not cost the others); ``report_only`` starts no run."""
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for name, overrides in grid.items():
            try:
                curve = run(root, records, name, overrides, seed, quick, start_missing=not report_only)
            except RuntimeError as exc:
                print(f"  {name} seed {seed} failed: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
                continue
            if curve is not None:
                results.setdefault(name, []).append({**curve, "seed": seed})
    return results


def reusable(out: Path, config: dict[str, Any]) -> bool:
    """The run in ``out`` finished and had ``config`` (judged like a record: ``same_config``)."""
    return finished(out) and same_config(run_config(out), config, _resolved(()))


def finished(out: Path) -> bool:
    """The run in ``out`` trained every step its config asked for (and evaluated after the last one when
    it evaluates at all)."""
    try:
        train = yaml.safe_load((out / "config.yaml").read_text())["train"]
        last = rows(out)[-1]
    except (OSError, IndexError, ValueError, KeyError, TypeError):
        return False
    return last["step"] == train["total_steps"] - 1 and last["phase"] == (
        "eval" if train["eval_every"] else "train"
    )


def learning_curve(all_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out accuracy against the samples trained on before each evaluation, its area, the critic."""
    train = [r for r in all_rows if r["phase"] == "train"]
    curve = []
    for e in (r for r in all_rows if r["phase"] == "eval"):
        samples = sum(r["trained_sequences"] for r in train if r["time"] <= e["time"])
        curve.append((samples, e["eval_accuracy"]))
    ev = [r["explained_variance"] for r in train if r.get("explained_variance") is not None]
    stale = train[-1].get("staleness_hist", {}) if train else {}
    rl_seconds = train[-1]["time"] - train[0]["time"] + train[0]["step_seconds"] if train else 0.0
    return {
        "curve": curve,
        "final_accuracy": curve[-1][1],
        "start_accuracy": curve[0][1],
        "auc": auc(curve),
        "explained_variance": statistics.mean(ev) if ev else float("nan"),
        "explained_variance_last": statistics.mean(ev[-5:]) if ev else float("nan"),
        "staleness_hist": stale,
        "rl_minutes": round(rl_seconds / 60, 2),  # first training step to the last (evaluations included)
    }


def auc(curve: Sequence[tuple[float, float]]) -> float:
    """Mean accuracy over the trained-sample axis (trapezoid rule; the area divided by the x range)."""
    if len(curve) < 2 or curve[-1][0] == curve[0][0]:
        return curve[-1][1] if curve else float("nan")
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(curve))
    return area / (curve[-1][0] - curve[0][0])


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    if not xs or any(math.isnan(x) for x in xs):  # e.g. no critic: no explained variance
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def paired_ci(xs: Sequence[float], ref: Sequence[float]) -> tuple[float, float, float]:
    """Mean of the per-seed differences ``xs - ref`` and its two-sided 95% t interval (lo, hi)."""
    d = [x - r for x, r in zip(xs, ref, strict=True)]
    m = statistics.mean(d)
    if len(d) < 2:
        return m, float("nan"), float("nan")
    half = _T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - half, m + half


def compare(per_variant: dict[str, list[dict[str, Any]]], reference: str) -> dict[str, dict[str, Any]]:
    """Per variant (each a list of ``learning_curve`` results): means, spreads and the paired differences
    to ``reference`` for the final accuracy and the AUC, paired by the runs' ``seed`` (list position when
    untagged) over the seeds both have."""
    out: dict[str, dict[str, Any]] = {}
    ref = _by_seed(per_variant.get(reference, []))
    for name, runs_ in per_variant.items():
        row: dict[str, Any] = {"seeds": len(runs_)}
        for key in ("final_accuracy", "auc", "explained_variance", "explained_variance_last"):
            m, s = mean_std([r[key] for r in runs_])
            row[key] = {
                "mean": round(m, 4),
                "std": round(s, 4),
                "per_seed": [round(r[key], 4) for r in runs_],
            }
        row["rl_minutes"] = [r.get("rl_minutes") for r in runs_]
        mine = _by_seed(runs_)
        common = sorted(set(mine) & set(ref))
        if name != reference and common:
            row["paired_seeds"] = len(common)
            for key in ("final_accuracy", "auc"):
                m, lo, hi = paired_ci([mine[k][key] for k in common], [ref[k][key] for k in common])
                row[f"{key}_vs_{reference}"] = {"diff": round(m, 4), "ci95": [round(lo, 4), round(hi, 4)]}
        out[name] = row
    return out


def _by_seed(runs_: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r.get("seed", i): r for i, r in enumerate(runs_)}


def print_table(stats: dict[str, dict[str, Any]], reference: str) -> None:
    w = max([28, *(len(name) + 2 for name in stats)])  # tune.py's names carry their grid point
    head = f"{'variant':<{w}}{'final acc':>16}{'AUC':>16}{'expl. var':>16}"
    dw = max(34, len(reference) + 26)
    head += f"{'final - ' + reference + ' [95% CI]':>{dw}}{'AUC - ' + reference + ' [95% CI]':>{dw}}"
    print(head)
    for name, r in sorted(stats.items(), key=lambda kv: -kv[1]["final_accuracy"]["mean"]):
        cells = [_cell(r[k]) for k in ("final_accuracy", "auc", "explained_variance")]
        diffs = []
        for key in ("final_accuracy", "auc"):
            d = r.get(f"{key}_vs_{reference}")
            diffs.append(_diff_cell(d))
        print(f"{name:<{w}}{cells[0]:>16}{cells[1]:>16}{cells[2]:>16}{diffs[0]:>{dw}}{diffs[1]:>{dw}}")


def markdown_table(stats: dict[str, dict[str, Any]], reference: str) -> str:
    """``print_table``'s rows as the Markdown table of ``bench/README.md``, with the critic's explained
    variance over the run and over its last 5 steps, and each seed's final accuracy and minutes of RL."""
    cols = ["variant", "final acc", "AUC", "expl. var (run / last 5 steps)"]
    cols += [f"final - {reference} [95% CI]", f"AUC - {reference} [95% CI]", "final per seed"]
    cols += ["minutes of RL"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for name, r in sorted(stats.items(), key=lambda kv: -kv[1]["final_accuracy"]["mean"]):
        ev, ev_last = r["explained_variance"]["mean"], r["explained_variance_last"]["mean"]
        cells = [
            f"**{name}**" if name == reference else name,
            _cell(r["final_accuracy"]),
            _cell(r["auc"]),
            "-" if math.isnan(ev) else f"{ev:.3f} / {ev_last:.3f}",
            *(
                "" if name == reference else _diff_cell(r.get(f"{k}_vs_{reference}"))
                for k in ("final_accuracy", "auc")
            ),
            " / ".join(f"{x:.3f}".removeprefix("0") for x in r["final_accuracy"]["per_seed"]),
            " / ".join("?" if m is None else f"{m:.1f}" for m in r.get("rl_minutes", [])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff_cell(d: dict[str, Any] | None) -> str:
    """``diff [lo, hi]``; ``diff (1 seed)`` where one paired seed gives no interval; ``-`` for none."""
    if not d:
        return "-"
    lo, hi = d["ci95"]
    if math.isnan(lo):
        return f"{d['diff']:+.3f} (1 seed)"
    return f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _cell(x: dict[str, Any]) -> str:
    """``mean ± sd``; ``-`` where there is no value (a value-free variant's explained variance)."""
    if math.isnan(x["mean"]):
        return "-"
    return f"{x['mean']:.3f}" + ("" if math.isnan(x["std"]) else f" ± {x['std']:.3f}")


def plot_bands(path: Path, per_variant: dict[str, list[dict[str, Any]]], reference: str, title: str) -> None:
    """Mean held-out accuracy over seeds against trained samples, with a band of +-1 standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs_ in per_variant.items():
        n = min(len(r["curve"]) for r in runs_)
        xs = [statistics.mean(r["curve"][i][0] for r in runs_) for i in range(n)]
        ys = [[r["curve"][i][1] for r in runs_] for i in range(n)]
        mean = [statistics.mean(y) for y in ys]
        sd = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
        (line,) = ax.plot(xs, mean, marker="o", label=name, linewidth=2.5 if name == reference else 1.2)
        lo = [m - s for m, s in zip(mean, sd, strict=True)]
        hi = [m + s for m, s in zip(mean, sd, strict=True)]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("trained samples")
    ax.set_ylabel("held-out accuracy (mean over seeds, band: ±1 sd)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
