"""Simulate the async pipeline at cluster scale, from per-device rates, before paying for the GPUs.

A time-stepped model of exactly what the engine does: the controller's admission rule (capacity =
(eta + 1) * G - (accepted - consumed + running)), prompts dispatched as whole groups of ``n`` samples to
the least-loaded engine, engines decoding every running sequence at a shared rate (throughput grows with
the batch until ``--sat-seqs``, capped by ``--max-seqs`` from the KV cache), groups finishing with their
longest sample, the learner taking ``G`` whole groups, refusing those more than ``eta`` versions old,
training at ``--train-tok-s``, then every engine draining its requests and loading the new weights
(``--update drain``, ``rollout.weight_update=drain``) or loading at once and continuing (``--update keep``,
the default ``rollout.weight_update=keep``). ``eta = 0`` is the synchronous schedule.

    # validate against the real 2-core CPU runs of bench/e2e_async_vs_sync.py (calibrates from sync)
    .venv/bin/python bench/simulate_cluster.py --calibrate runs/bench_async
    # predict 32 + 32 H100s, Qwen2.5-32B, long CoT (assumed rates: see --help and bench/README.md)
    .venv/bin/python bench/simulate_cluster.py --preset h100-32x32-qwen32b

Prints a table and one JSON object on its last line; writes ``simulation.png`` next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Params:
    engines: int = 8
    gen_tok_s: float = 3000.0  # one engine's decode throughput at saturation (tokens/s, all sequences)
    sat_seqs: int = 64  # sequences at which an engine's throughput saturates (linear below)
    max_seqs: int = 256  # sequences an engine holds at once (KV cache)
    train_tok_s: float = 20000.0  # the whole learner, tokens/s over a step (targets + value + policy)
    step_overhead_s: float = 5.0  # per learner step: optimizer, snapshot, bookkeeping
    sync_s: float = 10.0  # weight broadcast + load per engine update
    groups_per_step: int = 512
    n_samples: int = 16
    prompt_len: int = 300
    length_median: float = 4000.0  # response lengths: log-normal, clipped to max_tokens
    length_sigma: float = 0.9
    max_tokens: int = 20480
    update: str = "keep"  # or "drain" (rollout.weight_update)
    steps: int = 12
    dt: float = 1.0
    seed: int = 0


PRESETS = {
    # Assumed, not measured here: a TP=4 vLLM engine of a 32B model on H100s decoding ~3k tokens/s at
    # batch >= 64; a 32-GPU ZeRO-3 learner at ~35% MFU training policy + value and recomputing targets
    # (~20k tokens/s); DAPO-style long CoT (median 4k tokens, tail to 20k); 512 prompts x 16 samples.
    "h100-32x32-qwen32b": Params(),
}


@dataclass(eq=False)
class Group:
    tokens: np.ndarray  # remaining tokens per sample
    lengths: np.ndarray
    version: int  # oldest version that produced a token


@dataclass(eq=False)
class Engine:
    version: int = 0
    running: list[Group] = field(default_factory=list)
    queue: deque = field(default_factory=deque)
    updating_until: float = -1.0
    pending_version: int | None = None
    busy_s: float = 0.0


def simulate(p: Params, eta: int) -> dict:
    rng = np.random.default_rng(p.seed)
    engines = [Engine() for _ in range(p.engines)]
    version, accepted, consumed, running_n = 0, 0, 0, 0
    buffer: deque[Group] = deque()
    t = 0.0
    learner_busy_until, training = 0.0, None
    learner_idle, trained_tokens, generated = 0.0, 0, 0
    stale_hist: Counter[int] = Counter()
    dropped = 0
    step_times = []
    G = p.groups_per_step

    def new_group() -> Group:
        lens = np.minimum(
            np.maximum(1, rng.lognormal(math.log(p.length_median), p.length_sigma, p.n_samples)), p.max_tokens
        )
        lens = lens.astype(np.int64)
        return Group(lens.astype(float), lens, -1)

    steps_done = 0
    while steps_done < p.steps:
        # dispatch within the staleness budget, to engines whose weights are fresh enough
        capacity = (eta + 1) * G - (accepted - consumed + running_n)
        live = [i for i, e in enumerate(engines) if version - e.version <= eta and e.pending_version is None]
        while capacity > 0 and live:
            i = min(live, key=lambda k: len(engines[k].running) + len(engines[k].queue))
            engines[i].queue.append(new_group())
            capacity -= 1
            running_n += 1
        # engines
        for e in engines:
            if e.pending_version is not None and t >= e.updating_until >= 0:
                e.version, e.pending_version, e.updating_until = e.pending_version, None, -1.0
            if (
                e.pending_version is not None
                and e.updating_until < 0
                and (p.update == "keep" or not e.running)
            ):
                e.updating_until = t + p.sync_s  # drained (or interrupting): load the new weights
            if e.pending_version is not None:
                if e.updating_until >= 0:
                    continue  # loading: nothing decodes
            else:
                while e.queue and sum(len(g.tokens) for g in e.running) + p.n_samples <= p.max_seqs:
                    g = e.queue.popleft()
                    g.version = e.version
                    e.running.append(g)
            b = sum(int((g.tokens > 0).sum()) for g in e.running)
            if b == 0:
                continue
            e.busy_s += p.dt
            per_seq = p.gen_tok_s * min(1.0, b / p.sat_seqs) / b * p.dt
            for g in e.running:
                act = g.tokens > 0
                step = np.minimum(g.tokens[act], per_seq)
                g.tokens[act] -= step
                generated += int(step.sum())
            for g in [g for g in e.running if (g.tokens <= 0).all()]:
                e.running.remove(g)
                running_n -= 1
                if version - g.version <= eta:
                    accepted += 1
                    buffer.append(g)
                else:
                    dropped += 1
        # learner
        if training is not None and t >= learner_busy_until:
            batch = training
            version += 1
            consumed += len(batch)
            steps_done += 1
            step_times.append(t)
            for e in engines:
                e.pending_version = version
                e.updating_until = -1.0
            training = None
        if training is None:
            fresh = [g for g in buffer if version - g.version <= eta]
            for g in [g for g in buffer if version - g.version > eta]:
                buffer.remove(g)
                dropped += 1
                accepted -= 1
            if len(fresh) >= G:
                batch = fresh[:G]
                for g in batch:
                    buffer.remove(g)
                    stale_hist[version - g.version] += 1
                tokens = sum(int(g.lengths.sum()) + p.prompt_len * p.n_samples for g in batch)
                resp_tokens = sum(int(g.lengths.sum()) for g in batch)
                trained_tokens += resp_tokens
                learner_busy_until = t + tokens / p.train_tok_s + p.step_overhead_s
                training = batch
            else:
                learner_idle += p.dt
        t += p.dt
    wall = step_times[-1] - step_times[0] if len(step_times) > 1 else t
    measured = len(step_times) - 1
    per_step = trained_tokens / p.steps
    return {
        "eta": eta,
        "trained_tokens_per_s": round(per_step * measured / wall, 1),
        "generated_tokens_per_s": round(generated / t, 1),
        "step_s": round(wall / max(1, measured), 2),
        "learner_idle_frac": round(learner_idle / t, 3),
        "rollout_idle_frac": round(1 - statistics.mean(e.busy_s for e in engines) / t, 3),
        "staleness_hist": {str(k): v for k, v in sorted(stale_hist.items())},
        "dropped_stale": dropped,
    }


def rates_from(sync_dir: Path) -> Params:
    """Per-device rates from a synchronous CPU run (``max_staleness`` 0) of the embedded default."""
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from studies.runs import rows, summarise

    cfg = yaml.safe_load((sync_dir / "config.yaml").read_text())
    sync_rows = rows(sync_dir, "train")[2:]
    s = summarise(sync_dir, 2)
    n_samples = cfg["rollout"]["n_samples"]
    seqs = statistics.mean(r["trained_sequences"] for r in sync_rows)
    resp_tokens = statistics.mean(r["trained_tokens"] for r in sync_rows)
    lengths = [r["response_length_mean"] for r in sync_rows]
    tp = s["time_per_step"]
    train_s = sum(v for k, v in tp.items() if k not in ("wait_data", "broadcast"))  # targets + updates
    return Params(
        engines=1,
        gen_tok_s=s["generated_tokens_per_s"] / max(1e-6, 1 - s["rollout_idle_frac"]),
        sat_seqs=1,
        max_seqs=4096,
        train_tok_s=resp_tokens / train_s,
        step_overhead_s=s["step_seconds_mean"] - train_s - tp["wait_data"],
        sync_s=0.05,
        groups_per_step=round(seqs / n_samples),
        n_samples=n_samples,
        prompt_len=0,
        length_median=statistics.median(lengths),
        length_sigma=0.35,
        max_tokens=cfg["rollout"]["max_tokens"],
        steps=30,
        dt=0.01,
    )


def calibrate(run_dir: Path) -> tuple[Params, dict[int, float]]:
    """Rates from the synchronous CPU run of bench/e2e_async_vs_sync.py; measured async throughputs."""
    from studies.runs import summarise

    p = rates_from(run_dir / "staleness_0")
    measured = {}
    for d in sorted(run_dir.glob("staleness_*")):
        eta = int(d.name.split("_")[1])
        measured[eta] = summarise(d, 2)["trained_tokens_per_s"]
    return p, measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibrate", help="a bench/e2e_async_vs_sync.py output directory")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="h100-32x32-qwen32b")
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--out", default="runs/simulation")
    for f, default in Params().__dict__.items():
        ap.add_argument("--" + f.replace("_", "-"), type=type(default), default=None)
    args = ap.parse_args()
    measured: dict[int, float] = {}
    if args.calibrate:
        p, measured = calibrate(Path(args.calibrate))
    else:
        p = PRESETS[args.preset]
    p = replace(p, **{f: getattr(args, f) for f in Params().__dict__ if getattr(args, f) is not None})
    results = {eta: simulate(p, eta) for eta in args.staleness}
    sync = results.get(0)
    print(f"{'eta':>4}{'trained tok/s':>15}{'speedup':>9}{'learner idle':>14}{'rollout idle':>14}  staleness")
    for eta, r in results.items():
        sp = r["trained_tokens_per_s"] / sync["trained_tokens_per_s"] if sync else float("nan")
        r["speedup"] = round(sp, 3)
        if eta in measured:
            r["measured_trained_tokens_per_s"] = measured[eta]
            r["error"] = round(r["trained_tokens_per_s"] / measured[eta] - 1, 3)
        print(
            f"{eta:>4}{r['trained_tokens_per_s']:>15,.0f}{sp:>9.2f}{r['learner_idle_frac']:>14.2f}"
            f"{r['rollout_idle_frac']:>14.2f}  {r['staleness_hist']}"
            + (f"   measured {measured[eta]:,.0f} ({r['error']:+.0%})" if eta in measured else "")
        )
    report = {
        "bench": "simulate_cluster",
        "params": p.__dict__,
        "results": {str(k): v for k, v in results.items()},
    }
    if measured:
        report["max_abs_error"] = max(abs(r["error"]) for r in results.values() if "error" in r)
    plot(Path(args.out), results)
    print(json.dumps(report))


def plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    etas = list(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([str(e) for e in etas], [results[e]["trained_tokens_per_s"] for e in etas], label="simulated")
    meas = [results[e].get("measured_trained_tokens_per_s") for e in etas]
    if any(m is not None for m in meas):
        ax.plot(
            [str(e) for e in etas],
            [m if m is not None else float("nan") for m in meas],
            "ko",
            label="measured",
        )
    ax.set_xlabel("max_staleness (0 = synchronous)")
    ax.set_ylabel("trained tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "simulation.png", dpi=110)


if __name__ == "__main__":
    main()
