"""``python -m async_vapo.eval --model DIR --data FILE --k K``: avg@k and pass@k with vLLM and the same
verifiers as training. The paper's AIME24 protocol is avg@32 at temperature 1.0, top_p 0.7 (the defaults).

``--config RUN/config.yaml`` evaluates as that run does: its held-out prompts (template, fields, chat
template, extra fields), verifiers and rewards, sampling (``eval_samples``, ``eval_temperature``,
``eval_top_p``, ``max_tokens``), engine context and tensor-parallel size; a flag given explicitly wins.
``--data addition`` evaluates on the built-in task's held-out problems instead of a file. ``--output
FILE.jsonl`` writes every sample (prompt, response, reward, verdict).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from async_vapo.config import Config
from async_vapo.protocol import Prompt

# without --config (the paper's AIME protocol, a model alone)
DEFAULTS = {"k": 32, "temperature": 1.0, "top_p": 0.7, "max_tokens": 96, "max_model_len": 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m async_vapo.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (e.g. a checkpoint's hf/)")
    p.add_argument("--config", help="a run's config.yaml (or a recipe): evaluate as that run does")
    p.add_argument("--data", help="a data source (see tasks/datasets.py), or 'addition'; with --config: "
                   "default its held-out data")  # fmt: skip
    p.add_argument("--split", default="train", help="the split of a `datasets` source with several")
    p.add_argument("--k", type=int, help=f"samples per problem (default {DEFAULTS['k']}, or the run's)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-tokens", type=int, help=f"default {DEFAULTS['max_tokens']}, or the run's")
    p.add_argument("--max-model-len", type=int, help=f"default {DEFAULTS['max_model_len']}, or the run's")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems")
    p.add_argument("--n-addition", type=int, default=256, help="held-out problems for --data addition")
    p.add_argument("--prompt-field", default="problem")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--template", default="{problem}\n\nPut your final answer after 'Answer:'.")
    p.add_argument("--output", help="write every sample to this JSONL file")
    a = p.parse_args(argv)
    if not a.config and not a.data:
        p.error("give --data, or --config to evaluate on a run's held-out data")
    return a


def _settings(a: argparse.Namespace, cfg: Config | None) -> dict[str, Any]:
    """Sampling and engine settings: the flag if given, else the run's (``--config``), else ``DEFAULTS``."""
    run = {}
    if cfg is not None:
        r = cfg.rollout
        run = {"k": r.eval_samples, "temperature": r.eval_temperature, "top_p": r.eval_top_p,
               "max_tokens": r.max_tokens, "max_model_len": r.max_model_len}  # fmt: skip
    return {k: v if (v := getattr(a, k)) is not None else run.get(k, DEFAULTS[k]) for k in DEFAULTS}


def _prompts(a: argparse.Namespace, tok: Any, cfg: Config | None) -> list[Prompt]:
    from async_vapo.tasks.datasets import addition_prompts, load_prompts

    if cfg is not None and (a.data is None or a.data == cfg.data.eval_file):
        from async_vapo.learner.setup import held_out_prompts

        prompts = held_out_prompts(cfg, tok)  # the run's own held-out prompts, verifiers included
    elif a.data == "addition":
        prompts = addition_prompts(tok, a.n_addition, 99_991, "eval-")  # the training run's held-out seed
    else:
        prompts = load_prompts(a.data, tok, a.template, a.prompt_field, a.answer_field, "math", split=a.split)
    return prompts[: a.limit] if a.limit else prompts


def _sample_and_score(
    a: argparse.Namespace, s: dict[str, Any], cfg: Config | None, tok: Any, prompts: list[Prompt]
) -> tuple[list[Any], list[Any], dict[str, int]]:
    """k samples per prompt with vLLM, scored by the training verifiers: (samples, verdicts, counts)."""
    import torch

    from async_vapo.config import RolloutConfig
    from async_vapo.protocol import unpack_i32
    from async_vapo.rewards import VerifierPool
    from async_vapo.rollout.engine import EngineConfig, RolloutEngine
    from async_vapo.rollout.worker import verifier_context

    r = cfg.rollout if cfg is not None else RolloutConfig()
    on_gpu = torch.cuda.is_available()
    engine = RolloutEngine(
        EngineConfig(
            a.model,
            max_model_len=s["max_model_len"],
            dtype="auto" if on_gpu else "float32",
            tensor_parallel_size=r.tensor_parallel_size if on_gpu and cfg is not None else 1,
            enforce_eager=not on_gpu,
        )
    )
    pool = VerifierPool(
        max(2, r.verifier_processes), max(10.0, r.verifier_timeout_s),
        correct_reward=r.correct_reward, wrong_reward=r.wrong_reward,
    )  # fmt: skip
    try:
        ids = [unpack_i32(x.token_ids).tolist() for x in prompts]
        samples = asyncio.run(engine.sample_many(ids, s["k"], s["temperature"], s["top_p"], s["max_tokens"]))
        items = [
            (
                x.task,
                str(tok.decode(smp.token_ids, skip_special_tokens=True)),
                x.answer,
                verifier_context(tok, x),
            )
            for x, group in zip(prompts, samples, strict=True)
            for smp in group
        ]
        return items, pool.score(items), dict(pool.counts)
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


def write_samples(
    path: str, prompts: list[Prompt], items: list[Any], verdicts: list[Any], k: int, cfg: Config | None
) -> None:
    """One JSON line per sample, in prompt order: the prompt as the model saw it, the response, the answer,
    the reward the run would give it and the verifier's verdict."""
    from async_vapo.config import RolloutConfig
    from async_vapo.metrics import SampleRow
    from async_vapo.rewards import reward_of

    r = cfg.rollout if cfg is not None else RolloutConfig()
    with open(path, "w") as f:
        for i, ((_, response, answer, context), v) in enumerate(zip(items, verdicts, strict=True)):
            row = SampleRow(uid=prompts[i // k].uid, sample=i % k, prompt=context["prompt"], response=response,
                            answer=answer, reward=reward_of(v, r.correct_reward, r.wrong_reward),
                            correct=v.correct, verdict=v.detail)  # fmt: skip
            f.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from transformers import AutoTokenizer

    from async_vapo.config import load_config
    from async_vapo.logging import configure_logging

    configure_logging()
    cfg = load_config(a.config) if a.config else None
    s = _settings(a, cfg)
    tok = AutoTokenizer.from_pretrained(a.model)
    prompts = _prompts(a, tok, cfg)
    t0 = time.perf_counter()
    items, verdicts, outcomes = _sample_and_score(a, s, cfg, tok, prompts)
    k = s["k"]
    per_problem = [verdicts[i * k : (i + 1) * k] for i in range(len(prompts))]
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        write_samples(a.output, prompts, items, verdicts, k, cfg)
    data = a.data or (cfg.data.eval_file or cfg.data.task if cfg is not None else "")
    result = {
        "model": a.model,
        "data": data,
        "problems": len(prompts),
        "k": k,
        f"avg@{k}": sum(v.correct for v in verdicts) / max(1, len(verdicts)),
        f"pass@{k}": sum(any(v.correct for v in g) for g in per_problem) / max(1, len(per_problem)),
        "sampling": {key: s[key] for key in ("temperature", "top_p", "max_tokens", "max_model_len")},
        "verifier_outcomes": outcomes,
        **({f"avg@{k}_by_digits": by_digits(tok, prompts, per_problem)} if data == "addition" else {}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
