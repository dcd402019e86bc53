"""The 32B recipe's full response length, for real with the tiny model, on both sides:

- rollout: a worker whose vLLM engine has the recipe's context (``rollout.max_model_len`` 22,528) samples
  two responses of its whole ``max_tokens`` (20,480), streams them over ZeroMQ, and their behaviour
  log-probs are checked against transformers' on the same tokens (about five minutes on two cores). The
  suite reaches the context's far positions with a long prompt instead (``tests/test_rollout_long.py``).
- learner: a VAPO step on a 20,480-token response under the recipe's learner settings (ZeRO-3, micro-
  batches packed to 22,528 tokens, the LM head over 4,096 tokens at a time, gradient checkpointing) gives
  the parameters of one sequence per pass (about three minutes). The suite runs it at 4,096 tokens.

Prints each part's time and figures, then one JSON object; exits 1 if a check fails.

    .venv/bin/python bench/recipe_length.py [--part rollout|learner|both] [--samples 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.rollout_harness

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MAX_MODEL_LEN, MAX_TOKENS = 22528, 20480  # configs/vapo_qwen2.5_32b.yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    ap.add_argument("--part", choices=["rollout", "learner", "both"], default="both")
    args = ap.parse_args()
    report: dict = {}
    if args.part in ("rollout", "both"):
        report["rollout"] = rollout(args)
    if args.part in ("learner", "both"):
        report["learner"] = learner()
    print(json.dumps(report))
    sys.exit(0 if all(part["ok"] for part in report.values()) else 1)


def learner() -> dict:
    from async_vapo.tasks.tiny_model import ensure_tiny_model
    from tests.test_learner import recipe_length_update

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            got = recipe_length_update(
                ensure_tiny_model(progress=False), Path(tmp), MAX_TOKENS, "22528/4096/gc"
            )
        except AssertionError as exc:
            print(f"learner: FAILED {exc}")
            return {"ok": False, "error": str(exc)[:500]}
    seconds = time.perf_counter() - t0
    print(
        f"learner: a {MAX_TOKENS}-token response, packed 22528 / LM head 4096 / checkpointing vs one sequence per"
        f" pass: parameters within {got['max_param_gap']:.1e} (bound 5e-6) after a step that moved them"
        f" {got['moved']:.1e}; {seconds:.0f} s"
    )
    return {"ok": True, "seconds": round(seconds, 1), **got}


def rollout(args) -> dict:

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from async_vapo.protocol import Assign, Sampling, unpack_f32, unpack_i32
    from async_vapo.tasks.tiny_model import ensure_tiny_model
    from tests.rollout_harness import (
        make_prompts,
        never_ending_copy,
        reference_logprobs,
        start_worker,
        stop_worker,
    )

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = never_ending_copy(ensure_tiny_model(progress=False), Path(tmp) / "long", MAX_MODEL_LEN)
        tok = AutoTokenizer.from_pretrained(model_dir)
        (prompt,) = make_prompts(tok, 1, seed=3, version_tag="long")
        ids = unpack_i32(prompt.token_ids).tolist()
        side, _, proc = start_worker(model_dir, max_model_len=MAX_MODEL_LEN, max_tokens=args.max_tokens)
        try:

            async def go():
                await side.control.send(
                    "w0", Assign([prompt], Sampling(args.samples, 1.0, 1.0, args.max_tokens))
                )
                return await asyncio.wait_for(side.data.recv(), 3600)

            t0 = time.perf_counter()
            group = side.call(go(), 3610)
            seconds = time.perf_counter() - t0
        finally:
            stop_worker(side, proc)

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        lengths, gaps, ok = [], [], True
        for r in group.responses:
            tokens = unpack_i32(r.token_ids).tolist()
            lengths.append(len(tokens))
            versions = set(unpack_i32(r.versions).tolist())
            ok &= len(tokens) == args.max_tokens and r.finish_reason == "length" and versions == {0}
            got = torch.from_numpy(unpack_f32(r.logprobs).copy())
            gaps.append(float((got - reference_logprobs(model, ids, tokens)).abs().max()))
    distinct = len({tuple(unpack_i32(r.token_ids).tolist()) for r in group.responses})
    ok &= distinct == len(group.responses) and max(gaps) < 5e-3
    tokens = sum(lengths)
    print(
        f"{len(lengths)} responses of {lengths} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s)"
    )
    print(f"largest |engine - transformers| log-prob gap: {max(gaps):.2e} (bound 5e-3); {distinct} distinct")
    print(json.dumps({
        "responses": lengths, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
        "max_logprob_gap": max(gaps), "ok": bool(ok),
    }))  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
