"""``python -m async_vapo.eval --model DIR --data FILE --k K``: avg@k and pass@k with vLLM and the same
verifiers as training. The paper's AIME24 protocol is avg@32 at temperature 1.0, top_p 0.7 (the defaults).

``--data addition`` evaluates on the built-in task's held-out problems instead of a file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from async_vapo.protocol import Prompt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m async_vapo.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (e.g. a checkpoint's hf/)")
    p.add_argument("--data", required=True, help="a data source (see tasks/datasets.py), or 'addition'")
    p.add_argument("--split", default="train", help="the split of a `datasets` source with several")
    p.add_argument("--k", type=int, default=32, help="samples per problem")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems")
    p.add_argument("--n-addition", type=int, default=256, help="held-out problems for --data addition")
    p.add_argument("--prompt-field", default="problem")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--template", default="{problem}\n\nPut your final answer after 'Answer:'.")
    return p.parse_args(argv)


def _prompts(a: argparse.Namespace, tok: Any) -> list[Prompt]:
    from async_vapo.tasks.datasets import addition_prompts, load_prompts

    if a.data == "addition":
        prompts = addition_prompts(tok, a.n_addition, 99_991, "eval-")  # the training run's held-out seed
    else:
        prompts = load_prompts(a.data, tok, a.template, a.prompt_field, a.answer_field, "math", split=a.split)
    return prompts[: a.limit] if a.limit else prompts


def _sample_and_score(
    a: argparse.Namespace, tok: Any, prompts: list[Prompt]
) -> tuple[list[Any], dict[str, int]]:
    """k samples per prompt with vLLM, scored by the training verifiers: (verdicts, outcome counts)."""
    from async_vapo.protocol import unpack_i32
    from async_vapo.rewards import VerifierPool
    from async_vapo.rollout.engine import EngineConfig, RolloutEngine

    engine = RolloutEngine(EngineConfig(a.model))
    pool = VerifierPool(processes=2, timeout_s=10.0)
    try:
        ids = [unpack_i32(x.token_ids).tolist() for x in prompts]
        samples = asyncio.run(engine.sample_many(ids, a.k, a.temperature, a.top_p, a.max_tokens))
        items = [
            (x.task, str(tok.decode(s.token_ids, skip_special_tokens=True)), x.answer)
            for x, group in zip(prompts, samples, strict=True)
            for s in group
        ]
        return pool.score(items), dict(pool.counts)
    finally:
        pool.close()
        engine.shutdown()


def by_digits(tok: Any, prompts: list[Prompt], per_problem: list[list[Any]]) -> dict[int, dict[str, Any]]:
    """The built-in task's accuracy by difficulty: avg@k per number of digits of the longer operand."""
    from async_vapo.protocol import unpack_i32
    from async_vapo.tasks.arithmetic import parse_prompt

    groups: dict[int, list[list[bool]]] = {}
    for p, verdicts in zip(prompts, per_problem, strict=True):
        a, b = parse_prompt(str(tok.decode(unpack_i32(p.token_ids).tolist(), skip_special_tokens=True)))
        groups.setdefault(len(str(max(a, b))), []).append([v.correct for v in verdicts])
    return {
        d: {"problems": len(g), "accuracy": round(sum(map(sum, g)) / sum(map(len, g)), 4)}
        for d, g in sorted(groups.items())
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from transformers import AutoTokenizer

    from async_vapo.logging import configure_logging

    configure_logging()
    tok = AutoTokenizer.from_pretrained(a.model)
    prompts = _prompts(a, tok)
    t0 = time.perf_counter()
    verdicts, outcomes = _sample_and_score(a, tok, prompts)
    per_problem = [verdicts[i * a.k : (i + 1) * a.k] for i in range(len(prompts))]
    result = {
        "model": a.model,
        "data": a.data,
        "problems": len(prompts),
        "k": a.k,
        f"avg@{a.k}": sum(v.correct for v in verdicts) / max(1, len(verdicts)),
        f"pass@{a.k}": sum(any(v.correct for v in g) for g in per_problem) / max(1, len(per_problem)),
        "verifier_outcomes": outcomes,
        **({f"avg@{a.k}_by_digits": by_digits(tok, prompts, per_problem)} if a.data == "addition" else {}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
