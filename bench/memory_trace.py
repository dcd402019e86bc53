"""The learner's memory plan against a trace of the learner's own policy pass, at a recipe's sizes, on a CPU.

A two-layer slice of the recipe's model (embedding + two decoder layers + LM head at the real widths) runs
one packed micro-batch of ``train.max_tokens_per_micro`` tokens (a full-length sequence: ``rollout.max_tokens``
response tokens scored) forward and backward, with the recipe's gradient checkpointing and LM-head chunk,
under torch's ``FakeTensorMode`` and memory tracker (``async_vapo.cluster.trace``): no GPU and no memory
needed, about 20 s. The same slice is traced without the scoring head (the learner before it: the model
returned ``[K, V]`` logits) for comparison. The dry-run's figure for the whole model uses the same
per-token coefficients (``cluster.memory``).

    python bench/memory_trace.py [--config configs/vapo_qwen2.5_32b.yaml] [key=value ...]

Last line: one JSON object with ``plan_gib``, ``trace_gib``, ``plan_over_trace`` (the slice),
``trace_without_scoring_head_gib``, and the whole model's planned learner GPU (``learner_plan_gib``).
"""

from __future__ import annotations

import argparse
import json
import time

from async_vapo.cluster.memory import estimate_memory, learner_tokens, model_shape
from async_vapo.cluster.trace import trace_policy_pass
from async_vapo.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/vapo_qwen2.5_32b.yaml")
    ap.add_argument("--train-gpus", type=int, default=32)
    ap.add_argument("--card-gib", type=float, default=80.0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    shape = model_shape(cfg.model.path)
    t = cfg.train
    tokens = learner_tokens(cfg)
    response = min(cfg.rollout.max_tokens, tokens - 1)
    started = time.perf_counter()
    now = trace_policy_pass(shape, tokens, response, t.logit_chunk, t.gradient_checkpointing)
    print(f"slice with the scoring head: {json.dumps(now)}", flush=True)
    before = trace_policy_pass(
        shape, tokens, response, t.logit_chunk, t.gradient_checkpointing, scoring_head=False
    )
    print(f"slice without it (the model returns [K, V] logits): trace {before['trace_gib']} GiB", flush=True)
    plan = estimate_memory(shape, cfg, args.train_gpus, args.card_gib)
    print(plan.describe(args.card_gib))
    result = {
        "model": cfg.model.path,
        "tokens": tokens,
        "response_tokens": response,
        "logit_chunk": t.logit_chunk,
        "gradient_checkpointing": t.gradient_checkpointing,
        "plan_gib": now["plan_gib"],
        "trace_gib": now["trace_gib"],
        "plan_over_trace": now["plan_over_trace"],
        "trace_without_scoring_head_gib": before["trace_gib"],
        "learner_plan_gib": round(sum(plan.learner.values()), 1),
        "learner_activations_gib": round(plan.learner["activations"], 1),
        "card_gib": args.card_gib,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
