"""The one-GPU check: what no CPU test can show, in one short run (``bench/gpu_check.sh`` wraps it).

    python bench/gpu_check.py [--out gpu_check.json] [--cpu]

1. ``weight_group``: the NCCL weight group (``weight_sync/group.py``): a world-1 broadcast of 256 MiB
   (success only after completion), and a peer that never joins: rank 0's broadcast must end in
   ``CollectiveTimeout`` at its deadline, not hang in communicator set-up (run in a child process, killed
   after a bound; ``hung`` says it was).
2. ``learner_step``: the learner's own code on CUDA, world 1: a model saved to disk, loaded partitioned
   (ZeRO-3) in bf16 with gradient checkpointing and the scoring head, packed log-probs (LM head chunked)
   against one sequence per pass, then one optimiser step.
3. ``slice_memory``: the 32B-shaped two-layer slice (``cluster/trace.py``) run for real at the recipe's
   22,528 tokens: the CUDA allocator's peak against the FakeTensorMode trace and the plan.

Each part is timed and caught: one failing does not stop the others. ``--cpu`` runs parts 1-2 on gloo
and the CPU (a rehearsal of the script where no GPU is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
NEVER_JOINS_DEADLINE_S = 10.0
NEVER_JOINS_BOUND_S = 90.0


def weight_group(device: str) -> dict[str, Any]:
    from async_vapo.weight_sync.group import GroupSpec, broadcast, join_group

    backend = "nccl" if device == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as d:
        group = join_group(GroupSpec("127.0.0.1", 0, 1, backend, 30.0, f"{d}/store"), 0)
        t = torch.ones(128 * 2**20, dtype=torch.bfloat16, device=device)
        broadcast(group, t)  # warm-up: communicator set-up
        start = time.perf_counter()
        broadcast(group, t)
        seconds = time.perf_counter() - start
    child = [sys.executable, __file__, "--never-joins", backend]
    start = time.perf_counter()
    try:
        run = subprocess.run(child, capture_output=True, text=True, timeout=NEVER_JOINS_BOUND_S, cwd=ROOT)
        outcome = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else f"rc {run.returncode}"
        tail = run.stderr[-400:]
    except subprocess.TimeoutExpired:
        outcome, tail = "hung", ""
    return {
        "backend": backend,
        "broadcast_256mib_s": round(seconds, 4),
        "never_joins": outcome,
        "never_joins_s": round(time.perf_counter() - start, 1),
        "never_joins_deadline_s": NEVER_JOINS_DEADLINE_S,
        "never_joins_stderr_tail": tail,
    }


def _never_joins(backend: str) -> None:
    """Rank 0 of a world-2 group whose rank 1 never comes: its first broadcast must time out."""
    from async_vapo.weight_sync.group import CollectiveTimeout, GroupSpec, broadcast, join_group

    device = "cuda" if backend == "nccl" else "cpu"
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        try:
            group = join_group(GroupSpec("127.0.0.1", 0, 2, backend, NEVER_JOINS_DEADLINE_S, f"{d}/s"), 0)
            broadcast(group, torch.ones(1024, device=device))
            print("completed (unexpected)")
        except CollectiveTimeout:
            print(f"CollectiveTimeout after {time.perf_counter() - start:.1f} s")
        except Exception as exc:
            print(f"{type(exc).__name__} after {time.perf_counter() - start:.1f} s: {str(exc)[:200]}")
    sys.stdout.flush()
    os._exit(0)


def _batch(vocab: int, lengths: list[tuple[int, int]]) -> Any:
    from async_vapo.learner.batch import collate
    from async_vapo.protocol import Prompt, Response, TrajectoryGroup, pack_f32, pack_i32

    gen = torch.Generator().manual_seed(0)
    responses = []
    prompt = torch.randint(3, vocab, (lengths[0][0],), generator=gen).tolist()
    for _, r in lengths:
        toks = torch.randint(3, vocab, (r,), generator=gen).tolist()
        responses.append(Response(pack_i32(toks), pack_f32([-1.0] * r), pack_i32([0] * r), "stop", 1.0, True))
    return collate([TrajectoryGroup(Prompt("p0", pack_i32(prompt), "1"), responses, "w", 0.0)], 0)


def learner_step(device: str) -> dict[str, Any]:
    from async_vapo.config import TrainConfig
    from async_vapo.learner.forward import Micro, policy_forward, scoring_head
    from async_vapo.learner.models import ds_config, init_distributed, load_policy, make_engine

    from learner_throughput import _model_dir

    init_distributed("nccl" if device == "cuda" else "gloo")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    train = TrainConfig(zero_stage=3, gradient_checkpointing=True, max_tokens_per_micro=4096, logit_chunk=256)
    with tempfile.TemporaryDirectory() as d:
        path = str(_model_dir(Path(d)))  # bench/learner_throughput.py's random Qwen2, vocabulary 4,096
        ds = ds_config(train, dtype == torch.bfloat16, 1)
        model = load_policy(path, dtype, ds)
        engine = make_engine(model, 1e-5, train, dtype == torch.bfloat16, 1)
    b = _batch(4096, [(64, 1500), (64, 300), (64, 40)]).to(engine.device)
    start = time.perf_counter()
    packed, _ = policy_forward(engine, b, 1.0, Micro(tokens=4096, logit_chunk=256))
    single = torch.zeros_like(packed)
    with torch.no_grad():
        for r in range(b.size):
            rows = torch.tensor([r], device=b.input_ids.device)
            single[r] = policy_forward(engine, b.select(rows), 1.0, Micro(sequences=1))[0][0]
    diff = float((packed.detach() - single)[b.mask].abs().max())
    loss = -(packed * b.mask).sum() / b.mask.sum()
    engine.backward(loss)
    engine.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "scoring_head": scoring_head(engine) is not None,
        "partitioned": all(hasattr(p, "ds_id") for p in engine.module.parameters()),
        "packed_vs_single_max_abs_logprob_diff": diff,
        "loss": float(loss),
        "loss_finite": bool(torch.isfinite(loss)),
        "step_s": round(time.perf_counter() - start, 2),
        "attn_implementation": getattr(engine.module.config, "_attn_implementation", None),
    }


def slice_memory(device: str) -> dict[str, Any]:
    from async_vapo.cluster.memory import KNOWN
    from async_vapo.cluster.trace import measure_policy_pass_cuda, trace_policy_pass

    shape, tokens, response, chunk = KNOWN["qwen2.5-32b"], 22528, 20480, 4096
    out: dict[str, Any] = dict(trace_policy_pass(shape, tokens, response, chunk))
    out.pop("plan_parts", None)
    if device == "cuda":
        out |= measure_policy_pass_cuda(shape, tokens, response, chunk)
        out["plan_over_cuda"] = round(out["plan_gib"] / out["cuda_peak_gib"], 3)
        out["trace_over_cuda"] = round(out["trace_gib"] / out["cuda_peak_gib"], 3)
    return out


def _part(fn: Callable[[str], dict[str, Any]], device: str) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        res = fn(device)
        res["ok"] = True
    except Exception as exc:
        res = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "trace": traceback.format_exc()[-3000:],
        }
    res["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({fn.__name__: res}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--cpu", action="store_true", help="rehearse parts 1-2 on gloo and the CPU")
    ap.add_argument("--never-joins", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.never_joins:
        _never_joins(args.never_joins)
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for fn in (weight_group, learner_step, slice_memory):
        result[fn.__name__] = _part(fn, device)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
