"""Learner throughput on long-tail response lengths: padded vs packed micro-batches (+ chunked LM head,
+ fused targets), in one run.

A Qwen2 model of about 21 M parameters (policy, and the same backbone as the critic) is built in-process
(random weights, vocabulary 4,096); a batch of ``--groups`` x ``--samples`` sequences has prompts of 16 to
64 tokens and responses drawn log-normal (median ``--median`` tokens) clipped to [16, ``--max-len``],
one of them at ``--max-len``. Each configuration runs, in its own process (for a clean peak-memory
reading), one warm-up and ``--steps`` full VAPO steps through the learner's own code (``compute_targets``
+ ``value_update`` + ``policy_update``, or ``fused_update``) on DeepSpeed engines (ZeRO-1, CPU):

- ``padded_batch_width``: the padded layout as it was before length-sorted micro-batches (the baseline):
  ``train.micro_batch_size`` sequences per pass in the batch's order, each padded to the batch's longest,
- ``padded``: the learner's padded layout: micro-batches cut from length-sorted rows, each run at the
  width of its own longest row (``learner/forward.py trim``),
- ``packed``: whole sequences up to ``train.max_tokens_per_micro`` tokens per pass (default: the longest
  row, i.e. the width of one padded row), no padding. On CPU attention runs through SDPA with the
  block-diagonal mask, so a pass's attention grows with the square of its packed length: a budget of
  about the longest sequence keeps that near the padded layout's per-row cost,
- ``packed_chunked``: + the LM head over ``train.logit_chunk`` tokens at a time, recomputed in backward,
- ``packed_chunked_fused``: + old values and proximal log-probs from the updates' own forwards.
- ``padded_lora``: ``padded`` with rank-8 LoRA adapters on every projection of both models (only the
  adapters and the value head trained: ``learner/lora.py``),
- ``padded_offload``: ``padded`` with the optimizer offloaded (DeepSpeed's CPU Adam instead of torch's
  AdamW; on a CPU machine the "offload" moves nothing, so this measures the optimizer alone).

Reported per configuration: trained (real) tokens per second and the peak resident memory above the
process's steady state during the steps (sampled every 2 ms). JSON on the last line: ``sorted_vs_batch_width``
(``padded`` over ``padded_batch_width``), ``packed_vs_padded`` (speed ratio of ``packed`` to ``padded``),
``best_vs_padded`` (``packed_chunked_fused``), ``peak_mem_ratio`` (``packed_chunked`` over ``padded``),
``lora_vs_padded`` / ``offload_vs_padded`` and their ``*_peak_mem_ratio``.

``--preset embedded``: the embedded default's learner instead: the tiny model (built or cached), one step's
batch of 32 addition prompts x 8 responses with the task's own prompt and worked-solution lengths, 64
sequences per padded pass, 3 timed steps, the padded configurations only (on CPU, packed attention runs
with a block-diagonal mask whose cost grows with the square of the pass: slower for these short rows).
``--dtype bfloat16``: the learner's weights in bf16 (DeepSpeed's bf16 mode, fp32 master weights).

    .venv/bin/python bench/learner_throughput.py [--max-len 2048] [--groups 2 --samples 4] [--steps 1]
    .venv/bin/python bench/learner_throughput.py --preset embedded [--threads 1] [--dtype bfloat16]

(about 5 minutes on 2 cores, most of it the batch-width configuration; the preset about 1 minute).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "padded_batch_width": {"batch_width": True},
    "padded": {},
    "packed": {"packed": True},
    "packed_chunked": {"packed": True, "chunk": 512},
    "packed_chunked_fused": {"packed": True, "chunk": 512, "fused": True},
    "padded_lora": {"lora": 8},  # rank-8 adapters on every projection of both models (learner/lora.py)
    "padded_offload": {"offload": True},  # the optimizer offloaded: DeepSpeed's CPU Adam
}


def _model_dir(root: Path) -> Path:
    """A ~21 M-parameter Qwen2 (random weights) saved in Hugging Face format, built once per run."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = root / "model"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        cfg = Qwen2Config(
            vocab_size=4096,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )
        Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out


def _lengths(args: argparse.Namespace, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """(prompt length per group, response length per sequence)."""
    n = args.groups * args.samples
    if args.preset == "embedded":  # the built-in task's prompts and worked solutions (+ BOS, + EOS)
        from async_vapo.tasks.arithmetic import AdditionTask

        task, rng = AdditionTask(), random.Random(args.seed)
        problems = task.problems(n, args.seed, "b")
        return [len(task.prompt(problems[0])) + 1] * args.groups, [
            len(task.solution(p)) + 1 + rng.randint(-2, 2) for p in problems
        ]
    lengths = torch.exp(torch.randn(n, generator=gen) * 1.0 + torch.log(torch.tensor(args.median)))
    lengths = lengths.clamp(16, args.max_len).long().tolist()
    lengths[0] = args.max_len
    return [int(torch.randint(16, 65, (1,), generator=gen)) for _ in range(args.groups)], lengths


def _batch(args: argparse.Namespace, vocab: int):
    from async_vapo.learner.batch import collate
    from async_vapo.protocol import Prompt, Response, TrajectoryGroup, pack_f32, pack_i32

    gen = torch.Generator().manual_seed(args.seed)
    prompt_lengths, lengths = _lengths(args, gen)
    groups = []
    for g in range(args.groups):
        prompt = torch.randint(3, vocab, (prompt_lengths[g],), generator=gen)
        responses = []
        for n in lengths[g * args.samples : (g + 1) * args.samples]:
            toks = torch.randint(3, vocab, (n,), generator=gen).tolist()
            score = float(torch.rand(1, generator=gen) < 0.5)
            lps = pack_f32([-8.3] * n)
            responses.append(Response(pack_i32(toks), lps, pack_i32([0] * n), "stop", score, score > 0))
        groups.append(TrajectoryGroup(Prompt(f"p{g}", pack_i32(prompt.tolist()), "1"), responses, "b", 0.0))
    return collate(groups, 0)


def _batch_width_layout() -> None:
    """The baseline: micro-batches in the batch's row order, each run at the batch's full width (the
    padded layout before length-sorted, trimmed micro-batches), by replacing the two functions."""
    from async_vapo.learner import forward, step

    step.length_order = lambda lengths, micro: torch.arange(len(lengths))
    forward.trim = lambda b: (b.input_ids, b.attention_mask, b.resp_index)


def _run_config(name: str, args_dict: dict, model_dir: str, out: str) -> None:
    from async_vapo.config import AlgoConfig, TrainConfig
    from async_vapo.learner.models import init_distributed, load_policy, load_value, make_engine
    from async_vapo.learner.schedule import UpdateSchedule
    from async_vapo.learner.targets import compute_targets
    from async_vapo.learner.update import fused_update, policy_update, value_update

    from zero3_publish import PeakRss

    os.environ.update({"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    torch.set_num_threads(args_dict["threads"])
    args = argparse.Namespace(**args_dict)
    init_distributed("gloo")
    opt = CONFIGS[name]
    if opt.get("batch_width"):
        _batch_width_layout()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    policy = load_policy(model_dir, dtype)
    critic = load_value(model_dir, "", dtype)
    if opt.get("lora"):
        from async_vapo.config import ModelConfig
        from async_vapo.learner.lora import apply_lora

        targets = ModelConfig().lora_target_modules
        apply_lora(policy, opt["lora"], 2.0 * opt["lora"], targets)
        apply_lora(critic.backbone, opt["lora"], 2.0 * opt["lora"], targets)
    b = _batch(args, policy.config.vocab_size)
    real_tokens = int(b.attention_mask.sum())
    per_pass = args.pack_tokens or b.input_ids.shape[1]  # default: one padded row's width
    train = TrainConfig(zero_stage=1, offload_optimizer=bool(opt.get("offload")))
    bf16 = dtype == torch.bfloat16
    pol = make_engine(policy, 1e-5, train, bf16, args.micro)
    val = make_engine(critic, 1e-5, train, bf16, args.micro)
    sched = UpdateSchedule(1, 1, args.micro, 0, 0, per_pass if opt.get("packed") else 0, opt.get("chunk", 0))
    cfg = AlgoConfig()

    def step() -> None:
        if opt.get("fused"):
            fused_update(pol, val, b, cfg, 1.0, sched)
        else:
            t = compute_targets(pol, val, b, cfg, 1.0, sched.micro)
            value_update(val, b, t, cfg, sched)
            policy_update(pol, b, t, cfg, 1.0, sched)

    step()  # warm-up (allocator, DeepSpeed's first step)
    with PeakRss() as peak:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - t0) / args.steps
    result = {
        "config": name,
        "seconds_per_step": round(seconds, 2),
        "trained_tokens_per_s": round(real_tokens / seconds, 1),
        "peak_extra_mb": round(peak.extra_mb, 1),
        "real_tokens": real_tokens,
        "padded_tokens": int(b.input_ids.numel()),
    }
    Path(out).write_text(json.dumps(result))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--median", type=float, default=160.0, help="median response length (log-normal)")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=2, help="sequences per padded micro-batch")
    ap.add_argument("--pack-tokens", type=int, default=0, help="packed budget (0: the longest row's length)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="learner weights")
    ap.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--work", default="/tmp/learner_throughput")
    ap.add_argument("--preset", choices=["embedded"], help="the embedded default's learner (see above)")
    args = ap.parse_args()
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    if args.preset == "embedded":
        from async_vapo.tasks.tiny_model import ensure_tiny_model

        args.groups, args.samples, args.micro, args.steps = 32, 8, 64, 3
        args.only = [c for c in args.only if c.startswith("padded")]
        model_dir = str(ensure_tiny_model())
    else:
        model_dir = str(_model_dir(root))
    ctx = mp.get_context("spawn")
    results = {}
    for name in args.only:
        out = root / f"{name}.json"
        out.unlink(missing_ok=True)
        t0 = time.perf_counter()
        p = ctx.Process(target=_run_config, args=(name, vars(args), model_dir, str(out)))
        p.start()
        p.join()
        if p.exitcode != 0:
            print(f"[learner_throughput] {name} failed (exit {p.exitcode})", file=sys.stderr)
            return 1
        results[name] = json.loads(out.read_text())
        r = results[name]
        print(
            f"[learner_throughput] {name:>22}: {r['trained_tokens_per_s']:>8.1f} tok/s, "
            f"{r['seconds_per_step']:.1f} s/step, peak +{r['peak_extra_mb']:.0f} MB "
            f"({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    summary: dict = {"configs": results}
    base = results.get("padded")
    if base and "padded_batch_width" in results:
        summary["sorted_vs_batch_width"] = round(
            base["trained_tokens_per_s"] / results["padded_batch_width"]["trained_tokens_per_s"], 2
        )
    if base:
        r0 = base["real_tokens"]
        summary["real_tokens"], summary["padded_tokens"] = r0, base["padded_tokens"]
        if "packed" in results:
            summary["packed_vs_padded"] = round(
                results["packed"]["trained_tokens_per_s"] / base["trained_tokens_per_s"], 2
            )
        last = results.get("packed_chunked_fused")
        if last is not None:
            summary["best_vs_padded"] = round(last["trained_tokens_per_s"] / base["trained_tokens_per_s"], 2)
        for variant in ("lora", "offload"):  # against full fine-tuning with torch's AdamW, same layout
            if (r := results.get(f"padded_{variant}")) is not None:
                summary[f"{variant}_vs_padded"] = round(
                    r["trained_tokens_per_s"] / base["trained_tokens_per_s"], 2
                )
                summary[f"{variant}_peak_mem_ratio"] = round(
                    r["peak_extra_mb"] / max(1e-9, base["peak_extra_mb"]), 3
                )
        if "packed_chunked" in results:
            summary["peak_mem_ratio"] = round(
                results["packed_chunked"]["peak_extra_mb"] / max(1e-9, base["peak_extra_mb"]), 3
            )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
