"""Critic quality over training, against Monte-Carlo ground truth: does VAPO's critic know more about a
state's chance of success than the value-free baseline's group mean does?

For the value-pretrained critic and every checkpoint of a run of the built-in task: sample groups from that
checkpoint's policy (the training sampling), cut each response after a random number ``t`` of its tokens,
and estimate the state's true value ``V(s_t)`` by ``--k`` continuations of the same policy from it (the
share of correct ones). Three predictors of it are scored:

    critic       V_phi(s_t), the run's value model at that state (what VAPO's advantages rest on)
    critic s_0   V_phi(s_0), the same critic at the prompt (what it knows about the problem alone)
    group mean   the mean reward of the other responses of the group (the value-free baseline's estimate
                 of the prompt's value, subtracted from every token; leave-one-out, so that the state's own
                 outcome is not part of its predictor)

by the share of the true values' variance each explains (``r2_mc``: both the error and the variance are
corrected for the Monte-Carlo estimate's own sampling noise), per third of the response (where ``t``
falls). A critic that beats the group mean in the later thirds gives GAE credit assignment that the
group-normalised baseline cannot have; one that does not makes its advantages noisier than the baseline's.

    .venv/bin/python -m studies.critic_quality --run runs/embedded_default     # ~6 min for 5 checkpoints
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml


def r2_mc(pred: Sequence[float], v_mc: Sequence[float], k: int) -> float:
    """Share of the variance of the true values explained by ``pred``, from Monte-Carlo estimates
    ``v_mc`` (each the mean of ``k`` Bernoulli outcomes). Both the mean squared error and the variance of
    ``v_mc`` contain the estimates' sampling variance; its unbiased estimate ``p(1-p)/(k-1)`` is
    subtracted from each, so a predictor equal to the true values scores 1 whatever ``k``."""
    noise = statistics.mean(p * (1 - p) / (k - 1) for p in v_mc)
    mse = statistics.mean((a - b) ** 2 for a, b in zip(pred, v_mc, strict=True)) - noise
    var = statistics.pvariance(v_mc) - noise
    return 1 - mse / var if var > 0 else float("nan")


@dataclass(frozen=True)
class Cut:
    """One sampled response cut after ``t`` of its tokens."""

    prompt: list[int]
    response: list[int]
    t: int
    group_mean: float  # the other responses' mean reward (leave-one-out: the state's own outcome unseen)
    answer: str

    @property
    def third(self) -> int:
        return min(2, 3 * self.t // len(self.response))


def checkpoints(run: Path, initial_model: str) -> list[tuple[str, str, Path]]:
    """(label, policy directory, critic source) in training order: the value-pretrained critic with the
    initial policy, then every ``checkpoints/step_N``."""
    out = []
    if (run / "value_pretrained").exists():
        out.append(("step 0 (value-pretrained)", initial_model, run / "value_pretrained"))
    steps = sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    out += [(f"step {p.name.split('_')[1]}", str(p / "hf"), p / "value") for p in steps]
    return out


def load_critic(policy_dir: str, source: Path) -> Any:
    """The value model of a ``value_pretrained`` directory or of a checkpoint's DeepSpeed ``value/``
    (ZeRO 0-2 keep the whole module in ``mp_rank_00_model_states.pt``)."""
    from async_vapo.learner.models import load_value

    if (source / "config.json").exists():
        return load_value(policy_dir, str(source), torch.float32).eval()
    model = load_value(policy_dir, "", torch.float32)
    states = sorted(source.glob("ds/*mp_rank_00_model_states.pt"))
    if not states:
        raise SystemExit(f"{source}: no DeepSpeed model states (a ZeRO-3 checkpoint: run zero_to_fp32 first)")
    model.load_state_dict(torch.load(states[0], map_location="cpu", weights_only=False)["module"])
    return model.eval()


async def sample_cuts(
    engine: Any, tok: Any, prompts: list[Any], n: int, max_tokens: int, seed: int
) -> list[Cut]:
    """``n`` responses per prompt at the training sampling (temperature 1, top_p 1), each cut after a
    uniformly drawn number of its tokens (0 = the prompt alone; never after the last token)."""
    from async_vapo.protocol import unpack_i32

    rng = random.Random(seed)
    ids = [unpack_i32(p.token_ids).tolist() for p in prompts]
    groups = await engine.sample_many(ids, n, 1.0, 1.0, max_tokens)
    cuts = []
    for prompt, p_ids, group in zip(prompts, ids, groups, strict=True):
        rewards = [_correct(tok, s.token_ids, prompt.answer) for s in group]
        for s, r in zip(group, rewards, strict=True):
            if s.token_ids:
                t = rng.randrange(len(s.token_ids))
                others = (sum(rewards) - r) / (len(rewards) - 1)
                cuts.append(Cut(p_ids, list(s.token_ids), t, others, prompt.answer))
    return cuts


async def mc_values(engine: Any, tok: Any, cuts: list[Cut], k: int, max_tokens: int) -> list[float]:
    """Share of ``k`` continuations from each cut's state that end with the right answer."""

    async def one(c: Cut) -> float:
        prefix = c.response[: c.t]
        conts = await engine.sample(c.prompt + prefix, k, 1.0, 1.0, max(1, max_tokens - c.t))
        return statistics.mean(_correct(tok, prefix + s.token_ids, c.answer) for s in conts)

    return list(await asyncio.gather(*(one(c) for c in cuts)))


def _correct(tok: Any, response: list[int], answer: str) -> float:
    from async_vapo.rewards.verifiers import AdditionVerifier

    return float(AdditionVerifier()(tok.decode(response, skip_special_tokens=True), answer).correct)


@torch.no_grad()
def critic_values(critic: Any, cuts: list[Cut]) -> tuple[list[float], list[float]]:
    """``V(s_t)`` and ``V(s_0)`` per cut: the value at the last token of the state (the learner's
    convention: ``s_t`` is the prompt and the first ``t`` response tokens)."""
    at_t, at_0 = [], []
    for c in cuts:
        v = critic(torch.tensor([c.prompt + c.response]))[0]
        at_t.append(float(v[len(c.prompt) + c.t - 1]))
        at_0.append(float(v[len(c.prompt) - 1]))
    return at_t, at_0


def score(cuts: list[Cut], v_mc: list[float], v_t: list[float], v_0: list[float], k: int) -> dict[str, Any]:
    """``r2_mc`` of each predictor over all cuts and per third of the response."""
    out: dict[str, Any] = {}
    for part in ("all", 0, 1, 2):
        idx = [i for i, c in enumerate(cuts) if part == "all" or c.third == part]
        if len(idx) < 3:
            continue
        mc = [v_mc[i] for i in idx]
        out[str(part)] = {
            "cuts": len(idx),
            "v_mc_mean": round(statistics.mean(mc), 4),
            "critic": round(r2_mc([v_t[i] for i in idx], mc, k), 4),
            "critic_s0": round(r2_mc([v_0[i] for i in idx], mc, k), 4),
            "group_mean": round(r2_mc([cuts[i].group_mean for i in idx], mc, k), 4),
        }
    return out


def measure(label: str, policy: str, critic_src: Path, a: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from async_vapo.rollout.engine import EngineConfig, RolloutEngine
    from async_vapo.tasks.datasets import addition_prompts

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(policy)
    prompts = addition_prompts(tok, a.prompts, a.seed, "cq-")
    engine = RolloutEngine(EngineConfig(policy, seed=a.seed))

    async def both() -> tuple[list[Cut], list[float]]:  # one event loop: vLLM's engine binds to it
        cuts = await sample_cuts(engine, tok, prompts, a.n_samples, a.max_tokens, a.seed)
        return cuts, await mc_values(engine, tok, cuts, a.k, a.max_tokens)

    try:
        cuts, v_mc = asyncio.run(both())
    finally:
        engine.shutdown()
    v_t, v_0 = critic_values(load_critic(policy, critic_src), cuts)
    res = {
        "checkpoint": label,
        **score(cuts, v_mc, v_t, v_0, a.k),
        "seconds": round(time.perf_counter() - t0),
    }
    print(f"  {label}: {json.dumps(res)}", file=sys.stderr, flush=True)
    return res


def _step(label: str) -> int:
    return int(label.split(" ")[1])


def plot(path: Path, results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    xs = [r["checkpoint"].split(" ")[1] for r in results]
    for ax, part, title in ((axes[0], "all", "every cut"), (axes[1], "2", "cuts in the last third")):
        for key, style in (("critic", "o-"), ("critic_s0", "s--"), ("group_mean", "^-")):
            ax.plot(xs, [r.get(part, {}).get(key, float("nan")) for r in results], style, label=key)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"variance of the true state value explained: {title}", fontsize=9)
        ax.set_xlabel("checkpoint (policy step)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("R² against Monte-Carlo values (noise-corrected)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/embedded_default", help="a finished run of the built-in task")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n-samples", type=int, default=8, help="responses per prompt (the group)")
    ap.add_argument("--k", type=int, default=16, help="continuations per cut for its Monte-Carlo value")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--steps", type=int, nargs="+", help="only these checkpoints (0 = value-pretrained)")
    args = ap.parse_args()
    run = Path(args.run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    args.max_tokens = cfg["rollout"]["max_tokens"]
    initial = cfg["model"]["path"]
    if not initial:
        from async_vapo.tasks.tiny_model import tiny_model_dir

        initial = str(tiny_model_dir())
    chosen = [c for c in checkpoints(run, initial) if args.steps is None or _step(c[0]) in args.steps]
    results = [measure(label, policy, src, args) for label, policy, src in chosen]
    print(
        f"{'checkpoint':<28}{'third':>6}{'cuts':>6}{'V_MC':>7}{'critic':>9}{'critic s0':>11}{'group mean':>12}"
    )
    for r in results:
        for part in ("all", "0", "1", "2"):
            if part in r:
                x = r[part]
                print(f"{r['checkpoint']:<28}{part:>6}{x['cuts']:>6}{x['v_mc_mean']:>7.3f}"
                      f"{x['critic']:>9.3f}{x['critic_s0']:>11.3f}{x['group_mean']:>12.3f}")  # fmt: skip
    plot(run / "critic_quality.png", results)
    print(json.dumps({"bench": "critic_quality", "run": str(run), "k": args.k, "results": results}))


if __name__ == "__main__":
    main()
